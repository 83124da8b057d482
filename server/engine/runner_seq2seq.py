"""Seq2SeqRunner: the only code that calls a frozen encoder-decoder model (T5 family).

PEFT semantics (PeftModelForSeq2SeqLM, PROMPT_TUNING): only the encoder gets the prompt. Encoder row i is
`[pads][P_i][E(ids_i)]` with mask 0 on pads (T5 has relative position buckets: no position ids, and left
padding leaves every real token's relative distances unchanged). The decoder is untouched: it starts from
`decoder_start_token_id` and decodes with self-attention and cross-attention caches (kv_cache.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from server.engine import kv_cache
from server.engine.batch import Batch, EncoderState, prefill_inputs
from server.engine.faults import DECODE, PREFILL, FaultInjector
from server.engine.sequence import Sequence

# Decoders whose self-attention positions are relative (bias buckets), so left-padded rows of different
# lengths see the same distances as alone. Learned absolute decoder positions (BART) would need more.
SUPPORTED_MODEL_TYPES = frozenset({"t5", "mt5", "umt5"})


class Seq2SeqRunner:
    """Runs the frozen encoder-decoder on batches; returns float32 logits of each row's next token."""

    def __init__(self, model: Any, faults: FaultInjector):
        self.model = model
        self.faults = faults
        self.decoder_start_token_id = int(model.config.decoder_start_token_id)

    def prefill(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        """One encoder pass over the newcomers, then their first decoder step (from the start token)."""
        self.faults.check(PREFILL, [s.request_id for s in seqs])
        inputs = prefill_inputs(seqs, self.model.get_input_embeddings())  # its position ids are unused
        with torch.inference_mode():
            hidden = self.model.get_encoder()(inputs_embeds=inputs.inputs_embeds,
                                              attention_mask=inputs.attention_mask).last_hidden_state
        device = hidden.device
        rows = len(seqs)
        batch = Batch(seqs, kv_cache.new_encoder_decoder_cache(),
                      torch.zeros(rows, 0, dtype=torch.long, device=device), [None] * rows,
                      torch.zeros(rows, dtype=torch.long, device=device),
                      torch.full((rows,), self.decoder_start_token_id, dtype=torch.long, device=device),
                      EncoderState(hidden, inputs.attention_mask))
        logits = self._step(batch)
        return batch, logits

    def decode(self, batch: Batch) -> torch.Tensor:
        """One token for every row; advances the batch only when the forward succeeded."""
        self.faults.check(DECODE, [s.request_id for s in batch.seqs])
        return self._step(batch)

    def penalty_history(self, seq: Sequence) -> list[int]:
        """Tokens the repetition penalty sees: the decoder's input ids, as in HF generate."""
        return [self.decoder_start_token_id, *seq.generated]

    def _step(self, batch: Batch) -> torch.Tensor:
        inputs = batch.decode_inputs()
        encoder = batch.encoder
        kwargs: dict[str, Any] = {
            "encoder_outputs": BaseModelOutput(last_hidden_state=encoder.hidden_states),
            "attention_mask": encoder.attention_mask,
            "decoder_input_ids": inputs.input_ids,
            "decoder_attention_mask": inputs.attention_mask,
            kv_cache.CACHE_ARGUMENT: batch.cache,
            "use_cache": True,
        }
        with torch.inference_mode():
            out = self.model(**kwargs)
        batch.advance(inputs)
        return out.logits[:, -1, :].float()  # [B, V]
