"""The native prefill attention kernel (server/engine/paged/cpu) on tensors, no model: each chunk position
attends like float64 causal attention over its request's context read through scattered blocks (several
runs, a chunk from position 0 and from inside a block, short and long chunks, GQA, MQA and head groups
wider than a work item, strided queries), it covers float32 only, and a kernel that disagrees is refused.
Model-level parity with the kernel on and off is in test_engine_parity."""

from __future__ import annotations

import pytest
import torch

from server.engine.paged.cpu import native_check, native_prefill
from server.engine.paged.kv_memory import ContextReads, KVGeometry, PagedKV


@pytest.fixture(scope="module")
def kernel():
    built = native_prefill.load()
    if built is None:
        pytest.skip("no C++ compiler here: the engine runs prefill attention through SDPA (tested elsewhere)")
    if not built.covers(torch.float32, torch.device("cpu"), 64):
        pytest.skip("no AVX-512 here: the engine runs prefill attention through SDPA (tested elsewhere)")
    return built


def _memory(kernel, kv_heads: int, head_dim: int, block_tokens: int = 16, num_blocks: int = 40) -> PagedKV:
    geometry = KVGeometry(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, dtype=torch.float32,
                          device=torch.device("cpu"))
    memory = PagedKV(geometry, num_blocks, block_tokens, native_prefill=kernel)
    assert memory.has_native_prefill
    gen = torch.Generator().manual_seed(1)
    for stored in memory.context(0, ContextReads(memory.num_tokens, [(0, memory.num_tokens)])):
        stored.copy_(torch.randn(stored.shape, generator=gen))
    return memory


def _want(memory: PagedKV, table: list[int], queries: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Float64 causal attention of positions start .. start + T - 1 `[T, H, d]` over the table's context."""
    everything = ContextReads(memory.num_tokens, [(0, memory.num_tokens)])
    rows = memory.rows(table, range(start + queries.shape[0]))
    keys, values = (t[0][:, rows].double() for t in memory.context(0, everything))  # [KVH, L, d]
    group = queries.shape[1] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = torch.einsum("thd,hld->htl", queries.double(), keys) * scale
    positions = torch.arange(start, start + queries.shape[0])
    scores = scores.masked_fill(torch.arange(len(rows))[None, :] > positions[:, None], float("-inf"))
    return torch.einsum("htl,hld->thd", scores.softmax(-1), values)


# A context of 4 runs (blocks 30-31, then 3, then 7-9, then 12-...): a shared prefix's blocks, then the
# request's own.
TABLE = [30, 31, 3, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]


@pytest.mark.parametrize("kv_heads,heads", [(2, 8), (4, 4), (1, 3), (1, 80)], ids=["gqa", "mha", "mqa", "wide"])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("start,num_tokens", [(0, 1), (0, 37), (21, 7), (40, 100), (150, 170)])
def test_each_position_attends_like_float64_over_its_scattered_context(kernel, kv_heads, heads, head_dim, start,
                                                                        num_tokens):
    memory = _memory(kernel, kv_heads, head_dim)
    gen = torch.Generator().manual_seed(2)
    # [H, T, d] transposed, as the attention glue hands queries over (token stride d, head stride T * d)
    queries = torch.randn(heads, num_tokens, head_dim, generator=gen).transpose(0, 1)
    out = torch.full((num_tokens, heads, head_dim), float("nan"))
    reads = ContextReads.of(memory, TABLE, start + num_tokens)
    memory.prefill(0, queries, reads, start, 0.3, out)
    want = _want(memory, TABLE, queries, start, 0.3)
    error = float((out.double() - want).abs().max() / want.abs().max())
    assert error <= 1e-5, f"{error:.2e}"


def test_long_context_positions_far_apart_in_score(kernel):
    """Scores spread over 100s (weights far below float32's normal range) still give float64's answer."""
    memory = _memory(kernel, 2, 64, num_blocks=64)
    table = list(range(63, -1, -1))  # every block its own run, in reverse
    queries = torch.randn(200, 4, 64, generator=torch.Generator().manual_seed(3)) * 6
    out = torch.empty(200, 4, 64)
    memory.prefill(0, queries, ContextReads.of(memory, table, 1000), 800, 1.0, out)
    want = _want(memory, table, queries, 800, 1.0)
    assert float((out.double() - want).abs().max() / want.abs().max()) <= 1e-5


def test_it_covers_float32_and_head_sizes_of_16s_only(kernel):
    cpu = torch.device("cpu")
    assert kernel.covers(torch.float32, cpu, 64) and kernel.covers(torch.float32, cpu, 256)
    assert not kernel.covers(torch.float32, cpu, 24)
    assert not kernel.covers(torch.bfloat16, cpu, 64)  # torch's flash attention on AMX is faster there
    assert not kernel.covers(torch.float64, cpu, 64)
    geometry = KVGeometry(num_layers=1, num_kv_heads=2, head_dim=24, dtype=torch.float32, device=cpu)
    assert not PagedKV(geometry, 4, 16, native_prefill=kernel).has_native_prefill


def test_the_check_accepts_the_kernel_and_refuses_one_that_is_slightly_off(kernel, caplog):
    geometry = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=torch.device("cpu"))
    assert native_check.accept_prefill(kernel, geometry) is kernel

    class SlightlyOff:
        def covers(self, *args):
            return True

        def run(self, query, keys, values, runs, start, scale, out):
            kernel.run(query, keys, values, runs, start, scale, out)
            out[-1, 0, 0] += 1e-4 * out.abs().max()

    assert native_check.accept_prefill(SlightlyOff(), geometry) is None
    assert "native prefill kernel not used" in caplog.text
