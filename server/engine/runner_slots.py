"""SlotRunner: the only code that calls a causal model on the slot engine's packed steps.

`open_slot_runner` decides whether a model can run this way: its attention must go through transformers'
AttentionInterface, every layer must reach the glue (layer index, key shape), it must take position ids,
and the exactness probe (exactness_probe.py: several requests through chunked prefills and decodes, against
the model's own eager attention) must pass. Anything else returns None, with the reason logged, and the
engine keeps the legacy path for it (ALiBi models such as BLOOM, sliding windows, logit soft-capping).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from server.engine import attention, exactness_probe, native_check, packed_linear, step_plan
from server.engine.faults import DECODE, PREFILL, FaultInjector
from server.engine.kv_budget import free_memory
from server.engine.kv_pool import KVGeometry, KVPool
from server.engine.native_decode import NativeDecode
from server.engine.runner import ModelRunner
from server.engine.step_plan import Chunk

log = logging.getLogger(__name__)


class SlotRunner:
    """Runs packed steps over the KV pool; returns float32 logits of each sampling chunk, in order."""

    def __init__(self, model: Any, faults: FaultInjector, geometry: KVGeometry):
        self.model = model
        self.faults = faults
        self.geometry = geometry
        self.pool: KVPool | None = None
        self.native: NativeDecode | None = None  # the decode kernel the probe accepted, for the engine's pool
        self.probe: exactness_probe.Probe | None = None  # run again on the compiled step (Engine.warm_up)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._forward = model  # or its compiled version (`compile`)

    def compile(self) -> None:
        """Run steps through torch.compile'd model code (one graph with a dynamic token count; the
        attention op stays opaque). Token and sampled-row counts of 0 and 1 get graphs of their own
        (dynamo specializes them; assuming otherwise broadcasts wrongly): warm_up compiles them all."""
        self._forward = torch.compile(self.model, dynamic=True)

    @property
    def is_compiled(self) -> bool:
        """Whether steps run through the compiled model."""
        return self._forward is not self.model

    def use_eager(self, reason: str) -> None:
        """Give up the compiled step (e.g. no C++ compiler for inductor): run the model as loaded."""
        log.warning("engine: compiled step unavailable, running eagerly (%s)", reason)
        self._forward = self.model

    def attach(self, pool: KVPool) -> None:
        """The pool the steps write into (allocated once by the engine)."""
        self.pool = pool

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """One forward over `chunks` (in `step_plan.order`); logits `[num_sampling, V]`."""
        self.faults.check(PREFILL, [c.seq.request_id for c in chunks if not c.is_decode])
        self.faults.check(DECODE, [c.seq.request_id for c in chunks if c.is_decode])
        inputs = step_plan.build(chunks, self.model.get_input_embeddings(), self.pool)
        kwargs: dict[str, Any] = {"inputs_embeds": inputs.inputs_embeds, "position_ids": inputs.position_ids,
                                  "use_cache": False, attention.SLOTS_KWARG: True}
        num_sampled = len(inputs.sample_index)
        if num_sampled == 0:  # one row anyway: no zero-size graph, whose compiled form could skip the layers
            inputs.sample_index = inputs.plan.write_positions.new_tensor([len(inputs.plan.write_positions) - 1])
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = inputs.sample_index
        with torch.inference_mode(), attention.active_plan(inputs.plan):
            try:
                logits = self._forward(**kwargs).logits[0]
            except torch._dynamo.exc.TorchDynamoException as exc:  # compiling failed, not the model
                self.use_eager(repr(exc)[:300])
                logits = self._forward(**kwargs).logits[0]
        if not self._takes_logits_to_keep:
            logits = logits[inputs.sample_index]
        logits = logits[:num_sampled]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64

    penalty_history = ModelRunner.penalty_history  # the same for every causal model: prompt + generated


def open_slot_runner(model: Any, faults: FaultInjector, native: NativeDecode | None = None,
                     prepack: bool = False) -> SlotRunner | None:
    """A SlotRunner for `model`, or None (with the reason logged) when it must keep the legacy path. A
    native decode kernel, when given, is kept in `runner.native` only if the probe passes with it too.
    `prepack`: keep linear weights in oneDNN's layout as well (packed_linear.py), probed as served."""
    reason = _static_reason(model)
    if reason is None:
        try:
            probe = exactness_probe.prepare(model)  # before the glue and packing: the model as loaded
            if prepack and packed_linear.can_pack(model):
                _prepack(model)
            attention.install(model)
            runner = SlotRunner(model, faults, _discover_geometry(model))
            runner.probe = probe
            reason = _probe(runner, native)
        except Exception as exc:  # noqa: BLE001 - any failure means: not this path
            reason = f"probe failed: {exc!r}"
    if reason is not None:
        if getattr(model.config, "_attn_implementation", None) == attention.IMPLEMENTATION:
            model.set_attn_implementation("sdpa")
        packed_linear.unpack(model)
        log.warning("engine: legacy path (%s)", reason)
        return None
    return runner


def _prepack(model: Any) -> None:
    """Keep the model's linear weights in oneDNN's layout too, when that copy fits in memory."""
    packed = packed_linear.pack_within(model, free_memory(torch.device("cpu")))
    if packed is None:
        log.warning("linear weights not prepacked: their copy (%.0f MiB) would take more than half the free "
                    "memory", packed_linear.linear_bytes(model) / 2**20)
    else:
        log.info("linear weights prepacked for oneDNN: %.1f MiB more", packed / 2**20)


def _probe(runner: SlotRunner, native: NativeDecode | None) -> str | None:
    """The exactness probe with the native decode kernel (when it passes its own check), else with SDPA."""
    if native is not None:
        native = native_check.accept(native, runner.geometry)
    if native is not None:
        reason = probe_step(runner, native)
        if reason is None:
            runner.native = native
            return None
        log.warning("engine: native decode kernel not used for this model (%s); decode attention runs through "
                    "SDPA", reason)
    return probe_step(runner, None)


def probe_step(runner: SlotRunner, native: NativeDecode | None) -> str | None:
    """Run the probe through `runner` as it is now (eager or compiled) on a pool of its own; the reason it
    failed, or None."""
    pool = runner.pool
    runner.attach(KVPool(runner.geometry, num_slots=len(runner.probe.requests),
                         slot_tokens=runner.probe.max_context, native=native))
    try:
        return exactness_probe.run(runner.probe, runner.forward, Chunk, step_plan.order)
    finally:
        runner.attach(pool)


def _static_reason(model: Any) -> str | None:
    config = model.config.get_text_config(decoder=True)
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not use transformers' AttentionInterface"
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "the model takes no position ids"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "layers other than full attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    return None


def _discover_geometry(model: Any) -> KVGeometry:
    probe = attention.GeometryProbe()
    weight = model.get_input_embeddings().weight
    with torch.inference_mode():
        model(inputs_embeds=weight[:1][None], position_ids=torch.zeros(1, 1, dtype=torch.long, device=weight.device),
              use_cache=False, **{attention.SLOTS_KWARG: probe})
    shapes = set(probe.key_shapes.values())
    if not probe.key_shapes or len(shapes) != 1 or sorted(probe.key_shapes) != list(range(len(probe.key_shapes))):
        raise NotImplementedError(f"layers' keys differ or did not reach the glue: {probe.key_shapes}")
    ((num_kv_heads, head_dim),) = shapes
    return KVGeometry(len(probe.key_shapes), num_kv_heads, head_dim, probe.dtype, weight.device)


class _ProbeSeq:
    """A stand-in request for the probe: token ids only, no prompt."""

    def __init__(self, ids: list[int], slot: int):
        self.request_id, self.prompt, self.num_virtual_tokens = f"probe-{slot}", None, 0
        self.prompt_ids, self.generated, self.slot = ids, [], slot

    @property
    def num_context_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


def warm_up(runner: SlotRunner) -> None:
    """Run the step shapes serving will meet (prefill chunks with and without a sampled row, one and
    several decoding rows, mixed steps), so that a compiled model compiles now, not under load. A small
    pool of its own stands in for the attached one (the compiled code does not depend on the pool)."""
    pool, vocab = runner.pool, runner.model.get_input_embeddings().weight.shape[0]
    seqs = [_ProbeSeq([(7 * i + j) % vocab for j in range(12)], i) for i in range(3)]
    runner.attach(KVPool(runner.geometry, num_slots=3, slot_tokens=16))
    runner.pool.num_used = len(seqs)
    try:
        with torch.inference_mode():  # as on the engine thread: tensors made outside it fail compiled guards
            _warm_up_steps(runner, seqs)
    finally:
        runner.attach(pool)


def _warm_up_steps(runner: SlotRunner, seqs: list[_ProbeSeq]) -> None:
    runner.forward([Chunk(seqs[0], 0, 5)])  # a chunk that samples nothing (computes one row's logits anyway)
    runner.forward([Chunk(seqs[0], 5, 7)])  # one that samples one row
    runner.forward([Chunk(seqs[1], 0, 12), Chunk(seqs[2], 0, 12)])  # several
    for seq in seqs:
        seq.generated = [1]
    runner.forward([Chunk(seqs[0], 12, 1)])  # one decoding row
    runner.forward(step_plan.order([Chunk(s, 12, 1) for s in seqs]))  # several
    seqs[2].generated, seqs[2].prompt_ids = [], seqs[2].prompt_ids + [3, 4]  # mixed: decodes and a chunk
    runner.forward(step_plan.order([Chunk(seqs[0], 12, 1), Chunk(seqs[1], 12, 1), Chunk(seqs[2], 12, 2)]))
