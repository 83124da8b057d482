"""`python -m loadtest ...`: the same as `promptserve loadtest ...`."""

from loadtest.cli import main

raise SystemExit(main())
