"""CPU speed-ups of the paged path: the native decode kernel (built at start, checked), prepacked linear
weights for oneDNN, and huge pages for the KV memory. Each is optional: without it the path computes the
same through torch. May import: torch, and server.engine.paged.kv_memory (native_check only)."""
