"""promptserve's load-testing harness: a pure HTTP client (it imports neither `server` nor `prompt_store`)."""
