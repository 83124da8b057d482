"""The slot engine's native decode kernel (native/slot_decode.cpp): built once per process with the
system's C++ compiler, called through ctypes.

One call per layer stores the step's new keys and values in the pool and computes every decoding row's
attention over its own slot's columns (each row reads only its own `position + 1` columns, once); a row
that started from its task's cached virtual-token KV reads those columns from that one shared copy. On CPU
this replaces an index_put per tensor and a masked SDPA over the widest row. It is built for this machine
(`-march=native`) in a private temporary folder, so a build never meets another CPU. Without a compiler, or
for dtypes and devices it does not cover, the attention glue keeps the SDPA path, which computes the same.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "slot_decode.cpp"
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16"}
# Reassociation lets the compiler vectorize the dot products (sums in another order: within 1 ulp-ish of
# SDPA's, far inside the parity tolerances); no -ffast-math, so NaN and infinities keep their meaning.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fPIC", "-std=c++17"]
_Int64x3 = ctypes.c_int64 * 3
_lock = threading.Lock()
_built: dict[str, NativeDecode | None] = {}


class NativeDecode:
    """The loaded kernel: `run` does one layer."""

    def __init__(self, library: ctypes.CDLL):
        self._functions = {}
        for dtype, name in DTYPES.items():
            fn = getattr(library, f"slot_decode_{name}")
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, _Int64x3, ctypes.c_void_p, _Int64x3, ctypes.c_void_p, _Int64x3,
                           ctypes.c_void_p,
                           ctypes.c_void_p, _Int64x3, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p,
                           _Int64x3, ctypes.c_int]
            self._functions[dtype] = fn

    @staticmethod
    def covers(dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the kernel computes for tensors of this dtype on this device (CPU, a dtype it was built for)."""
        return torch.device(device).type == "cpu" and dtype in DTYPES

    def run(self, layer: int, query: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
            keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
            shared: SharedPrefixes, scale: float, out: torch.Tensor) -> None:
        """query `[N, H, d]`, new_keys/new_values `[N, KVH, d]` (innermost dim contiguous, any other
        strides, each its own); keys/values: this layer's pool `[slots, KVH, tokens, d]`; slots/positions `[N]` int64
        contiguous, the first `shared.num_decode` tokens being the decoding rows; out `[N, H, d]` (its first
        num_decode rows are written)."""
        num_tokens, num_heads, head_dim = query.shape
        self._functions[query.dtype](
            query.data_ptr(), _strides(query), new_keys.data_ptr(), _strides(new_keys), new_values.data_ptr(),
            _strides(new_values),
            keys.data_ptr(), values.data_ptr(), _Int64x3(*keys.stride()[:3]), slots.data_ptr(),
            positions.data_ptr(), shared.keys.data_ptr(), shared.values.data_ptr(), shared.num_tokens.data_ptr(),
            layer, num_tokens, shared.num_decode, num_heads, new_keys.shape[1], head_dim, scale, out.data_ptr(),
            _strides(out), torch.get_num_threads())


@dataclass
class SharedPrefixes:
    """Per decoding row, where the kernel reads its first columns instead of its slot: the addresses of a
    task's cached keys and values (`[layers, KVH, n, d]`, contiguous) and n; 0, 0 and 0 for none. The rows'
    PrefixKV objects are held by the requests for as long as they run (see kv_pool.shared_prefixes)."""

    keys: torch.Tensor  # [num_decode] int64
    values: torch.Tensor  # [num_decode] int64
    num_tokens: torch.Tensor  # [num_decode] int64

    @property
    def num_decode(self) -> int:
        """Decoding rows this step."""
        return int(self.num_tokens.shape[0])


def _strides(t: torch.Tensor) -> _Int64x3:
    return _Int64x3(t.stride(0), t.stride(1), 0)


def load() -> NativeDecode | None:
    """The kernel, built on first use (about a second); None, with the reason logged once, when it
    cannot be (no C++ compiler, a failed build) or PROMPTSERVE_NATIVE_DECODE=0."""
    with _lock:
        if "kernel" not in _built:
            _built["kernel"] = _build()
        return _built["kernel"]


def _build() -> NativeDecode | None:
    if os.environ.get("PROMPTSERVE_NATIVE_DECODE", "1") == "0":
        log.info("engine: native decode kernel off (PROMPTSERVE_NATIVE_DECODE=0)")
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("engine: no C++ compiler, decode attention runs through SDPA")
        return None
    folder = Path(tempfile.mkdtemp(prefix="promptserve-native-"))
    obj, lib = folder / "slot_decode.o", folder / "libslot_decode.so"
    try:
        # Linked without -fopenmp: the OpenMP symbols bind to the runtime torch has loaded already.
        subprocess.run([compiler, *FLAGS, "-c", str(SOURCE), "-o", str(obj)], check=True, capture_output=True)
        subprocess.run([compiler, "-shared", str(obj), "-o", str(lib)], check=True, capture_output=True)
        return NativeDecode(ctypes.CDLL(str(lib)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("engine: native decode kernel not built (%s %s), decode attention runs through SDPA",
                    exc, detail.decode(errors="replace")[-300:])
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped
