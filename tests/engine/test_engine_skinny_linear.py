"""The few-row kernel (server/engine/paged/cpu/skinny_linear.py): float64's products at 1 to 20 float32 rows
and 1 to 7 bfloat16 ones, used by the packed op at exactly those row counts, refused when it disagrees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.engine.paged.cpu import native_build, packed_linear, skinny_linear

_CAN_BUILD = shutil.which("g++") is not None and "avx512f" in Path("/proc/cpuinfo").read_text()


@pytest.fixture(scope="module")
def kernel() -> skinny_linear.SkinnyLinear:
    built = skinny_linear.load()
    if built is None:
        assert not _CAN_BUILD, "a compiler and AVX-512 are here, yet the kernel was not built or was refused"
        pytest.skip("no C++ compiler or no AVX-512 on this machine: aten::linear keeps few-row products")
    return built


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


CASES = [(torch.float32, n) for n in range(1, 21)] + [(torch.bfloat16, n) for n in range(1, 8)]


@pytest.mark.parametrize("dtype, num_rows", CASES, ids=[f"{str(d)[6:]}-{n}" for d, n in CASES])
@pytest.mark.parametrize("with_bias", [False, True])
def test_products_match_float64(kernel, dtype, num_rows, with_bias):
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(1537, 576, generator=gen).to(dtype)  # an odd number of outputs: the last pair is one
    bias = torch.randn(1537, generator=gen).to(dtype) if with_bias else None
    rows = torch.randn(num_rows, 640, generator=gen).to(dtype)[:, 32:608]  # rows a stride apart, as a slice
    assert kernel.covers(rows, weight)
    want = F.linear(rows.double(), weight.double(), None if bias is None else bias.double())
    assert _relative_error(kernel.run(rows, weight, bias), want) <= {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]


def test_it_covers_only_what_it_computes(kernel):
    weight = torch.randn(32, 64)
    assert not kernel.covers(torch.randn(21, 64), weight)  # from about 24 rows the packed product is faster
    assert not kernel.covers(torch.randn(4, 72), torch.randn(32, 72))  # widths must be multiples of 16
    assert not kernel.covers(torch.randn(8, 64, dtype=torch.bfloat16), weight.bfloat16())  # packed from 8
    assert not kernel.covers(torch.randn(4, 64, dtype=torch.bfloat16), weight)  # mixed dtypes
    assert not kernel.covers(torch.randn(4, 64), torch.randn(64, 32).t())  # a transposed weight


@pytest.mark.parametrize("dtype, num_rows, routed", [(torch.float32, 1, True), (torch.float32, 20, True),
                                                     (torch.float32, 21, False),
                                                     (torch.bfloat16, 1, True), (torch.bfloat16, 7, True),
                                                     (torch.bfloat16, 8, False)])
def test_the_packed_op_sends_its_row_counts_to_it(kernel, monkeypatch, dtype, num_rows, routed):
    calls = []

    class Counting(skinny_linear.SkinnyLinear):
        def run(self, rows, weight, bias):
            calls.append(rows.shape[0])
            return super().run(rows, weight, bias)

    counting = Counting.__new__(Counting)
    counting.__dict__.update(kernel.__dict__)
    model = nn.Linear(64, 48).to(dtype)
    x = torch.randn(1, num_rows, 64).to(dtype)
    want = F.linear(x.double(), model.weight.double(), model.bias.double())
    packed_linear.pack(model)
    monkeypatch.setitem(native_build.made, skinny_linear.SOURCE, counting)
    with torch.inference_mode():
        got = model(x)
    assert calls == ([num_rows] if routed else [])
    assert got.shape == (1, num_rows, 48) and _relative_error(got, want) <= {torch.float32: 1e-5,
                                                                               torch.bfloat16: 1e-2}[dtype]


def test_a_kernel_that_disagrees_is_refused(kernel, caplog):
    class OffByALittle(skinny_linear.SkinnyLinear):
        def run(self, rows, weight, bias):
            return super().run(rows, weight, bias) * (1 + 1e-4)

    wrong = OffByALittle.__new__(OffByALittle)
    wrong.__dict__.update(kernel.__dict__)
    assert skinny_linear._accept(kernel) is kernel
    assert skinny_linear._accept(wrong) is None
    assert "refused" in caplog.text
