"""KVPool: the engine-owned KV memory of causal models, allocated once and written in place.

Layout (known to this module only): per layer, keys and values of shape `[num_slots, kv_heads,
slot_tokens, head_dim]`. A running request owns one slot; cache column j of its slot holds the keys and
values of its context token at position j (0 = its first virtual token). Used slots are always
0..num_used-1: when a request leaves, the last used slot is moved into the hole (a copy of one request's
columns, never of the whole cache), so that decode attends over the plain view `[:num_used]`.

Memory is zeroed once at allocation: masked columns then hold finite values, which attention multiplies
by zero weights (garbage could be NaN, and 0 * NaN is NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.huge_pages import advise_huge_pages
from server.engine.native_decode import NativeDecode, SharedPrefixes


@dataclass(frozen=True)
class KVGeometry:
    """What one token's keys and values look like in every layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        """Keys + values of one token in all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


@dataclass
class PrefixKV:
    """The keys and values of a context's first `num_tokens` positions, outside any slot."""

    keys: torch.Tensor  # [layers, kv_heads, n, head_dim]
    values: torch.Tensor  # [layers, kv_heads, n, head_dim]

    @property
    def num_tokens(self) -> int:
        """n: how many positions it covers."""
        return int(self.keys.shape[2])

    @property
    def num_bytes(self) -> int:
        """Memory held."""
        return 2 * self.keys.numel() * self.keys.element_size()


class KVPool:
    """Slots of KV memory; `write` and `view` are called by the attention glue for each layer."""

    def __init__(self, geometry: KVGeometry, num_slots: int, slot_tokens: int, native: NativeDecode | None = None):
        if num_slots < 1 or slot_tokens < 1:
            raise ValueError(f"a KV pool needs at least one slot of one token (got {num_slots} x {slot_tokens})")
        self.geometry = geometry
        self.num_slots = num_slots
        self.slot_tokens = slot_tokens
        shape = (num_slots, geometry.num_kv_heads, slot_tokens, geometry.head_dim)
        self._keys = [_zeros(shape, geometry) for _ in range(geometry.num_layers)]
        self._values = [_zeros(shape, geometry) for _ in range(geometry.num_layers)]
        self._heads = torch.arange(geometry.num_kv_heads, device=geometry.device)
        self._native = native if native is not None and native.covers(geometry.dtype, geometry.device) else None
        self.num_used = 0

    @property
    def has_native_decode(self) -> bool:
        """Whether `write_and_decode` can be used (the kernel was built and covers this pool)."""
        return self._native is not None

    @property
    def num_bytes(self) -> int:
        """Memory allocated (all slots, all layers)."""
        return self.num_slots * self.slot_tokens * self.geometry.bytes_per_token

    @property
    def num_free(self) -> int:
        """Slots available to new requests."""
        return self.num_slots - self.num_used

    def allocate(self) -> int:
        """A free slot (the next after the used ones)."""
        if self.num_used >= self.num_slots:
            raise RuntimeError("no free KV slot")  # the scheduler admits only when one is free: a bug
        self.num_used += 1
        return self.num_used - 1

    def release(self, slot: int, num_tokens_of_last: int) -> int | None:
        """Free `slot`. The last used slot moves into it (its first `num_tokens_of_last` columns are
        copied); returns the slot that moved, or None when `slot` was the last."""
        last = self.num_used - 1
        if not 0 <= slot <= last:
            raise ValueError(f"slot {slot} is not in use")
        self.num_used -= 1
        if slot == last:
            return None
        for cache in (*self._keys, *self._values):
            cache[slot, :, :num_tokens_of_last] = cache[last, :, :num_tokens_of_last]
        return last

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store new tokens: token t at (slots[t], positions[t]); keys/values `[N, kv_heads, head_dim]`."""
        # All-advanced indices: with a slice between them, index_put permutes the whole tensor (ms, not µs).
        index = (slots[:, None], self._heads[None, :], positions[:, None])  # broadcast to [N, kv_heads]
        self._keys[layer].index_put_(index, keys)
        self._values[layer].index_put_(index, values)

    def write_and_decode(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         slots: torch.Tensor, positions: torch.Tensor, shared: SharedPrefixes, scale: float,
                         out: torch.Tensor) -> None:
        """`write`, then the attention of the first `shared.num_decode` tokens (decoding rows) over their
        columns 0..position into `out[:num_decode]`, in one native call; queries `[N, H, d]`."""
        self._native.run(layer, queries, keys, values, self._keys[layer], self._values[layer], slots, positions,
                         shared, scale, out)

    def shared_prefixes(self, prefixes: list[PrefixKV | None]) -> SharedPrefixes:
        """The native kernel's table for one step's decoding rows: each row's cached task prefix (the same
        keys and values as its slot's first columns), or None. The caller keeps the PrefixKVs alive."""
        keys, values, counts = [], [], []
        for prefix in prefixes:
            if prefix is None:
                keys.append(0), values.append(0), counts.append(0)
                continue
            if not (prefix.keys.is_contiguous() and prefix.values.is_contiguous()):
                raise ValueError("a shared prefix must be contiguous [layers, kv_heads, n, head_dim]")
            keys.append(prefix.keys.data_ptr()), values.append(prefix.values.data_ptr())
            counts.append(prefix.num_tokens)
        return SharedPrefixes(torch.tensor(keys, dtype=torch.int64), torch.tensor(values, dtype=torch.int64),
                              torch.tensor(counts, dtype=torch.int64))

    def view(self, layer: int, first_slot: int, num_slots: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[num_slots, kv_heads, num_tokens, head_dim]` of consecutive slots (no copy)."""
        rows, cols = slice(first_slot, first_slot + num_slots), slice(0, num_tokens)
        return self._keys[layer][rows, :, cols], self._values[layer][rows, :, cols]

    def load_prefix(self, slot: int, prefix: PrefixKV) -> None:
        """Copy a cached prefix into the first columns of `slot`."""
        n = prefix.num_tokens
        for layer in range(self.geometry.num_layers):
            self._keys[layer][slot, :, :n] = prefix.keys[layer]
            self._values[layer][slot, :, :n] = prefix.values[layer]

    def save_prefix(self, slot: int, num_tokens: int) -> PrefixKV:
        """A copy of the first `num_tokens` columns of `slot`, to reuse in other slots (contiguous, so
        that decoding rows can read it in place: `shared_prefixes`)."""
        keys = torch.stack([k[slot, :, :num_tokens] for k in self._keys])
        values = torch.stack([v[slot, :, :num_tokens] for v in self._values])
        return PrefixKV(keys, values)



def _zeros(shape: tuple[int, ...], geometry: KVGeometry) -> torch.Tensor:
    """Zeroed memory; on CPU asked to be backed by huge pages before it is first touched (decode reads
    scattered slots: with 4 KiB pages, TLB misses cost about 5% of a step)."""
    tensor = torch.empty(shape, dtype=geometry.dtype, device=geometry.device)
    if tensor.device.type == "cpu":
        advise_huge_pages(tensor)
    return tensor.zero_()
