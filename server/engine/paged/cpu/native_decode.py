"""The paged engine's native decode kernel (paged_decode.cpp): built once per process with the system's
C++ compiler (native_build.py), called through ctypes.

One call per layer stores the step's new keys and values in their KV rows and computes every decoding row's
attention over its own context, read in place through its block table (each row reads only its own
columns, once; rows sharing prefix blocks read the same memory). On CPU this replaces an index_put per
tensor and a gather of every row's blocks for SDPA. Without a compiler, or for dtypes and devices it does
not cover, the attention glue keeps the SDPA path, which computes the same.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from server.engine.paged.cpu import native_build

SOURCE = Path(__file__).parent / "paged_decode.cpp"
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16"}
_Int64x3 = ctypes.c_int64 * 3


class NativeDecode:
    """The loaded kernel: `run` does one layer."""

    def __init__(self, library: ctypes.CDLL):
        self._functions = {}
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        for dtype, name in DTYPES.items():
            fn = getattr(library, f"paged_decode_{name}")
            fn.restype = None
            fn.argtypes = [pointer, _Int64x3, pointer, _Int64x3, pointer, _Int64x3, pointer, pointer, _Int64x3,
                           pointer, pointer, integer, integer, pointer, integer, integer, integer, integer, integer,
                           ctypes.c_double, integer, ctypes.c_double, pointer, _Int64x3, ctypes.c_int]
            self._functions[dtype] = fn

    @staticmethod
    def covers(dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the kernel computes for tensors of this dtype on this device (CPU, a dtype it was built for)."""
        return torch.device(device).type == "cpu" and dtype in DTYPES

    def run(self, query: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, keys: torch.Tensor,
            values: torch.Tensor, write_rows: torch.Tensor, reads: DecodeReads, scale: float,
            out: torch.Tensor, window: int = 0, softcap: float = 0.0) -> None:
        """query `[N, H, d]`, new_keys/new_values `[N, KVH, d]` (innermost dim contiguous, any other strides,
        each its own); keys/values: one layer's `[KVH, rows, d]`; write_rows `[N]` int64 contiguous; the
        first `reads.num_decode` tokens are the decoding rows; out `[N, H, d]` (those rows are written).
        `window` > 0: a row of length L reads only its last `window` positions (L - window .. L - 1, itself
        included); `softcap` > 0: scores become softcap * tanh(scores / softcap) before the softmax."""
        num_tokens, num_heads, head_dim = query.shape
        self._functions[query.dtype](
            query.data_ptr(), _strides(query), new_keys.data_ptr(), _strides(new_keys), new_values.data_ptr(),
            _strides(new_values), keys.data_ptr(), values.data_ptr(), _strides(keys), write_rows.data_ptr(),
            reads.tables.data_ptr(), reads.tables.shape[1], reads.block_shift, reads.lengths.data_ptr(),
            num_tokens, reads.num_decode, num_heads, new_keys.shape[1], head_dim, scale, window, softcap,
            out.data_ptr(), _strides(out), torch.get_num_threads())


@dataclass
class DecodeReads:
    """What each decoding row reads: its block table (padded) and its context length."""

    tables: torch.Tensor  # [num_decode, max_blocks] int64, contiguous
    lengths: torch.Tensor  # [num_decode] int64
    block_shift: int  # log2 of the block size

    @property
    def num_decode(self) -> int:
        """Decoding rows this step."""
        return int(self.lengths.shape[0])


def _strides(t: torch.Tensor) -> _Int64x3:
    return _Int64x3(t.stride(0), t.stride(1), 0)


def load() -> NativeDecode | None:
    """The kernel, built on first use (about a second); None, with the reason logged once, when it
    cannot be (no C++ compiler, a failed build) or PROMPTSERVE_NATIVE_DECODE=0."""
    return native_build.once(SOURCE, _build)


def _build() -> NativeDecode | None:
    library = native_build.build(SOURCE, "decode attention runs through SDPA", switch="PROMPTSERVE_NATIVE_DECODE")
    return None if library is None else NativeDecode(library)
