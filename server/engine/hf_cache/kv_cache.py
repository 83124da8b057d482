"""The one module that knows the transformers KV-cache internals (transformers 5.20 to 5.23: DynamicCache
made of DynamicLayer objects, keys/values `[batch, kv_heads, seq, head_dim]`, argument `past_key_values`;
encoder-decoder models: EncoderDecoderCache of a self-attention and a cross-attention DynamicCache).

Rows are left-padded: column j of every layer is the same cache slot for all rows; pads hold zeros and are
masked out by the attention mask the batch keeps beside the cache (for the cross-attention cache: the
encoder mask). `width`, `truncate` and the `first_column` of `select` are about the self-attention cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

CACHE_ARGUMENT = "past_key_values"  # renamed to `cache` in transformers 5.24


def new_cache() -> DynamicCache:
    """An empty cache of full-attention layers, filled by the model's first forward."""
    return DynamicCache()


def new_encoder_decoder_cache() -> EncoderDecoderCache:
    """An empty self-attention + cross-attention cache; the first decoder forward fills both."""
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def _self_attention(cache):
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = cache.layers
    for layer in layers:
        if type(layer) is not DynamicLayer:  # sliding-window or quantised layers would need other maths
            raise TypeError(f"unsupported cache layer {type(layer).__name__}")
    return layers


def _build(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    layers = []
    for keys, values in pairs:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        layers.append(layer)
    cache.layers = layers
    return cache


def width(cache) -> int:
    """Number of self-attention columns (cache slots) per row."""
    return int(_self_attention(cache).get_seq_length())


def batch_size(cache) -> int:
    """Number of rows."""
    layers = _layers(_self_attention(cache))
    return int(layers[0].keys.shape[0]) if layers else 0


def select(cache, rows: torch.Tensor, first_column: int = 0, first_cross_column: int = 0):
    """Keep `rows` (1-D index tensor) and drop the columns left of `first_column` (all-pad columns);
    for an encoder-decoder cache also the cross-attention columns left of `first_cross_column`."""
    if isinstance(cache, EncoderDecoderCache):
        # Built from two filled caches, EncoderDecoderCache marks every cross layer as computed: reused as is.
        return EncoderDecoderCache(select(cache.self_attention_cache, rows, first_column),
                                   select(cache.cross_attention_cache, rows, first_cross_column))
    return _build([(layer.keys[rows, :, first_column:], layer.values[rows, :, first_column:])
                   for layer in _layers(cache)])


def _left_pad(tensor: torch.Tensor, num_columns: int) -> torch.Tensor:
    # [B, H, T, d] -> [B, H, T + num_columns, d], zeros on the left of the sequence axis
    return F.pad(tensor, (0, 0, num_columns, 0)) if num_columns else tensor


def merge(first, second):
    """Rows of `first` then rows of `second`, the narrower left-padded to the wider one's width
    (self-attention and cross-attention caches each to their own common width)."""
    if isinstance(first, EncoderDecoderCache):
        return EncoderDecoderCache(merge(first.self_attention_cache, second.self_attention_cache),
                                   merge(first.cross_attention_cache, second.cross_attention_cache))
    width_a, width_b = width(first), width(second)
    target = max(width_a, width_b)
    pairs = []
    for a, b in zip(_layers(first), _layers(second), strict=True):
        keys = torch.cat([_left_pad(a.keys, target - width_a), _left_pad(b.keys, target - width_b)])
        values = torch.cat([_left_pad(a.values, target - width_a), _left_pad(b.values, target - width_b)])
        pairs.append((keys, values))
    return _build(pairs)


def truncate(cache, num_columns: int) -> None:
    """Undo a failed forward: cut every self-attention layer back to `num_columns` (some may have grown);
    a filled cross-attention cache never grows."""
    for layer in _layers(_self_attention(cache)):
        if layer.keys.shape[-2] > num_columns:
            layer.keys = layer.keys[:, :, :num_columns]
            layer.values = layer.values[:, :, :num_columns]
