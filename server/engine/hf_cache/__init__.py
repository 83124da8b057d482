"""The DynamicCache path: transformers' own cache, for encoder-decoders (T5, BART and kin) and for causal
models whose attention the paged glue cannot express (ALiBi, sliding windows, soft-capping).

  open.py                 open_hf_cache_worker: the worker and runner for a model (the engine calls it
                          when paged.open.open_paged_worker returns None)
  worker.py               one step over a left-padded batch: prefill newcomers, merge, decode, sample;
                          a failing forward is retried on halves of its rows
  runner.py               ModelRunner: the only code here that calls a causal model
  runner_seq2seq.py       Seq2SeqRunner: the same for encoder-decoders
  seq2seq_families.py     what differs between encoder-decoder families (positions, embedding scale)
  batch.py kv_cache.py    the running batch and the surgery on its cache (select, merge, truncate)

May import: server.engine (config, types, errors, faults, sampler, worker_base, model_loader), request/,
scheduling/. Never paged/ or the loop (engine.py).
"""
