"""The engine: continuous batching of mixed-task soft-prompt requests on one frozen causal LM, or on a
T5- or BART-family encoder-decoder (SEQ_2_SEQ_LM adapters: the prompt goes to the encoder). It knows
nothing of HTTP.

Layout; imports point down this list, and the two paths never import each other:
  engine.py        the loop: submit() -> RequestStream, the worker thread. It builds the model's worker by
                   calling one function per path: paged.open.open_paged_worker, else
                   hf_cache.open.open_hf_cache_worker
  paged/           causal models whose attention the glue can express: block memory, prefix caching, the
                   exactness probe, CPU kernels in paged/cpu/
  hf_cache/        transformers' DynamicCache: encoder-decoders, and the families the glue cannot express
  worker_base.py   what both paths' workers share (sampling, finishing, failing, the store's pins);
  sampler.py faults.py model_loader.py  also shared (model_loader asks hf_cache/seq2seq_families.py which
                   encoder-decoder families load)
  request/         one request: sequence, stream, outbox, detokenizer, stop matcher, validation
  scheduling/      who runs next, in tokens: scheduler, fair share, chunk budget (no torch)
  config.py types.py errors.py   plain values shared by all

May import: prompt_store, torch, transformers; nothing else of server (no HTTP, no tenancy).

Public API (import from the modules; nothing heavy is imported here):
  server.engine.model_loader.load_model(name_or_path, device="auto", dtype=None) -> LoadedModel
  server.engine.config.EngineConfig
  server.engine.engine.Engine(loaded_model, store, config): start(), stop(grace_s), aclose(grace_s),
      tokenize(inputs) -> PromptTokens, await submit(inputs, task_id=..., params=SamplingParams(...))
      -> RequestStream, stats(), tokenizer, fault_injector (tests), logits_tap (tests)
  server.engine.request.stream.RequestStream: async iteration of TokenEvent, await result(), cancel()
  server.engine.types / server.engine.errors: the shared types and typed errors
"""
