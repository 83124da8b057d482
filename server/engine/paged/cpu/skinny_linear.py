"""Float32 linear layers of 2 to 15 rows (skinny_linear.cpp): each weight read once for all rows.

A decode step of a few rows is bound by reading the weights. `aten::linear` reads them about 1.7 times at
2 to 15 rows and oneDNN's prepacked product no less, so this kernel takes those row counts in the packed
op (packed_linear.py). Measured on SmolLM2-135M's 211 layer weights (2-core Xeon, float32, one pass over
all): 4 rows 28.3 ms with `aten::linear`, 20.4 ms here; 8 rows 34.3 and 23.6 ms; its 49152 x 576 output
layer at 4 rows 7.8 ms, packed 4.9, here 2.9. One row stays on `aten::linear` (a matrix-vector product,
as fast). Built once per process (native_build.py) and checked against float64 before use.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from server.engine.paged.cpu import native_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "skinny_linear.cpp"
MIN_ROWS, MAX_ROWS = 2, 15
# Relative error allowed against float64 (measured 4e-7, as aten::linear's own); a wrong row, column or
# bias is off by far more.
_TOLERANCE = 1e-5
_lock = threading.Lock()
_built: dict[str, SkinnyLinear | None] = {}


class SkinnyLinear:
    """The loaded kernel: `covers` says whether `run` takes a product."""

    def __init__(self, library: ctypes.CDLL):
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        self._function = library.skinny_linear_float32
        self._function.restype = ctypes.c_int
        self._function.argtypes = [pointer, integer, pointer, pointer, pointer, integer, integer, integer,
                                   ctypes.c_int]

    @staticmethod
    def covers(rows: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `run(rows, weight, ...)` is computed here: float32 on the CPU, 2 to 15 rows `[M, K]` with
        K a multiple of 16, contiguous within a row; the weight `[N, K]` contiguous."""
        return (rows.dtype == torch.float32 and weight.dtype == torch.float32 and rows.device.type == "cpu"
                and MIN_ROWS <= rows.shape[0] <= MAX_ROWS and rows.shape[1] % 16 == 0 and rows.stride(1) == 1
                and weight.is_contiguous())

    def run(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`F.linear(rows, weight, bias)` for rows `[M, K]` that `covers` accepts: `[M, N]`."""
        out = torch.empty(rows.shape[0], weight.shape[0], dtype=rows.dtype)
        if bias is not None:
            bias = bias.contiguous()
        status = self._function(rows.data_ptr(), rows.stride(0), weight.data_ptr(),
                                None if bias is None else bias.data_ptr(), out.data_ptr(), rows.shape[0],
                                weight.shape[0], weight.shape[1], torch.get_num_threads())
        if status != 0:  # not reached for shapes `covers` accepts from an accepted kernel; kept safe
            return F.linear(rows, weight, bias)
        return out


def load() -> SkinnyLinear | None:
    """The kernel, built on first use and checked against float64; None (logged once) when it cannot be
    built, does not vectorize on this machine, or disagrees."""
    with _lock:
        if "kernel" not in _built:
            library = native_build.build(SOURCE, "few-row products run through aten::linear")
            _built["kernel"] = None if library is None else _accept(SkinnyLinear(library))
        return _built["kernel"]


def loaded() -> SkinnyLinear | None:
    """The kernel if `load` built and accepted it (no build, no lock: called for every product)."""
    return _built.get("kernel")


def _accept(kernel: SkinnyLinear) -> SkinnyLinear | None:
    """`kernel` if its products (every row count, odd and even widths, with and without bias, rows with a
    stride) agree with float64 within tolerance."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(37, 48, generator=gen), torch.randn(37, generator=gen)
    probe, out = torch.zeros(MIN_ROWS, 48), torch.empty(MIN_ROWS, 37)  # both held until the call returns
    if kernel._function(probe.data_ptr(), 48, weight.data_ptr(), None, out.data_ptr(), MIN_ROWS, 37, 48, 1) != 0:
        log.info("engine: few-row kernel not vectorized on this machine, aten::linear keeps those products")
        return None
    for num_rows in range(MIN_ROWS, MAX_ROWS + 1):
        rows = torch.randn(num_rows, 64, generator=gen)[:, 8:56]  # a row stride of 64, not 48
        for b in (None, bias):
            want = F.linear(rows.double(), weight.double(), None if b is None else b.double())
            error = float((kernel.run(rows, weight, b).double() - want).abs().max() / want.abs().max())
            if not error <= _TOLERANCE:
                log.warning("engine: few-row kernel refused (%d rows differ from float64 by %.2e), aten::linear "
                            "keeps those products", num_rows, error)
                return None
    return kernel
