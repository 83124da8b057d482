"""The paged engine's native prefill attention (paged_prefill.cpp): built once per process with the system's
C++ compiler (native_build.py), called through ctypes.

One call computes one prefill chunk's attention in one layer: every query position over its request's
context up to itself, read in place through the runs of its blocks (no copy of a shared prefix, no mask, no
merge of pieces). On CPU, float32, AVX-512 and head sizes 16 to 128 in steps of 16, 160, 192 or 256;
elsewhere, or without a compiler, the attention glue keeps SDPA (prefill_attention.py), which computes the
same.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from server.engine.paged.cpu import native_build

SOURCE = Path(__file__).parent / "paged_prefill.cpp"
DTYPES = {torch.float32: "float32"}  # bfloat16: torch's flash attention on AMX is faster (paged_prefill.cpp)
_Int64x2 = ctypes.c_int64 * 2


class NativePrefill:
    """The loaded kernel: `run` does one chunk in one layer."""

    def __init__(self, library: ctypes.CDLL):
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        self._covers = library.paged_prefill_covers
        self._covers.restype, self._covers.argtypes = ctypes.c_int, [integer]
        self._functions = {}
        for dtype, name in DTYPES.items():
            fn = getattr(library, f"paged_prefill_{name}")
            fn.restype = ctypes.c_int
            fn.argtypes = [pointer, _Int64x2, pointer, pointer, _Int64x2, pointer, integer, integer, integer, integer,
                           integer, integer, ctypes.c_double, pointer, _Int64x2, ctypes.c_int]
            self._functions[dtype] = fn

    def covers(self, dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
        """Whether chunks of this dtype, device and head size are computed here."""
        return torch.device(device).type == "cpu" and dtype in DTYPES and bool(self._covers(head_dim))

    def run(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, runs: torch.Tensor, start: int,
            scale: float, out: torch.Tensor) -> None:
        """query `[T, H, d]` (positions start .. start + T - 1; innermost dim contiguous, other strides any);
        keys/values: one layer's `[KVH, rows, d]`, holding the chunk's own keys and values already; runs
        `[R, 2]` int64 contiguous: (first row, positions) of each run of the request's blocks, in context
        order, covering at least start + T positions; out `[T, H, d]`, written."""
        num_tokens, num_heads, head_dim = query.shape
        done = self._functions[query.dtype](
            query.data_ptr(), _strides(query), keys.data_ptr(), values.data_ptr(), _strides(keys), runs.data_ptr(),
            runs.shape[0], start, num_tokens, num_heads, keys.shape[0], head_dim, scale, out.data_ptr(),
            _strides(out), torch.get_num_threads())
        if not done:
            raise ValueError(f"native prefill does not cover head_dim {head_dim} (check `covers` first)")


def _strides(t: torch.Tensor) -> _Int64x2:
    return _Int64x2(t.stride(0), t.stride(1))


def load() -> NativePrefill | None:
    """The kernel, built on first use (about a second); None, with the reason logged once, when it
    cannot be (no C++ compiler, a failed build) or PROMPTSERVE_NATIVE_PREFILL=0."""
    return native_build.once(SOURCE, _build)


def _build() -> NativePrefill | None:
    library = native_build.build(SOURCE, "prefill attention runs through SDPA", switch="PROMPTSERVE_NATIVE_PREFILL")
    return None if library is None else NativePrefill(library)
