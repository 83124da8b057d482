"""The native decode kernel (server/engine/native_decode.py) on tensors, no model: it stores each token's
keys and values where `KVPool.write` would, and its attention for decoding rows equals float64 SDPA over
each row's own columns, the first of them read from a shared task prefix where given (GQA, strided
inputs, scattered slots, float32, float64, bfloat16). It is refused
when it disagrees, and the engine falls back to SDPA when it cannot be built. Model-level parity with the
kernel on and off is in test_engine_parity."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.engine import native_check, native_decode
from server.engine.huge_pages import advise_huge_pages
from server.engine.kv_pool import KVGeometry, KVPool, PrefixKV

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def kernel():
    built = native_decode.load()
    if built is None:
        pytest.skip("no C++ compiler here: the engine runs decode attention through SDPA (tested elsewhere)")
    return built


def _geometry(dtype: torch.dtype, kv_heads: int = 2, head_dim: int = 16) -> KVGeometry:
    return KVGeometry(num_layers=2, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,heads", [(2, 8), (4, 4), (1, 3)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("head_dim", [16, 64, 24])  # multiples of 16 take the vector path on AVX-512 machines
def test_kernel_writes_like_the_pool_and_attends_like_sdpa(kernel, dtype, kv_heads, heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    geometry, num_slots, slot_tokens, layer = _geometry(dtype, kv_heads, head_dim), 5, 33, 1
    native, plain = KVPool(geometry, num_slots, slot_tokens, kernel), KVPool(geometry, num_slots, slot_tokens)
    assert native.has_native_decode and not plain.has_native_decode
    for pool in (native, plain):  # the same history in both
        keys, values = pool.view(layer, 0, num_slots, slot_tokens)
        keys.copy_(torch.randn(keys.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        values.copy_(torch.randn(values.shape, generator=torch.Generator().manual_seed(2)).to(dtype))
    # 4 decoding rows in scattered slots (one at column 0, one at the last column, one at a multiple of 16
    # columns: vectors of 16 with and without a tail), then 3 prefill tokens.
    slots, positions = torch.tensor([3, 0, 4, 1, 2, 2, 2]), torch.tensor([10, 0, 32, 15, 5, 6, 7])
    # Rows 0, 1 and 3 read their first 7 columns (row 1: its only one) from one shared task prefix.
    prefix = PrefixKV(*(torch.randn(2, kv_heads, 7, head_dim, generator=gen).to(dtype) for _ in range(2)))
    shared = native.shared_prefixes([prefix, prefix, None, prefix])
    # Strided like the model's: [H, N, d] and [KVH, N, d] transposed, as the attention glue hands them over.
    queries = torch.randn(heads, 7, head_dim, generator=gen).to(dtype).transpose(0, 1)
    new_keys, new_values = (torch.randn(kv_heads, 7, head_dim, generator=gen).to(dtype).transpose(0, 1)
                            for _ in range(2))
    out = torch.full((7, heads, head_dim), float("nan"), dtype=dtype)
    native.write_and_decode(layer, queries, new_keys, new_values, slots, positions, shared, 0.25, out)
    plain.write(layer, slots, positions, new_keys, new_values)
    for got, want in zip(native.view(layer, 0, num_slots, slot_tokens), plain.view(layer, 0, num_slots, slot_tokens)):
        assert torch.equal(got, want)
    keys, values = plain.view(layer, 0, num_slots, slot_tokens)
    for row in range(4):
        cols = slice(0, int(positions[row]) + 1)
        row_keys, row_values = keys[slots[row], :, cols].clone(), values[slots[row], :, cols].clone()
        if row != 2:
            n = min(7, row_keys.shape[1])
            row_keys[:, :n], row_values[:, :n] = prefix.keys[layer, :, :n], prefix.values[layer, :, :n]
        want = F.scaled_dot_product_attention(queries[row, :, None].double(), row_keys.double(),
                                              row_values.double(), scale=0.25, enable_gqa=True)[:, 0]
        error = (out[row].double() - want).abs().max() / want.abs().max()
        assert error <= TOLERANCE[dtype], f"row {row}: {error:.2e}"
    assert out[4:].isnan().all()  # prefill rows are left to SDPA


def test_a_shared_prefix_must_be_contiguous(kernel):
    pool = KVPool(_geometry(torch.float32), 2, 8, kernel)
    strided = PrefixKV(torch.zeros(2, 2, 16, 4).transpose(2, 3), torch.zeros(2, 2, 4, 16))
    with pytest.raises(ValueError, match="contiguous"):
        pool.shared_prefixes([strided])


def test_a_correct_kernel_is_accepted_and_a_wrong_one_refused(kernel, caplog):
    geometry = _geometry(torch.float32, kv_heads=2)
    assert native_check.accept(kernel, geometry) is kernel

    class OffByAScale:  # a plausible bug: the scale dropped
        covers = staticmethod(kernel.covers)

        def run(self, *args):
            args = list(args)
            args[9] = 1.0
            kernel.run(*args)

    with caplog.at_level(logging.WARNING):
        assert native_check.accept(OffByAScale(), geometry) is None
    assert "differs from SDPA" in caplog.text


def test_uncovered_dtypes_and_devices_keep_sdpa(kernel):
    assert not kernel.covers(torch.float16, torch.device("cpu"))
    assert not kernel.covers(torch.float32, torch.device("meta"))
    pool = KVPool(_geometry(torch.float16), 2, 4, kernel)
    assert not pool.has_native_decode


def test_without_a_compiler_the_kernel_is_not_built(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING):
        assert native_decode._build() is None
    assert "runs through SDPA" in caplog.text
    monkeypatch.setenv("PROMPTSERVE_NATIVE_DECODE", "0")
    assert native_decode._build() is None


def test_the_pool_asks_for_huge_pages(monkeypatch):
    """Whether the kernel then finds free huge pages is up to the machine; the pool must ask, before it
    first touches the memory."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    assert advise_huge_pages(torch.empty(0)) is False  # nothing 2 MiB-aligned to advise
    assert advise_huge_pages(torch.empty(4 << 20)) is ("[never]" not in mode)  # 16 MiB
    asked = []
    monkeypatch.setattr("server.engine.kv_pool.advise_huge_pages", lambda t: asked.append(t.shape))
    KVPool(_geometry(torch.float32), num_slots=2, slot_tokens=4)
    assert len(asked) == 2 * 2  # keys and values of each layer
