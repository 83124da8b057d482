"""ModelRunner: the only code that calls the frozen model (prefill and decode -> next-token logits)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from server.engine.faults import DECODE, PREFILL, FaultInjector
from server.engine.hf_cache import kv_cache
from server.engine.hf_cache.batch import Batch, ForwardInputs, prefill_inputs
from server.engine.request.sequence import Sequence
from server.engine.sampler import causal_penalty_history


class ModelRunner:
    """Runs the frozen model on batches; returns float32 logits of each row's last position."""

    def __init__(self, model: Any, faults: FaultInjector):
        self.model = model
        self.faults = faults
        params = inspect.signature(model.forward).parameters
        # BLOOM (ALiBi) takes no position ids: it derives them from the mask, which is 0-based from the
        # first virtual token because pads sit left of it and are masked.
        self._takes_positions = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params

    def prefill(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        """One forward over the newcomers; returns their batch (with its cache) and logits [B, V]."""
        self.faults.check(PREFILL, [s.request_id for s in seqs])
        inputs = prefill_inputs(seqs, self.model.get_input_embeddings())
        cache = kv_cache.new_cache()
        logits = self._forward(inputs, cache)
        return Batch.after_prefill(seqs, cache, inputs.attention_mask), logits

    def decode(self, batch: Batch) -> torch.Tensor:
        """One token for every row; advances the batch only when the forward succeeded."""
        self.faults.check(DECODE, [s.request_id for s in batch.seqs])
        inputs = batch.decode_inputs()
        logits = self._forward(inputs, batch.cache)
        batch.advance(inputs)
        return logits

    def penalty_history(self, seq: Sequence) -> list[int]:
        """Tokens the repetition penalty sees: prompt and generated tokens, as in HF generate."""
        return causal_penalty_history(seq)

    def _forward(self, inputs: ForwardInputs, cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "attention_mask": inputs.attention_mask,
            kv_cache.CACHE_ARGUMENT: cache,
            "use_cache": True,
        }
        if inputs.input_ids is not None:
            kwargs["input_ids"] = inputs.input_ids
        else:
            kwargs["inputs_embeds"] = inputs.inputs_embeds
        if self._takes_positions:
            kwargs["position_ids"] = inputs.position_ids
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1  # rows are left-padded: the last column is real for every row
        with torch.inference_mode():
            out = self.model(**kwargs)
        logits = out.logits[:, -1, :]  # [B, V]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
