"""What differs between the encoder-decoder families the engine serves: how positions are encoded (with
explicit per-row positions for absolute tables), and where text embeddings get scaled.

Positions. T5 (relative position buckets) needs nothing: left padding leaves every real token's
distances unchanged. BART and its kin add `table[column + offset]` to each embedding, the column counted
from the left edge of the batch, the same for every row (transformers 5.23's BartDecoder.forward takes no
position ids). A row left-padded by p columns, or a decoder row that joined the batch k steps late, would
read shifted positions. `PositionTables` replaces the table lookup, for one forward, with each row's own
positions (0 from its first virtual token in the encoder, 0 from the start token in the decoder):
exactly what PEFT computes for the request alone. M2M100 (NLLB) reads sinusoids at `padding_idx + 1 +
position`, and gives a pad token id the zero row `padding_idx`; the override does the same.

Embedding scale. BART-like models scale inside their embedding module, so the text embeddings PEFT
concatenates behind the prompt are scaled as usual. Pegasus, Marian and BlenderbotSmall scale in the
encoder's forward, and only when given input ids: PEFT passes inputs_embeds, so a prompted request's
text is not scaled (that is how its prompt was trained), while a request without a task, run by the
base model from its ids, is. `bare_text_scale` gives the factor for the latter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

RELATIVE_POSITION_TYPES = frozenset({"t5", "mt5", "umt5"})
# Each has `embed_positions` in the encoder and in the decoder: an nn.Embedding table read at
# `position + offset` (offset 2 for BART's padding hack, else 0), or M2M100's padding-aware sinusoids.
ABSOLUTE_POSITION_TYPES = frozenset({"bart", "mbart", "plbart", "pegasus", "marian", "blenderbot",
                                     "blenderbot-small", "m2m_100"})
SUPPORTED_MODEL_TYPES = RELATIVE_POSITION_TYPES | ABSOLUTE_POSITION_TYPES
# The encoder multiplies `embed_tokens(input_ids)` by its `embed_scale`; given inputs_embeds, it does not.
SCALES_INPUT_IDS_IN_ENCODER = frozenset({"pegasus", "marian", "blenderbot-small"})


def check_supported(model_type: str) -> None:
    """Refuse, at load, an encoder-decoder family whose position handling is not known to be right."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"encoder-decoder model type {model_type!r} is not supported; "
                         f"supported: {sorted(SUPPORTED_MODEL_TYPES)}")


def position_limit(config: Any) -> int | None:
    """Positions per side (encoder input, decoder output) of an absolute table; None for relative ones."""
    if config.model_type in RELATIVE_POSITION_TYPES:
        return None
    return int(config.max_position_embeddings)


def bare_text_scale(model: Any) -> float:
    """Factor for the text embeddings of a request without a task (the base model's own ids path)."""
    if model.config.model_type not in SCALES_INPUT_IDS_IN_ENCODER:
        return 1.0
    return float(model.get_encoder().embed_scale)


class PositionTables:
    """The encoder's and decoder's absolute position tables of one model (absent for relative schemes)."""

    def __init__(self, model: Any):
        self._encoder = self._decoder = None
        if model.config.model_type in ABSOLUTE_POSITION_TYPES:
            self._encoder = _table(model.get_encoder())
            self._decoder = _table(model.get_decoder())

    def encoder(self, position_ids: torch.Tensor):
        """Context for one encoder forward: row i's column j reads `position_ids[i, j]`."""
        return _explicit(self._encoder, position_ids)

    def decoder(self, position_ids: torch.Tensor):
        """Context for one decoder forward: row i's column j reads `position_ids[i, j]`."""
        return _explicit(self._decoder, position_ids)


def _table(stack: Any) -> torch.nn.Module:
    table = getattr(stack, "embed_positions", None)
    if not (isinstance(table, torch.nn.Embedding) or is_padding_aware(table)):
        raise ValueError(f"{type(stack).__name__} has no position table (embed_positions) to override")
    return table


def is_padding_aware(table: Any) -> bool:
    """M2M100/NLLB's kind: a sinusoidal buffer `weights` read at padding_idx + 1 + position (grown on demand)."""
    return isinstance(getattr(table, "weights", None), torch.Tensor) and isinstance(
        getattr(table, "padding_idx", None), int)


def lookup_positions(table: torch.nn.Module, position_ids: torch.Tensor,
                     input_ids: torch.Tensor | None) -> torch.Tensor:
    """Each row's position embeddings [B, T, D], read as the model reads a single request's."""
    if isinstance(table, torch.nn.Embedding):
        return F.embedding(position_ids + int(getattr(table, "offset", 0)), table.weight)
    pad = table.padding_idx
    index = position_ids + pad + 1
    if input_ids is not None:  # M2M100 gives a pad token id the all-zero row `padding_idx`
        index = torch.where(input_ids == pad, pad, index)
    return table.weights[index]


def _explicit(table: torch.nn.Module | None, position_ids: torch.Tensor):
    return nullcontext() if table is None else _override(table, position_ids)


@contextmanager
def _override(table: torch.nn.Module, position_ids: torch.Tensor) -> Iterator[None]:
    def per_row(module, args, kwargs, output):
        if output.shape[-2] != position_ids.shape[-1]:  # the model looked up another span than we meant
            raise RuntimeError(f"position override for {output.shape[-2]} columns got {position_ids.shape[-1]}")
        first = args[0] if args else kwargs.get("input_ids")  # ids, or (BART-like) ids / a shape
        input_ids = first if isinstance(first, torch.Tensor) and first.dtype == torch.long else None
        return lookup_positions(module, position_ids, input_ids)  # [B, T, D], added to [B, T, D] embeddings

    # A hook for this forward only: the model object itself is left as loaded.
    handle = table.register_forward_hook(per_row, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
