"""Prefix caching and paged memory against PEFT alone (tiny Llama, adapters written by real PEFT): requests
sharing a long text, the same text under two tasks, a multi-turn extension, virtual-token counts around a
block, a pool so small that requests are preempted and recomputed, a full-context request beside short ones,
and memory that returns to idle after thousands of requests."""

from __future__ import annotations

import asyncio
import os

import pytest

from server.engine.engine import Engine
from server.engine.model_loader import load_model
from server.engine.types import SamplingParams
from tests.engine.conftest import run, write_peft_adapters
from tests.engine.test_engine_paged import make_engine  # noqa: F401 - a fixture (over this module's setup)
from tests.engine.test_engine_parity import PeftReferee

TEMPLATE = ("You are a careful assistant. Read the review below and answer with one word, positive or "
            "negative, and nothing else. Review: ")
REVIEWS = ["The bread was warm and the staff kind.", "Cold soup, rude waiter, never again.",
           "A long walk by the river, then home for supper."]
TASKS = {"t5": 5, "t15": 15, "t16": 16, "t17": 17, "u5": 5}


@pytest.fixture(scope="module")
def setup(engine_model_dir, tmp_path_factory):
    model_dir = engine_model_dir("llama")
    root = tmp_path_factory.mktemp("prefix-store")
    adapters = write_peft_adapters(model_dir, root, TASKS)
    loaded = load_model(str(model_dir), device="cpu")
    return model_dir, loaded, root, PeftReferee(model_dir, adapters)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _one_by_one(engine: Engine, requests: list[tuple[str | None, str | list[int], int]]) -> list[list[int]]:
    """Each request after the one before has finished (so that it finds the blocks that one left)."""
    async def go():
        return [(await (await engine.submit(x, task_id=t, params=greedy(n))).result()).token_ids
                for t, x, n in requests]
    return run(go())


def _hits(engine: Engine) -> int:
    return engine.stats().kv.num_prefix_hit_tokens


def _names(engine: Engine, task: str | None, inputs: str | list[int]) -> list[int]:
    """A request's context, position by position (virtual tokens as -1..-n)."""
    ids = inputs if isinstance(inputs, list) else engine.tokenize(inputs).ids
    return [-(i + 1) for i in range(TASKS.get(task, 0))] + ids


def _shared(a: list[int], b: list[int], block: int) -> int:
    """Tokens `b` should take from `a`'s full blocks: their common prefix, never b's last position."""
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return min(common, len(b) - 1) // block * block


def test_requests_sharing_a_long_text_compute_only_what_follows(setup, make_engine):
    _, _, _, referee = setup
    engine = make_engine()
    requests = [("t5", TEMPLATE + review, 8) for review in REVIEWS]
    outputs = _one_by_one(engine, requests)
    names = [_names(engine, t, x) for t, x, _ in requests]
    assert _hits(engine) == _shared(names[0], names[1], 16) + _shared(names[0], names[2], 16) >= 32
    for (task, text, n), tokens in zip(requests, outputs):
        assert tokens == referee.run(task, text, n)[0]


def test_the_same_text_under_two_tasks_shares_nothing(setup, make_engine):
    _, _, _, referee = setup
    engine = make_engine()
    requests = [("t5", TEMPLATE + REVIEWS[0], 6), ("u5", TEMPLATE + REVIEWS[0], 6)]
    outputs = _one_by_one(engine, requests)
    assert _hits(engine) == 0  # same n, same text: different virtual tokens, different chains
    assert outputs[0] != outputs[1]
    for (task, text, n), tokens in zip(requests, outputs):
        assert tokens == referee.run(task, text, n)[0]
    _one_by_one(engine, [(None, TEMPLATE + REVIEWS[0], 2), (None, TEMPLATE + REVIEWS[1], 2)])
    assert _hits(engine) > 0  # the bare model's requests do share


def test_a_second_turn_reuses_the_first_turns_blocks_generated_ones_included(setup, make_engine):
    _, _, _, referee = setup
    engine = make_engine()
    turn1 = engine.tokenize(TEMPLATE + REVIEWS[0]).ids
    (answer1,) = _one_by_one(engine, [("t5", turn1, 24)])
    turn2 = turn1 + answer1 + engine.tokenize(" And the second visit? ").ids[1:]  # the chat resent, plus new text
    (answer2,) = _one_by_one(engine, [("t5", turn2, 8)])
    computed_by_turn1 = TASKS["t5"] + len(turn1) + len(answer1) - 1  # its last token's KV was never needed
    assert _hits(engine) == min(computed_by_turn1 // 16, (TASKS["t5"] + len(turn2) - 1) // 16) * 16
    assert _hits(engine) > TASKS["t5"] + len(turn1)  # blocks filled while decoding are shared too
    assert answer1 == referee.run("t5", turn1, 24)[0]
    assert answer2 == referee.run("t5", turn2, 8)[0]


@pytest.mark.parametrize("task", ["t15", "t16", "t17"])
def test_virtual_tokens_around_a_block(setup, make_engine, task):
    """n = block - 1 (block 0 ends with BOS), block (all virtual) and block + 1 (block 1 starts virtual)."""
    _, _, _, referee = setup
    engine = make_engine()
    requests = [(task, REVIEWS[0], 5), (task, REVIEWS[1], 5)]
    outputs = _one_by_one(engine, requests)
    names = [_names(engine, t, x) for t, x, _ in requests]
    assert _hits(engine) == _shared(names[0], names[1], 16) == 16
    for (t, text, n), tokens in zip(requests, outputs):
        assert tokens == referee.run(t, text, n)[0]


def test_a_pool_too_small_for_everyone_preempts_and_recomputes_exactly(setup, make_engine):
    _, loaded, _, referee = setup
    per_token = 2 * 2 * 2 * 16 * 4  # 2 layers x keys and values x 2 KV heads x head size 16 x float32
    engine = make_engine(max_batch_size=8, kv_cache_memory=8 * 16 * per_token, fair_share=False)  # 8 blocks
    assert engine.memory.num_blocks == 8
    requests = [(t, review, 40) for t in ("t5", "u5") for review in REVIEWS]  # ~55 tokens, 4 blocks each

    async def together():
        streams = [await engine.submit(x, task_id=t, params=greedy(n)) for t, x, n in requests]
        return [(await s.result()).token_ids for s in streams]

    outputs = run(together())
    assert engine.stats().num_preempted > 0
    assert engine.stats().kv.num_blocks_used == 0
    for (task, text, n), tokens in zip(requests, outputs):
        assert tokens == referee.run(task, text, n)[0], (task, text)


def test_a_full_context_request_runs_while_short_ones_keep_decoding(setup, make_engine):
    _, loaded, _, referee = setup
    engine = make_engine(max_batch_size=8, max_total_tokens=512, prefill_chunk_tokens=64)
    long_ids = loaded.tokenizer(" ".join([TEMPLATE] * 30))["input_ids"][:440]
    num_new = 512 - TASKS["t5"] - len(long_ids)  # to the last position the model has
    short_done: list[int] = []

    async def go():
        long = await engine.submit(long_ids, task_id="t5", params=greedy(num_new))
        await long.__anext__()  # decoding now
        shorts = [await engine.submit(r, task_id="u5", params=greedy(6)) for r in REVIEWS]
        for s in shorts:
            await s.result()
            short_done.append(engine.stats().num_steps)
        return (await long.result()), [(await s.result()).token_ids for s in shorts]

    long_result, shorts = run(go())
    assert long_result.generated_tokens == num_new and max(short_done) < engine.stats().num_steps
    assert long_result.token_ids == referee.run("t5", long_ids, num_new)[0]
    for review, tokens in zip(REVIEWS, shorts):
        assert tokens == referee.run("u5", review, 6)[0]


def test_memory_returns_to_idle_after_thousands_of_requests(make_engine):
    """2,000 short requests of random tasks and lengths, 32 at a time (bench/bench_memory.py runs 10,000 and
    prints resident memory as it goes)."""
    engine = make_engine(max_batch_size=32)

    async def waves():
        import random

        rng = random.Random(0)
        for _ in range(2000 // 32 + 1):
            streams = [await engine.submit([rng.randrange(3, 500) for _ in range(rng.randint(2, 40))],
                                           task_id=rng.choice([None, *TASKS]), params=greedy(rng.randint(1, 3)))
                       for _ in range(32)]
            await asyncio.gather(*(s.result() for s in streams))
            kv = engine.stats().kv
            assert kv.num_blocks_used == 0 and kv.num_tokens_used == 0  # every block freed at the end
            rss.append(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))

    rss: list[int] = []
    run(waves())
    assert engine.stats().num_finished >= 2000
    # Resident memory after warm-up: flat (it grew 50 MiB per 1,000 requests when oneDNN kept a primitive
    # for every row count of the prepacked products: packed_linear.row_bucket).
    assert rss[-1] - rss[len(rss) // 4] < 16 << 20


def test_rows_at_once_fill_the_kv_budget(make_engine):
    """Tokens in flight, not rows, are bounded: 64 requests of 64-token contexts (4 blocks) on a budget of
    128 blocks run at least 90 % of 128 / 4 = 32 at once (the watermark keeps 1 block free)."""
    per_token = 2 * 2 * 2 * 16 * 4
    engine = make_engine(max_batch_size=64, kv_cache_memory=128 * 16 * per_token, prefix_caching=False)
    running: list[int] = []
    engine.logits_tap = lambda rid, k, logits: running.append(engine.stats().num_running)  # worker thread

    async def crowd():
        streams = [await engine.submit(list(range(3, 43)), task_id=None, params=greedy(24)) for _ in range(64)]
        return [await s.result() for s in streams]

    results = run(crowd())
    assert all(r.generated_tokens == 24 for r in results)
    print(f"rows at once: {max(running)} of {128 // 4} (budget / context)")
    assert max(running) >= 0.9 * 128 / 4, max(running)
