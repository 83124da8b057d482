"""CPU speed-ups of the paged path: the native decode kernel and the few-row linear kernel (C++ built at start
by native_build.py, each checked before use), prepacked linear weights for oneDNN, and huge pages for the
KV memory. Each is optional: without it the path computes the same through torch. May import: torch, and
server.engine.paged.kv_memory (native_check only)."""
