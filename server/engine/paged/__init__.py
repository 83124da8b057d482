"""The paged KV path of causal models: the engine's own KV memory in fixed-size blocks, a block table per
request, full blocks shared by content (prefix caching), and the attention glue that runs stock
transformers models over it.

Three parts stay apart, as in vLLM v1 and nano-vllm:
  block_manager.py, block_hash.py  the memory manager: block ids, refcounts, the hash chain, free lists
                                   (no torch)
  kv_memory.py                     the KV tensors and the only code that knows their layout
  attention.py, step_plan.py       the glue: a packed step's writes and reads, as plain tensors
  prefill_attention.py             a prefill chunk's attention: one masked call, or in pieces merged exactly
  attention_variants.py            layers with a sliding window or logit soft-capping
  runner.py, probe.py              the only code that calls the model; the exactness probe at start
  worker.py                        one step: admission and preemption by blocks, chunked prefill, commit
  open.py                          `open_paged_worker`: decides whether a model runs here, builds it all
  cpu/                             CPU speed-ups: the native decode kernel, prepacked linear weights,
                                   huge pages
May import: server.engine (config, types, errors, sampler, worker_base, faults), server.engine.request and
server.engine.scheduling; never the hf_cache path.
"""
