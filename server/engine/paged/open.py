"""`open_paged_worker`: whether a causal model runs on the paged path, and everything that path needs.

A model runs here when its attention goes through transformers' AttentionInterface, every layer reaches the
glue (layer index, key shape), it takes position ids, and the exactness probe (probe.py) passes: with the
native attention kernels (decode, prefill) that pass their own checks, else with SDPA. Anything else returns
None, with the reason logged, and the engine keeps the legacy path for it (ALiBi models such as BLOOM,
models whose layers do not pass the glue's keyword on, attention sinks). Sliding windows and logit soft-capping are
computed (attention_variants.py) where each layer's keywords agree with the config.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from server.engine.config import EngineConfig
from server.engine.faults import FaultInjector
from server.engine.model_loader import LoadedModel
from server.engine.paged import attention, probe, sizing
from server.engine.paged.cpu import native_check, native_decode, native_prefill, packed_linear
from server.engine.paged.cpu.native_decode import NativeDecode
from server.engine.paged.cpu.native_prefill import NativePrefill
from server.engine.paged.kv_memory import PagedKV
from server.engine.paged.runner import PagedRunner, discover_geometry
from server.engine.paged.worker import PagedWorker
from server.engine.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)


def open_paged_worker(loaded: LoadedModel, faults: FaultInjector, scheduler: Scheduler, config: EngineConfig,
                      release: Callable[[Any], None], flush: Callable[[], None]) -> PagedWorker | None:
    """The paged worker for `loaded`, with its KV memory allocated; None when the model must keep the
    legacy path."""
    natives = (native_decode.load(), native_prefill.load()) if config.native_attention else (None, None)
    runner = open_runner(loaded.model, faults, *natives, prepack=config.prepack_weights)
    if runner is None:
        return None
    max_context = config.max_total_tokens
    if loaded.max_positions is not None:
        max_context = min(max_context, loaded.max_positions)
    num_bytes = sizing.budget_bytes(runner.geometry, config.max_batch_size, max_context, config.kv_cache_memory,
                                    config.kv_block_tokens)
    num_blocks = sizing.num_blocks(runner.geometry, config.kv_block_tokens, num_bytes)
    memory = PagedKV(runner.geometry, num_blocks, config.kv_block_tokens, runner.native, runner.native_prefill)
    log.info("KV memory: %d blocks x %d tokens = %d tokens, %.1f MiB; context limit %d; decode attention: %s; "
             "prefill attention: %s", num_blocks, config.kv_block_tokens, memory.num_tokens, memory.num_bytes / 2**20,
             min(max_context, memory.num_tokens), "native" if memory.has_native_decode else "SDPA",
             "native" if memory.has_native_prefill else "SDPA")
    worker = PagedWorker(runner, scheduler, memory, config, release, flush)
    if config.compile:
        runner.compile()
    return worker


def open_runner(model: Any, faults: FaultInjector, native: NativeDecode | None = None,
                prefill: NativePrefill | None = None, prepack: bool = False) -> PagedRunner | None:
    """A PagedRunner for `model`, or None (with the reason logged). The native decode and prefill kernels, when
    given, are kept in `runner.native` and `runner.native_prefill` only if the probe passes with them too.
    `prepack`: keep linear weights in oneDNN's layout as well (packed_linear.py), probed as served."""
    reason = _static_reason(model)
    if reason is None:
        try:
            reference = probe.prepare(model)  # the model's own attention, before packing
            if prepack and packed_linear.can_pack(model):
                _prepack(model)
            attention.install(model)
            runner = PagedRunner(model, faults, discover_geometry(model))
            runner.probe = reference
            reason = _probe(runner, native, prefill)
        except Exception as exc:  # noqa: BLE001 - any failure means: not this path
            reason = f"probe failed: {exc!r}"
    if reason is not None:
        if getattr(model.config, "_attn_implementation", None) == attention.IMPLEMENTATION:
            model.set_attn_implementation(model._promptserve_stock_attention)
        packed_linear.unpack(model)
        log.warning("engine: legacy path (%s)", reason)
        return None
    return runner


def probe_step(runner: PagedRunner, native: NativeDecode | None, prefill: NativePrefill | None) -> str | None:
    """Run the probe through `runner` as it is now (eager or compiled) on KV memory of its own; the reason
    it failed, or None."""
    memory = runner.memory
    runner.attach(PagedKV(runner.geometry, runner.probe.num_blocks, probe.BLOCK_TOKENS, native, prefill))
    try:
        return probe.run(runner.probe, runner.forward)
    finally:
        runner.attach(memory)


def _probe(runner: PagedRunner, native: NativeDecode | None, prefill: NativePrefill | None) -> str | None:
    """The exactness probe with the native kernels that pass their own checks, else with SDPA."""
    native = native_check.accept(native, runner.geometry) if native is not None else None
    prefill = native_check.accept_prefill(prefill, runner.geometry) if prefill is not None else None
    if native is not None or prefill is not None:
        reason = probe_step(runner, native, prefill)
        if reason is None:
            runner.native, runner.native_prefill = native, prefill
            return None
        log.warning("engine: native attention kernels not used for this model (%s); attention runs through SDPA",
                    reason)
    return probe_step(runner, None, None)


def _prepack(model: Any) -> None:
    """Keep the model's linear weights in oneDNN's layout too, when that copy fits in memory."""
    packed = packed_linear.pack_within(model, sizing.free_memory(torch.device("cpu")))
    if packed is None:
        log.warning("linear weights not prepacked: their copy (%.0f MiB) would take more than half the free "
                    "memory", packed_linear.linear_bytes(model) / 2**20)
    else:
        log.info("linear weights prepacked for oneDNN: %.1f MiB more", packed / 2**20)


def _static_reason(model: Any) -> str | None:
    config = model.config.get_text_config(decoder=True)
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if not getattr(model, "_supports_attention_backend", False):
        # Its layers compute attention themselves (BLOOM, Falcon, GPT-J) or do not pass the forward's keywords
        # on to the AttentionInterface (StableLM's decoder layer): the glue's keyword would not reach it.
        return (f"{type(model).__name__} is no attention backend (its attention does not go through "
                "transformers' AttentionInterface, or the forward's keywords do not reach it)")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "the model takes no position ids"
    if any(t not in ("full_attention", "sliding_attention") for t in getattr(config, "layer_types", None) or []):
        return "layers other than full or sliding-window attention"
    return None
