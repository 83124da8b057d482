"""PagedRunner: the only code that calls a causal model on the paged engine's packed steps; `warm_up` runs
the step shapes serving meets once, so that a compiled model compiles before /ready."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from server.engine.faults import DECODE, PREFILL, FaultInjector
from server.engine.paged import attention, attention_variants, step_plan
from server.engine.paged.cpu.native_decode import NativeDecode
from server.engine.paged.cpu.native_prefill import NativePrefill
from server.engine.paged.kv_memory import KVGeometry, PagedKV
from server.engine.paged.probe import Probe
from server.engine.paged.step_plan import Chunk
from server.engine.sampler import causal_penalty_history

log = logging.getLogger(__name__)


class PagedRunner:
    """Runs packed steps over paged KV memory; returns float32 logits of each sampling chunk, in order."""

    def __init__(self, model: Any, faults: FaultInjector, geometry: KVGeometry):
        self.model = model
        self.faults = faults
        self.geometry = geometry
        self.memory: PagedKV | None = None
        self.native: NativeDecode | None = None  # the decode kernel the probe accepted, for the engine's memory
        self.native_prefill: NativePrefill | None = None  # the prefill kernel the probe accepted
        self.probe: Probe | None = None  # run again on the compiled step (Engine.warm_up)
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

    def attach(self, memory: PagedKV | None) -> None:
        """The KV memory the steps write into (allocated once, at start)."""
        self.memory = memory

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """One forward over `chunks` (in `step_plan.order`); logits `[num_sampling, V]`."""
        self.faults.check(PREFILL, [c.seq.request_id for c in chunks if not c.is_decode])
        self.faults.check(DECODE, [c.seq.request_id for c in chunks if c.is_decode])
        inputs = step_plan.build(chunks, self.model.get_input_embeddings(), self.memory)
        kwargs: dict[str, Any] = {"inputs_embeds": inputs.inputs_embeds, "position_ids": inputs.position_ids,
                                  "use_cache": False, attention.PAGED_KWARG: True}
        num_sampled = len(inputs.sample_index)
        if num_sampled == 0:  # one row anyway: no zero-size graph, whose compiled form could skip the layers
            inputs.sample_index = inputs.plan.positions.new_tensor([len(inputs.plan.positions) - 1])
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

    penalty_history = staticmethod(causal_penalty_history)  # the same for every causal model


def discover_geometry(model: Any) -> KVGeometry:
    probe = attention.GeometryProbe()
    weight = model.get_input_embeddings().weight
    with torch.inference_mode():
        model(inputs_embeds=weight[:1][None], position_ids=torch.zeros(1, 1, dtype=torch.long, device=weight.device),
              use_cache=False, **{attention.PAGED_KWARG: probe})
    shapes = set(probe.key_shapes.values())
    if not probe.key_shapes or len(shapes) != 1 or sorted(probe.key_shapes) != list(range(len(probe.key_shapes))):
        raise NotImplementedError(f"layers' keys differ or did not reach the glue: {probe.key_shapes}")
    mismatch = attention_variants.config_mismatch(model.config, probe.variants)
    if mismatch is not None:  # e.g. a window in the model's masks that its layers do not pass on
        raise NotImplementedError(mismatch)
    ((num_kv_heads, head_dim),) = shapes
    return KVGeometry(len(probe.key_shapes), num_kv_heads, head_dim, probe.dtype, weight.device)


class _WarmUpSeq:
    """A stand-in request for the warm-up: token ids only, no prompt, its own blocks."""

    def __init__(self, ids: list[int], table: list[int]):
        self.request_id, self.prompt, self.num_virtual_tokens = "warm-up", None, 0
        self.prompt_ids, self.generated, self.block_table = ids, [], table

    @property
    def num_context_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


def warm_up(runner: PagedRunner) -> None:
    """Run the step shapes serving will meet (prefill chunks with and without a sampled row, one and
    several decoding rows, mixed steps), so that a compiled model compiles now, not under load. Small KV
    memory of its own stands in for the attached one (the compiled code does not depend on it)."""
    memory, vocab = runner.memory, runner.model.get_input_embeddings().weight.shape[0]
    seqs = [_WarmUpSeq([(7 * i + j) % vocab for j in range(12)], [2 * i, 2 * i + 1]) for i in range(3)]
    runner.attach(PagedKV(runner.geometry, num_blocks=6, block_tokens=8))
    try:
        with torch.inference_mode():  # as on the engine thread: tensors made outside it fail compiled guards
            _warm_up_steps(runner, seqs)
    finally:
        runner.attach(memory)


def _warm_up_steps(runner: PagedRunner, seqs: list[_WarmUpSeq]) -> None:
    runner.forward([Chunk(seqs[0], 0, 5)])  # a chunk that samples nothing (computes one row's logits anyway)
    runner.forward([Chunk(seqs[0], 5, 7)])  # one that samples one row
    runner.forward([Chunk(seqs[1], 0, 12), Chunk(seqs[2], 0, 12)])  # several
    for seq in seqs:
        seq.generated = [1]
    runner.forward([Chunk(seqs[0], 12, 1)])  # one decoding row
    runner.forward(step_plan.order([Chunk(s, 12, 1) for s in seqs]))  # several
    seqs[2].generated, seqs[2].prompt_ids = [], seqs[2].prompt_ids + [3, 4]  # mixed: decodes and a chunk
    runner.forward(step_plan.order([Chunk(seqs[0], 12, 1), Chunk(seqs[1], 12, 1), Chunk(seqs[2], 12, 2)]))
