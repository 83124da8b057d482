"""Seq2SeqRunner: the only code that calls a frozen encoder-decoder model (T5 and BART families).

PEFT semantics (PeftModelForSeq2SeqLM, PROMPT_TUNING): only the encoder gets the prompt. Encoder row i is
`[pads][P_i][E(ids_i)]` with mask 0 on pads. The decoder is untouched: it starts from the decoder start
token and decodes with self-attention and cross-attention caches (kv_cache.py). Rows are left-padded in
both; models with absolute position tables get each row's own positions (seq2seq_families.py).

From the model's generation config the runner takes what defines the model's output language, as HF
generate does: `decoder_start_token_id` (else `bos_token_id`) and `forced_bos_token_id`. Decoding
choices (beams, n-gram bans, forcing EOS at the length limit) come from the request, not the model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from server.engine.faults import DECODE, PREFILL, FaultInjector
from server.engine.hf_cache import kv_cache
from server.engine.hf_cache.batch import Batch, EncoderState, prefill_inputs
from server.engine.hf_cache.seq2seq_families import PositionTables, bare_text_scale
from server.engine.request.sequence import Sequence


class Seq2SeqRunner:
    """Runs the frozen encoder-decoder on batches; returns float32 logits of each row's next token."""

    def __init__(self, model: Any, faults: FaultInjector):
        self.model = model
        self.faults = faults
        self.decoder_start_token_id = decoder_start_token_id(model)
        self.forced_bos_token_id = _generation_setting(model, "forced_bos_token_id")
        self.positions = PositionTables(model)
        self.bare_text_scale = bare_text_scale(model)

    def prefill(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        """One encoder pass over the newcomers, then their first decoder step (from the start token)."""
        self.faults.check(PREFILL, [s.request_id for s in seqs])
        inputs = prefill_inputs(seqs, self.model.get_input_embeddings())
        if self.bare_text_scale != 1.0:  # a row without a task is all text (and zero pads): scale it whole
            for row, seq in enumerate(seqs):
                if seq.prompt is None:
                    inputs.inputs_embeds[row] *= self.bare_text_scale
        with torch.inference_mode(), self.positions.encoder(inputs.position_ids):
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
        if self.forced_bos_token_id is not None:  # HF's ForcedBOSTokenLogitsProcessor: only this token
            logits = torch.full_like(logits, float("-inf"))
            logits[:, self.forced_bos_token_id] = 0.0
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
        with torch.inference_mode(), self.positions.decoder(inputs.position_ids):
            out = self.model(**kwargs)
        batch.advance(inputs)
        logits = out.logits[:, -1, :]  # [B, V]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64


def decoder_start_token_id(model: Any) -> int:
    """The decoder's first input token, as HF generate picks it (generation config, then BOS)."""
    for key in ("decoder_start_token_id", "bos_token_id"):
        value = _generation_setting(model, key)
        if value is not None:
            return value
    raise ValueError("the model defines neither decoder_start_token_id nor bos_token_id: "
                     "set one in its config.json or generation_config.json")


def _generation_setting(model: Any, key: str) -> int | None:
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, key, None)
        if isinstance(value, int):
            return value
    return None
