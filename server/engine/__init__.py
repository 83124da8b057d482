"""The engine: continuous batching of mixed-task soft-prompt requests on one frozen causal LM, or on a
T5- or BART-family encoder-decoder (SEQ_2_SEQ_LM adapters: the prompt goes to the encoder, see runner_seq2seq.py).

Causal models whose attention the glue can express run on the paged path (paged/: block memory, prefix
caching, the exactness probe, CPU kernels in paged/cpu/); the others, and encoder-decoders, on transformers'
DynamicCache (worker.py, runner.py, batch.py, kv_cache.py, runner_seq2seq.py).

Public API (import from the modules; nothing heavy is imported here):
  server.engine.model_loader.load_model(name_or_path, device="auto", dtype=None) -> LoadedModel
  server.engine.config.EngineConfig
  server.engine.engine.Engine(loaded_model, store, config): start(), stop(grace_s), aclose(grace_s),
      await submit(inputs, task_id=..., params=SamplingParams(...)) -> RequestStream, stats(), tokenizer,
      fault_injector (tests), logits_tap (tests)
  server.engine.stream.RequestStream: async iteration of TokenEvent, await result(), cancel()
  server.engine.types / server.engine.errors: the shared types and typed errors
"""
