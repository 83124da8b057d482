"""The native decode kernel (server/engine/paged/cpu) on tensors, no model: it stores each token's keys
and values where `PagedKV.write` would, and its attention for decoding rows equals float64 SDPA over each
row's own positions read through its block table (GQA, strided inputs, scattered and shared blocks,
float32, float64, bfloat16), with a sliding window and logit soft-capping as plain torch computes them. It is
refused when it disagrees, and the engine falls back to SDPA when it
cannot be built. Model-level parity with the kernel on and off is in test_engine_parity."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.engine.paged.cpu import native_check, native_decode
from server.engine.paged.cpu.huge_pages import advise_huge_pages
from server.engine.paged.cpu.native_decode import DecodeReads
from server.engine.paged.kv_memory import ContextReads, KVGeometry, PagedKV

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def kernel():
    built = native_decode.load()
    if built is None:
        pytest.skip("no C++ compiler here: the engine runs decode attention through SDPA (tested elsewhere)")
    return built


def _geometry(dtype: torch.dtype, kv_heads: int = 2, head_dim: int = 16) -> KVGeometry:
    return KVGeometry(num_layers=2, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=torch.device("cpu"))


def _history(memory: PagedKV, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's whole keys and values `[KVH, rows, d]` (views)."""
    keys, values = memory.context(layer, ContextReads(memory.num_tokens, [(0, memory.num_tokens)]))
    return keys[0], values[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,heads", [(2, 8), (4, 4), (1, 3)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("head_dim", [16, 64, 24])  # multiples of 16 take the vector path on AVX-512 machines
def test_kernel_writes_like_the_memory_and_attends_like_sdpa(kernel, dtype, kv_heads, heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    geometry, layer = _geometry(dtype, kv_heads, head_dim), 1
    native, plain = PagedKV(geometry, 12, 4, kernel), PagedKV(geometry, 12, 4)
    assert native.has_native_decode and not plain.has_native_decode
    for memory in (native, plain):  # the same history in both
        keys, values = _history(memory, layer)
        keys.copy_(torch.randn(keys.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        values.copy_(torch.randn(values.shape, generator=torch.Generator().manual_seed(2)).to(dtype))
    # 4 decoding rows over scattered blocks (one at position 0, one at a multiple of 16 positions: vectors of
    # 16 with and without a tail); rows 0 and 3 share their first two blocks, as two requests of one task.
    tables = [[7, 2, 9], [4], [11, 0, 5, 8, 1, 3, 10, 6, 2], [7, 2, 3, 6]]
    lengths = [11, 1, 33, 16]
    width = max(len(t) for t in tables)
    reads = DecodeReads(torch.tensor([t + [0] * (width - len(t)) for t in tables]), torch.tensor(lengths), 2)
    # Each row writes its newest position; then 3 prefill tokens in block 10.
    rows = torch.tensor([native.rows(t, [n - 1])[0] for t, n in zip(tables, lengths)] + [40, 41, 42])
    # Strided like the model's: [H, N, d] and [KVH, N, d] transposed, as the attention glue hands them over.
    queries = torch.randn(heads, 7, head_dim, generator=gen).to(dtype).transpose(0, 1)
    new_keys, new_values = (torch.randn(kv_heads, 7, head_dim, generator=gen).to(dtype).transpose(0, 1)
                            for _ in range(2))
    out = torch.full((7, heads, head_dim), float("nan"), dtype=dtype)
    native.write_and_decode(layer, queries, new_keys, new_values, rows, reads, 0.25, out)
    plain.write(layer, rows, new_keys, new_values)
    for got, want in zip(_history(native, layer), _history(plain, layer)):
        assert torch.equal(got, want)
    keys, values = _history(plain, layer)
    for row, (table, length) in enumerate(zip(tables, lengths)):
        positions = plain.rows(table, range(length))
        want = F.scaled_dot_product_attention(queries[row, :, None].double(), keys[:, positions].double(),
                                              values[:, positions].double(), scale=0.25, enable_gqa=True)[:, 0]
        error = (out[row].double() - want).abs().max() / want.abs().max()
        assert error <= TOLERANCE[dtype], f"row {row}: {error:.2e}"
    assert out[4:].isnan().all()  # prefill rows are left to SDPA


def _attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
               softcap: float) -> torch.Tensor:
    """Plain torch, float64: one token's query `[H, d]` over keys/values `[KVH, W, d]` -> `[H, d]`."""
    group = query.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = (query[:, None, :] * keys).sum(-1) * scale  # [H, W]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return (scores.softmax(-1)[:, :, None] * values).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 24])  # the vector path (AVX-512) and the scalar one
@pytest.mark.parametrize("window,softcap", [(1, 0.0), (5, 0.0), (16, 0.0), (100, 0.0), (0, 1.5), (5, 1.5)])
def test_kernel_window_and_softcap_match_torch(kernel, dtype, head_dim, window, softcap):
    """A row of length L with window W reads positions max(0, L - W) .. L - 1 (itself included, as
    transformers' `kv_idx > q_idx - W`); a cap c turns scores s into c * tanh(s / c) before the softmax."""
    gen = torch.Generator().manual_seed(3)
    kv_heads, heads, layer = 2, 6, 0
    memory = PagedKV(_geometry(dtype, kv_heads, head_dim), 12, 4, kernel)
    for cache in _history(memory, layer):
        cache.copy_(torch.randn(cache.shape, generator=gen).to(dtype) * 2)  # scores of a few units: the cap bites
    tables = [[7, 2, 9], [4], [11, 0, 5, 8, 1, 3, 10, 6, 2], [7, 2, 3, 6]]
    lengths = [11, 1, 33, 16]  # shorter and longer than the windows; 16 and 33 cross block edges inside one
    width = max(len(t) for t in tables)
    reads = DecodeReads(torch.tensor([t + [0] * (width - len(t)) for t in tables]), torch.tensor(lengths), 2)
    rows = torch.tensor([memory.rows(t, [n - 1])[0] for t, n in zip(tables, lengths)])
    queries = torch.randn(4, heads, head_dim, generator=gen).to(dtype)
    new_keys, new_values = (torch.randn(4, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    out = torch.full((4, heads, head_dim), float("nan"), dtype=dtype)
    memory.write_and_decode(layer, queries, new_keys, new_values, rows, reads, 0.25, out, window, softcap)
    keys, values = _history(memory, layer)
    for row, (table, length) in enumerate(zip(tables, lengths)):
        first = max(0, length - window) if window else 0
        positions = memory.rows(table, range(first, length))
        want = _attention(queries[row].double(), keys[:, positions].double(), values[:, positions].double(), 0.25,
                          softcap)
        error = (out[row].double() - want).abs().max() / want.abs().max()
        assert error <= TOLERANCE[dtype], f"row {row}: {error:.2e}"
        if window and length > window:  # the window changed the answer: the test can tell a kernel that ignores it
            unwindowed = _attention(queries[row].double(), keys[:, memory.rows(table, range(length))].double(),
                                    values[:, memory.rows(table, range(length))].double(), 0.25, softcap)
            assert (unwindowed - want).abs().max() / want.abs().max() > 10 * TOLERANCE[dtype]
    if softcap:  # and the cap changed it too
        length, table = lengths[2], tables[2]
        positions = memory.rows(table, range(max(0, length - window) if window else 0, length))
        uncapped = _attention(queries[2].double(), keys[:, positions].double(), values[:, positions].double(), 0.25, 0)
        assert (uncapped - out[2].double()).abs().max() / uncapped.abs().max() > 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_weights_below_the_normal_range_leave_the_answer_and_the_thread_as_they_were(kernel, dtype):
    """Scores spread over 0 to -100 below a row's maximum: many weights fall below 1e-38, where the kernel
    flushes denormals (for speed). The answer is float64's, and the calling thread's floating-point mode is
    restored (a denormal still computes as one afterwards)."""
    gen = torch.Generator().manual_seed(5)
    memory = PagedKV(_geometry(dtype, 1, 16), 8, 4, kernel)
    keys, values = _history(memory, 0)
    keys.copy_((torch.linspace(0, -100, memory.num_tokens)[None, :, None] * torch.ones(1, 1, 16) / 4).to(dtype))
    values.copy_(torch.randn(values.shape, generator=gen).to(dtype))
    query, length = torch.ones(1, 1, 16, dtype=dtype), memory.num_tokens  # scores = key sums: 0 .. -400 / 4
    reads = DecodeReads(torch.arange(8)[None], torch.tensor([length]), 2)
    new_kv = [keys[:, length - 1][None].clone(), values[:, length - 1][None].clone()]
    out = torch.full((1, 1, 16), float("nan"), dtype=dtype)
    memory.write_and_decode(0, query, *new_kv, torch.tensor([length - 1]), reads, 1.0, out)
    want = _attention(query[0].double(), keys.double(), values.double(), 1.0, 0)
    scores = keys.double().sum(-1)[0]
    assert int(((scores - scores.max()).exp() < 1.2e-38).sum()) > 0  # some weights are below the normal range
    assert (out[0].double() - want).abs().max() / want.abs().max() <= TOLERANCE[dtype]
    assert float(torch.tensor([1e-39]) * 2) > 0  # no flush-to-zero left behind on this thread


def test_a_correct_kernel_is_accepted_and_a_wrong_one_refused(kernel, caplog):
    geometry = _geometry(torch.float32, kv_heads=2)
    assert native_check.accept(kernel, geometry) is kernel

    class OffByAScale:  # a plausible bug: the scale dropped
        covers = staticmethod(kernel.covers)

        def run(self, *args):
            args = list(args)
            args[7] = 1.0
            kernel.run(*args)

    with caplog.at_level(logging.WARNING):
        assert native_check.accept(OffByAScale(), geometry) is None
    assert "differs from float64 attention" in caplog.text


@pytest.mark.parametrize("drops", ["window", "softcap"])
def test_a_kernel_that_ignores_a_variant_is_refused(kernel, drops, caplog):
    """The start-up check covers the window and the cap: a kernel built before them (or passing one on
    wrongly) does not serve a model."""

    class IgnoresOne:
        covers = staticmethod(kernel.covers)

        def run(self, *args, **kwargs):
            args = list(args)
            args[9 if drops == "window" else 10] = 0
            kernel.run(*args, **kwargs)

    with caplog.at_level(logging.WARNING):
        assert native_check.accept(IgnoresOne(), _geometry(torch.float32, kv_heads=2)) is None
    assert "(window 5, softcap 1) differs from float64 attention" in caplog.text


def test_uncovered_dtypes_and_devices_keep_sdpa(kernel):
    assert not kernel.covers(torch.float16, torch.device("cpu"))
    assert not kernel.covers(torch.float32, torch.device("meta"))
    memory = PagedKV(_geometry(torch.float16), 2, 4, kernel)
    assert not memory.has_native_decode


def test_without_a_compiler_the_kernel_is_not_built(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING):
        assert native_decode._build() is None
    assert "runs through SDPA" in caplog.text
    monkeypatch.setenv("PROMPTSERVE_NATIVE_DECODE", "0")
    assert native_decode._build() is None


def test_kv_memory_asks_for_huge_pages(monkeypatch):
    """Whether the kernel then finds free huge pages is up to the machine; the KV memory must ask, before it
    first touches its memory."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    assert advise_huge_pages(torch.empty(0)) is False  # nothing 2 MiB-aligned to advise
    assert advise_huge_pages(torch.empty(4 << 20)) is ("[never]" not in mode)  # 16 MiB
    asked = []
    monkeypatch.setattr("server.engine.paged.kv_memory.advise_huge_pages", lambda t: asked.append(t.shape))
    PagedKV(_geometry(torch.float32), num_blocks=2, block_tokens=4)
    assert len(asked) == 2 * 2  # keys and values of each layer
