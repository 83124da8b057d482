"""Linear layers of a few rows (skinny_linear.cpp): each weight read once for all rows.

A decode step of a few rows is bound by reading the weights. In float32, `aten::linear` reads them about
1.7 times at 2 to 15 rows and oneDNN's prepacked product no less; in bfloat16, the prepacked product pays a
fixed cost per call that small weights never amortize. This kernel takes those row counts in the packed op
(packed_linear.py). Measured on the 2-core Xeon, one pass over a model's layer weights, kernel against the
faster of `aten::linear` and the packed product: float32, the 8x512 model's 56 weights at 1 / 4 / 16 / 24
rows 2.1 / 2.2 / 4.5 / 7.7 ms against 2.6 / 4.1 / 6.6 / 7.6, SmolLM2-135M's 210 at the same rows 16.0 /
19.9 / 30.3 / 39.9 against 16.5 / 29.6 / 38.2 / 41.7; bfloat16 at one row 1.2 against 2.4 ms (8x512) and
8.8 against 13.7 (SmolLM2), even at 8 rows. Built once per process (native_build.py) and checked against
float64 before use.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from server.engine.paged.cpu import native_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "skinny_linear.cpp"
# The row counts each dtype takes here (inclusive); others keep aten::linear or the packed product.
ROWS = {torch.float32: (1, 20), torch.bfloat16: (1, 7)}
MAX_ROWS = max(high for _, high in ROWS.values())
# Relative error allowed against float64: float32 measured 4e-7, as aten::linear's own; bfloat16 rounds its
# output once (2^-9). A wrong row, column or bias is off by far more.
_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


class SkinnyLinear:
    """The loaded kernel: `covers` says whether `run` takes a product."""

    def __init__(self, library: ctypes.CDLL):
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        self._functions = {}
        for dtype in ROWS:
            function = getattr(library, f"skinny_linear_{str(dtype).removeprefix('torch.')}")
            function.restype = ctypes.c_int
            function.argtypes = [pointer, integer, pointer, pointer, pointer, integer, integer, integer,
                                 ctypes.c_int]
            self._functions[dtype] = function

    @staticmethod
    def covers(rows: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `run(rows, weight, ...)` is computed here: on the CPU, rows `[M, K]` of a dtype and count in
        ROWS, K a multiple of 16, contiguous within a row; the weight `[N, K]` of the same dtype, contiguous."""
        low, high = ROWS.get(rows.dtype, (1, 0))
        return (low <= rows.shape[0] <= high and weight.dtype == rows.dtype and rows.device.type == "cpu"
                and rows.shape[1] % 16 == 0 and rows.stride(1) == 1 and weight.is_contiguous())

    def run(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`F.linear(rows, weight, bias)` for rows `[M, K]` that `covers` accepts: `[M, N]`."""
        out = torch.empty(rows.shape[0], weight.shape[0], dtype=rows.dtype)
        if bias is not None:
            bias = bias.to(rows.dtype).contiguous()
        status = self._functions[rows.dtype](rows.data_ptr(), rows.stride(0), weight.data_ptr(),
                                             None if bias is None else bias.data_ptr(), out.data_ptr(),
                                             rows.shape[0], weight.shape[0], weight.shape[1],
                                             torch.get_num_threads())
        if status != 0:  # not reached for shapes `covers` accepts from an accepted kernel; kept safe
            return F.linear(rows, weight, bias)
        return out


def load() -> SkinnyLinear | None:
    """The kernel, built on first use and checked against float64; None (logged once) when it cannot be
    built, does not vectorize on this machine, or disagrees."""
    return native_build.once(SOURCE, _build)


def _build() -> SkinnyLinear | None:
    library = native_build.build(SOURCE, "few-row products run through aten::linear")
    return None if library is None else _accept(SkinnyLinear(library))


def loaded() -> SkinnyLinear | None:
    """The kernel if `load` built and accepted it (no build, no lock: called for every product)."""
    return native_build.made.get(SOURCE)


def _accept(kernel: SkinnyLinear) -> SkinnyLinear | None:
    """`kernel` if its products (every row count it takes, in each dtype, an odd number of outputs, with and
    without bias, rows a stride apart) agree with float64 within tolerance."""
    gen = torch.Generator().manual_seed(0)
    rows, weight, out = torch.zeros(2, 48), torch.zeros(37, 48), torch.empty(2, 37)  # held during the call
    if kernel._functions[torch.float32](rows.data_ptr(), 48, weight.data_ptr(), None, out.data_ptr(), 2, 37, 48, 1):
        log.info("engine: few-row kernel not vectorized on this machine, aten::linear keeps those products")
        return None
    for dtype, (low, high) in ROWS.items():
        weight, bias = torch.randn(37, 48, generator=gen).to(dtype), torch.randn(37, generator=gen).to(dtype)
        for num_rows in range(low, high + 1):
            rows = torch.randn(num_rows, 64, generator=gen).to(dtype)[:, 8:56]  # a row stride of 64, not 48
            for b in (None, bias):
                want = F.linear(rows.double(), weight.double(), None if b is None else b.double())
                error = float((kernel.run(rows, weight, b).double() - want).abs().max() / want.abs().max())
                if not error <= _TOLERANCE[dtype]:
                    log.warning("engine: few-row kernel refused (%s, %d rows, differs from float64 by %.2e), "
                                "aten::linear keeps those products", dtype, num_rows, error)
                    return None
    return kernel
