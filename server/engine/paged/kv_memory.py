"""PagedKV: the engine-owned KV memory of causal models, allocated once and written in place.

Layout (known to this module only): per layer, keys and values of shape `[kv_heads, num_blocks *
block_tokens, head_dim]`. Block b is rows b*B..(b+1)*B-1 of every head. A request's context position p lives
in row `table[p // B] * B + p % B` of its block table. Blocks that follow each other in a table and in
memory make one run of rows, read as a plain view. A prefill reads a table of several runs as one view per
run (or copied together, for the layers that need one tensor), or the native prefill kernel reads the runs
in place; decode reads blocks in place in the native kernel, or gathered for SDPA.

Memory is zeroed once at allocation: rows a step reads but masks out then hold finite values, which
attention multiplies by zero weights (garbage could be NaN, and 0 * NaN is NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from server.engine.paged.cpu.huge_pages import advise_huge_pages
from server.engine.paged.cpu.native_decode import DecodeReads, NativeDecode
from server.engine.paged.cpu.native_prefill import NativePrefill


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


class PagedKV:
    """The KV tensors; `write`, `context`, `write_and_decode` and `prefill` are called by the attention glue
    per layer."""

    def __init__(self, geometry: KVGeometry, num_blocks: int, block_tokens: int, native: NativeDecode | None = None,
                 native_prefill: NativePrefill | None = None):
        if num_blocks < 1 or block_tokens < 1 or block_tokens & (block_tokens - 1):
            raise ValueError(f"KV memory needs blocks of a power-of-two size, at least one ({num_blocks} x "
                             f"{block_tokens})")
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        shape = (geometry.num_kv_heads, num_blocks * block_tokens, geometry.head_dim)
        self._keys = [_zeros(shape, geometry) for _ in range(geometry.num_layers)]
        self._values = [_zeros(shape, geometry) for _ in range(geometry.num_layers)]
        self._native = native if native is not None and native.covers(geometry.dtype, geometry.device) else None
        covered = native_prefill is not None and native_prefill.covers(geometry.dtype, geometry.device,
                                                                       geometry.head_dim)
        self._native_prefill = native_prefill if covered else None

    @property
    def has_native_decode(self) -> bool:
        """Whether `write_and_decode` can be used (the kernel was built and covers this memory)."""
        return self._native is not None

    @property
    def has_native_prefill(self) -> bool:
        """Whether `prefill` can be used (the prefill kernel was built and covers this memory)."""
        return self._native_prefill is not None

    @property
    def num_tokens(self) -> int:
        """Context positions the memory holds, in all."""
        return self.num_blocks * self.block_tokens

    @property
    def num_bytes(self) -> int:
        """Memory allocated (all blocks, all layers)."""
        return self.num_tokens * self.geometry.bytes_per_token

    def rows(self, table: list[int], positions: range | list[int]) -> list[int]:
        """The KV rows of context `positions` of a request with block `table`."""
        size = self.block_tokens
        return [table[p // size] * size + p % size for p in positions]

    def write(self, layer: int, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store new tokens: token t at row rows[t]; keys/values `[N, kv_heads, head_dim]`."""
        self._keys[layer][:, rows] = keys.transpose(0, 1)
        self._values[layer][:, rows] = values.transpose(0, 1)

    def context(self, layer: int, reads: ContextReads) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[1, kv_heads, T, head_dim]` of one request's first T positions: a view when its
        blocks are one run, else its runs copied together."""
        keys, values = self.pieces(layer, reads, reads.num_tokens)
        if len(keys) == 1:
            return keys[0], values[0]
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def pieces(self, layer: int, reads: ContextReads, num_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views `[1, kv_heads, n, head_dim]` of the keys and of the values of a request's first `num_tokens`
        positions, one per run of its blocks, in order (nothing copied)."""
        keys, values = [], []
        for first_row, length in reads.runs:
            take = min(length, num_tokens)
            if take <= 0:
                break
            keys.append(self._keys[layer][None, :, first_row:first_row + take])
            values.append(self._values[layer][None, :, first_row:first_row + take])
            num_tokens -= take
        return keys, values

    def gather(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[R, kv_heads, W, head_dim]` of `rows` `[R, W]` (SDPA decode without the kernel)."""
        flat = rows.reshape(-1)
        shape = (self.geometry.num_kv_heads, *rows.shape, self.geometry.head_dim)
        keys = self._keys[layer].index_select(1, flat).view(shape).transpose(0, 1)
        values = self._values[layer].index_select(1, flat).view(shape).transpose(0, 1)
        return keys, values

    def write_and_decode(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         rows: torch.Tensor, reads: DecodeReads, scale: float, out: torch.Tensor, window: int = 0,
                         softcap: float = 0.0) -> None:
        """`write`, then the attention of the first `reads.num_decode` tokens (decoding rows) over their
        contexts into `out[:num_decode]`, in one native call; queries `[N, H, d]`; `window` and `softcap`:
        the layer's variants (0: none, see NativeDecode.run)."""
        self._native.run(queries, keys, values, self._keys[layer], self._values[layer], rows, reads, scale, out,
                         window, softcap)

    def prefill(self, layer: int, queries: torch.Tensor, reads: ContextReads, start: int, scale: float,
                out: torch.Tensor) -> None:
        """The attention of a prefill chunk's queries `[T, H, d]` (positions start .. start + T - 1, whose keys
        and values are written already) over its context `reads`, into `out` `[T, H, d]`, in one native call."""
        self._native_prefill.run(queries, self._keys[layer], self._values[layer], reads.run_table, start, scale, out)

    def copy_block(self, source: int, target: int) -> None:
        """Copy one block's keys and values in every layer (tests)."""
        size = self.block_tokens
        for cache in (*self._keys, *self._values):
            cache[:, target * size:(target + 1) * size] = cache[:, source * size:(source + 1) * size]


@dataclass
class ContextReads:
    """Where one request's first `num_tokens` positions are: runs of consecutive rows, in context order."""

    num_tokens: int
    runs: list[tuple[int, int]]  # (first row, positions) of each run of blocks that follow in memory

    @cached_property
    def run_table(self) -> torch.Tensor:
        """`runs` as an int64 tensor `[R, 2]` (the native prefill kernel's input; built once for all layers)."""
        return torch.tensor(self.runs, dtype=torch.int64).reshape(-1, 2)

    @property
    def is_one_run(self) -> bool:
        """Whether the positions are one run of rows (read as a view)."""
        return len(self.runs) == 1

    @staticmethod
    def of(memory: PagedKV, table: list[int], num_tokens: int) -> ContextReads:
        """The reads of a request with block `table` over its first `num_tokens` positions."""
        size = memory.block_tokens
        blocks = table[:-(-num_tokens // size)]
        runs: list[list[int]] = []
        for block in blocks:
            if runs and runs[-1][0] + runs[-1][1] == block * size:
                runs[-1][1] += size
            else:
                runs.append([block * size, size])
        runs[-1][1] -= len(blocks) * size - num_tokens  # the last block may be partly filled
        return ContextReads(num_tokens, [(first, length) for first, length in runs])


def _zeros(shape: tuple[int, ...], geometry: KVGeometry) -> torch.Tensor:
    """Zeroed memory; on CPU asked to be backed by huge pages before it is first touched (decode reads
    scattered blocks: with 4 KiB pages, TLB misses cost about 5% of a step)."""
    tensor = torch.empty(shape, dtype=geometry.dtype, device=geometry.device)
    if tensor.device.type == "cpu":
        advise_huge_pages(tensor)
    return tensor.zero_()
