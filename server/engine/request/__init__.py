"""One request from submit to its last event, apart from how it is computed.

  sequence.py                 Sequence: a request's state on the worker thread (no torch)
  detokenizer.py stop_matcher.py   its text: incremental decoding, stop sequences
  stream.py outbox.py         RequestStream: the caller's async view; Outbox: the worker thread's events
                              handed to the event loop once per step
  validation.py               the checks at submit, each a typed error (tokenizing included)

May import: server.engine.config, types, errors; prompt_store (task types, in validation.py). Nothing of
the paths (paged/, hf_cache/), of scheduling/, or of the loop. sequence.py, and what it imports, imports
no torch: the scheduler reads it.
"""
