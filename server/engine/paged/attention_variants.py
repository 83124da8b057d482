"""The attention variants the paged glue computes besides plain causal attention, per layer: a sliding
window and attention logit soft-capping. Plain layers never come here (attention.py keeps SDPA for them).

Semantics, as transformers 5.23 computes them for the model alone:
- **Sliding window** `W` (`sliding_window` keyword; masking_utils `sliding_window_overlay`: `kv_idx > q_idx -
  W`, and'ed with causal): the token at position p attends to positions p - W + 1 .. p, itself included, so
  W positions at most.
- **Soft-capping** `c` (`softcap` keyword; Gemma 2's `eager_attention_forward`): scores = q.k * scale, then
  c * tanh(scores / c), then the mask, then a float32 softmax cast back to the model's dtype. SDPA cannot
  soft-cap, so those layers take the explicit matmul, softmax, matmul below.

A layer's window and cap come from its own attention keywords; `config_mismatch` checks them against the
model's config (what its masks use), so that a model whose layers do not say what their masks do (a window
in the mask, none in the keywords) is not served with the wrong one: the start-up probe's contexts are
far shorter than real windows, so it could not tell.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float, window: int,
            softcap: float) -> torch.Tensor:
    """One prefill chunk: q `[H, T, d]` at positions start..start+T-1, keys/values `[1, KVH, start+T, d]`
    (positions 0..start+T-1) -> `[T, H, d]`."""
    num_tokens = q.shape[1]
    first = max(0, start - window + 1) if window else 0  # no row of the chunk reads before it
    keys, values = keys[:, :, first:], values[:, :, first:]
    rows = torch.arange(start, start + num_tokens, device=q.device)[:, None]  # [T, 1]
    allowed = _allowed(torch.arange(first, start + num_tokens, device=q.device)[None, :], rows, window)  # [T, S]
    return attend(q[None], keys, values, allowed, scale, softcap)[0].transpose(0, 1)


def decode(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float,
           window: int, softcap: float) -> torch.Tensor:
    """Decoding rows without the native kernel: queries `[Bd, H, d]`, each row's gathered keys/values `[Bd, KVH,
    W, d]` (positions 0..W-1, padded past its length) -> `[Bd, H, d]`."""
    lengths = lengths.to(queries.device)[:, None]  # [Bd, 1]
    rows = lengths - 1  # each row's own position
    allowed = _allowed(torch.arange(keys.shape[2], device=queries.device)[None, :], rows, window)  # [Bd, W]
    return attend(queries[:, :, None], keys, values, allowed[:, None, None, :], scale, softcap)[:, :, 0]


def unpaged(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, window: int,
            softcap: float) -> torch.Tensor:
    """A call outside a paged step (the model used as loaded, e.g. for training): causal over the call's own
    keys, its T queries being the last of the S key positions; query `[B, H, T, d]`, key/value `[B, KVH, S, d]`
    -> `[B, T, H, d]`. Like the glue's plain SDPA there, it masks no padding (right padding needs none)."""
    num_queries, num_keys = query.shape[2], key.shape[2]
    rows = torch.arange(num_keys - num_queries, num_keys, device=query.device)[:, None]  # [T, 1]
    allowed = _allowed(torch.arange(num_keys, device=query.device)[None, :], rows, window)  # [T, S]
    return attend(query, key, value, allowed, scale, softcap).transpose(1, 2).contiguous()


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float,
           softcap: float) -> torch.Tensor:
    """q `[B, H, T, d]`, keys/values `[B, KVH, S, d]`, allowed: bool, broadcast to `[B, H, T, S]` ->
    `[B, H, T, d]`; SDPA without a cap, else the explicit computation of Gemma 2's eager attention."""
    is_gqa = q.shape[1] != keys.shape[1]
    if not softcap:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale, enable_gqa=is_gqa)
    if is_gqa:  # query head h reads kv head h // group, as repeat_kv
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))  # eager adds the dtype's minimum: the same zero weight
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, values)


def _allowed(columns: torch.Tensor, rows: torch.Tensor, window: int) -> torch.Tensor:
    """Causal, and within the window when there is one: columns `[1, S]` and rows `[R, 1]` are positions."""
    allowed = columns <= rows
    if window:
        allowed &= columns > rows - window
    return allowed


def expected(config: Any, num_layers: int) -> list[tuple[int, float]]:
    """Per layer, the (window, cap) the model's config says its masks and scores use (0: none)."""
    config = config.get_text_config(decoder=True)
    window = int(getattr(config, "sliding_window", None) or 0)
    if getattr(config, "use_sliding_window", True) is False:
        window = 0
    softcap = float(getattr(config, "attn_logit_softcapping", None) or 0.0)
    types = getattr(config, "layer_types", None)
    if types is None:
        return [(window, softcap)] * num_layers
    return [(window if kind == "sliding_attention" else 0, softcap) for kind in types[:num_layers]]


def config_mismatch(config: Any, recorded: dict[int, tuple[int, float]]) -> str | None:
    """Why the layers' attention keywords (`recorded`: layer -> (window, cap)) disagree with the config, or
    None when they agree."""
    want = expected(config, len(recorded))
    got = [recorded[layer] for layer in sorted(recorded)]
    if got != want:
        return f"attention keywords (window, softcap) per layer {got} differ from the config's {want}"
    return None
