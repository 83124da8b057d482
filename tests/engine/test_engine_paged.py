"""The paged engine end to end on a tiny Llama with adapters written by real PEFT: admission bounded by
rows and blocks, a KV budget smaller than a context, a task replaced under running requests, requests of one
task waiting while the first computes their shared blocks, a deleted task's blocks. (Seeded sampling in a
crowded batch is covered by test_engine_serving.test_seeded_sampling_is_independent_of_batch_mates.)"""

from __future__ import annotations

import asyncio
import threading

import pytest

from prompt_store.store import PromptStore
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import InputTooLong
from server.engine.model_loader import load_model
from server.engine.types import SamplingParams
from tests.engine.conftest import held, run, write_peft_adapters
from tests.engine.test_engine_parity import PeftReferee

TASKS = {"x": 5, "y": 3, "z": 8}
TEXTS = ["The bread", "A long walk by the river, then home", "Hi", "Once upon a time there was a baker",
         "one", "The kitchen smelled of fresh bread", "Stories", "The river runs"]


@pytest.fixture(scope="module")
def setup(engine_model_dir, tmp_path_factory):
    model_dir = engine_model_dir("llama")
    root = tmp_path_factory.mktemp("slots-store")
    adapters = write_peft_adapters(model_dir, root, TASKS)
    return model_dir, load_model(str(model_dir), device="cpu"), root, adapters


@pytest.fixture
def make_engine(setup):
    _, loaded, root, _ = setup
    engines = []

    def make(store: PromptStore | None = None, **config) -> Engine:
        store = store or PromptStore(root, token_dim=loaded.hidden_size)
        engine = Engine(loaded, store, EngineConfig(**config))
        assert engine.memory is not None  # the paged engine, not the legacy path
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(grace_s=0)


def greedy(n: int, ignore_eos: bool = False) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=ignore_eos)


class Hold:
    """Holds the worker inside a step while the body submits, so that all those requests are queued before
    any is admitted: a bare one-token request `hold` whose step the fault injector keeps waiting (before
    its forward) until the body is done."""

    def __init__(self, engine: Engine):
        self.engine, self.faults = engine, engine.fault_injector

    async def __aenter__(self) -> Hold:
        self.faults.hold("hold")
        self._stream = await self.engine.submit("Hi", task_id=None, params=greedy(1), request_id="hold")
        await held(self.engine, "hold")
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.faults.release("hold")
        await self._stream.result()


async def _tokens(engine: Engine, text: str, task: str | None, params: SamplingParams) -> list[int]:
    return (await (await engine.submit(text, task_id=task, params=params)).result()).token_ids


def test_admission_is_bounded_by_the_rows(make_engine):
    engine = make_engine(max_batch_size=2)
    requests = [("x", TEXTS[0], 4), ("y", TEXTS[1], 12), (None, TEXTS[2], 6), ("z", TEXTS[3], 10),
                ("x", TEXTS[4], 3), ("y", TEXTS[5], 8)]
    running: list[int] = []
    engine.logits_tap = lambda rid, k, logits: running.append(engine.stats().num_running)  # worker thread

    async def crowd():
        async with Hold(engine):
            streams = [await engine.submit(text, task_id=task, params=greedy(n, ignore_eos=True))
                       for task, text, n in requests]
        return [(await s.result()).token_ids for s in streams]

    together = run(crowd())
    assert max(running) == 2  # both rows were busy, never more
    kv = engine.stats().kv
    assert (kv.num_blocks_used, kv.num_tokens_used) == (0, 0)
    assert engine.stats().num_running == engine.stats().num_waiting == 0
    for (task, text, n), tokens in zip(requests, together):
        assert len(tokens) == n
        assert tokens == run(_tokens(engine, text, task, greedy(n, ignore_eos=True))), (task, text)


def test_a_kv_budget_smaller_than_a_context_refuses_only_what_could_never_fit(setup, make_engine):
    _, loaded, _, _ = setup
    unbounded = make_engine()
    per_token = unbounded.memory.geometry.bytes_per_token
    engine = make_engine(max_batch_size=2, kv_cache_memory=4 * 16 * per_token)  # 4 blocks: 64 tokens
    assert engine.memory.num_tokens == 64 and engine.stats().kv.num_blocks == 4
    text = TEXTS[1]
    room = 64 - TASKS["x"] - len(loaded.tokenizer(text)["input_ids"])  # new tokens that fit
    with pytest.raises(InputTooLong, match="never fit in the server's KV memory of 64 tokens"):
        run(engine.submit(text, task_id="x", params=greedy(room + 1)))
    tokens = run(_tokens(engine, text, "x", greedy(room, ignore_eos=True)))  # fills the memory to its end
    assert len(tokens) == room
    assert tokens == run(_tokens(unbounded, text, "x", greedy(room, ignore_eos=True)))


@pytest.mark.parametrize("forget", [True, False], ids=["forget_task", "replaced-elsewhere"])
def test_task_replaced_under_running_requests(forget, setup, make_engine, tmp_path):
    """Requests that pinned the old version (running, or queued when the task is replaced) give PEFT's
    output with the old adapter; later ones PEFT's output with the new adapter. Without forget_task (a
    replica that did not replace the task itself) only the version in the blocks' hash chain keeps the old KV
    out. Blocks of 4: the task's virtual tokens fill a block that its requests share."""
    model_dir, loaded, _, _ = setup
    old = write_peft_adapters(model_dir, tmp_path / "old", {"x": 5}, seed=0)["x"]
    new = write_peft_adapters(model_dir, tmp_path / "new", {"x": 5}, seed=7)["x"]
    store = PromptStore(tmp_path / "store", token_dim=loaded.hidden_size)
    store.import_folder("x", old)
    engine = make_engine(store, max_batch_size=8, kv_block_tokens=4)

    async def go():
        warm = await (await engine.submit(TEXTS[0], task_id="x", params=greedy(2))).result()
        assert engine.stats().kv.num_blocks_cached >= 1
        olds = [await engine.submit(t, task_id="x", params=greedy(30), request_id=f"old{i}")
                for i, t in enumerate(TEXTS[:3])]
        for stream in olds:
            await stream.__anext__()
        async with Hold(engine):  # the old rows are mid-decode, in the step the worker is held in
            olds.append(await engine.submit(TEXTS[3], task_id="x", params=greedy(30)))  # queued: old version
            store.import_folder("x", new)
            if forget:
                engine.forget_task("x")
            news = [await engine.submit(t, task_id="x", params=greedy(30)) for t in TEXTS[:4]]
            assert not any(s.done for s in olds)
        return warm, [await s.result() for s in olds], [await s.result() for s in news]

    warm, olds, news = run(go())
    referee = PeftReferee(model_dir, {"old": old, "new": new})
    want_old = [referee.run("old", t, 30)[0] for t in TEXTS[:4]]
    want_new = [referee.run("new", t, 30)[0] for t in TEXTS[:4]]
    assert want_old != want_new  # the adapters do differ on these texts
    assert [r.token_ids for r in olds] == want_old
    assert [r.token_ids for r in news] == want_new
    assert {r.task_version for r in olds} == {warm.task_version}
    assert {r.task_version for r in news} == {store.get("x").version} != {warm.task_version}


def test_requests_wait_while_the_first_computes_their_shared_block(setup, make_engine):
    """Blocks of 4: the task's 5 virtual tokens fill block 0, which its 7 later requests share."""
    model_dir, _, _, adapters = setup
    engine = make_engine(max_batch_size=16, kv_block_tokens=4)

    async def go():
        async with Hold(engine):
            streams = [await engine.submit(t, task_id="x", params=greedy(6)) for t in TEXTS]
            late = await engine.submit("The river", task_id=None, params=greedy(6))  # passes the waiting ones
        return [await s.result() for s in streams], await late.result()

    results, late = run(go())
    assert engine.stats().kv.num_prefix_hit_tokens == 7 * 4
    # The first was admitted with `late`; the other seven a step later, though they arrived before `late`.
    assert all(late.timings.queue_s < r.timings.queue_s for r in results[1:])
    referee = PeftReferee(model_dir, {"x": adapters["x"]})
    for text, result in zip(TEXTS, results):
        assert result.token_ids == referee.run("x", text, 6)[0], text


@pytest.mark.parametrize("config", [{"prefix_caching": False}, {"kv_block_tokens": 16}], ids=["off", "no-full-block"])
def test_with_nothing_to_share_requests_of_a_task_start_together(make_engine, config):
    """With prefix caching off, or a task prefix shorter than a block (5 virtual tokens, blocks of 16, short
    texts), its requests are admitted together (no one-per-step queue)."""
    engine = make_engine(max_batch_size=16, **config)
    first_steps: dict[str, int] = {}

    def first_step(request_id: str, index: int, logits) -> None:  # worker thread
        if index == 0 and request_id != "hold":  # Hold's own request is none of the four
            first_steps[request_id] = engine.stats().num_steps

    engine.logits_tap = first_step

    async def go():
        async with Hold(engine):
            streams = [await engine.submit(t, task_id="x", params=greedy(3), request_id=f"r{i}")
                       for i, t in enumerate([TEXTS[0], TEXTS[2], TEXTS[4], TEXTS[6]])]
        return [await s.result() for s in streams]

    run(go())
    assert len(first_steps) == 4 and len(set(first_steps.values())) == 1, first_steps
    assert engine.stats().kv.num_prefix_hit_tokens == 0


def test_a_deleted_task_stays_forgotten_when_a_request_in_flight_computes_it(setup, make_engine, tmp_path):
    model_dir, loaded, _, _ = setup
    folder = write_peft_adapters(model_dir, tmp_path / "src", {"x": 5})["x"]
    store = PromptStore(tmp_path / "store", token_dim=loaded.hidden_size)
    store.import_folder("x", folder)
    engine = make_engine(store, max_batch_size=4, kv_block_tokens=4)

    async def go():
        async with Hold(engine):  # queued with the task pinned, then the task is deleted
            stream = await engine.submit(TEXTS[1], task_id="x", params=greedy(3))
            store.delete("x")
            engine.forget_task("x")  # as the tasks router does
        return await stream.result()

    result = run(go())
    assert result.generated_tokens == 3
    assert engine.stats().kv.num_blocks_cached == 0  # its blocks were not registered for sharing


class BurstWaits:
    """Stands in for the worker's wait for more of a burst (`Engine.burst_wait`): each wait lasts until the
    test ends it, so a request the test sends before ending it arrives inside that wait by construction."""

    def __init__(self, engine: Engine):
        self._began, self._ended, self._is_open = threading.Semaphore(0), threading.Semaphore(0), threading.Event()
        engine.burst_wait = self._wait

    def _wait(self, seconds: float) -> None:  # worker thread
        if not self._is_open.is_set():
            self._began.release()
            self._ended.acquire(timeout=60)

    async def began(self) -> None:
        """Until the worker is inside its next wait (it has seen every request sent before)."""
        assert await asyncio.to_thread(self._began.acquire, True, 60), "the worker never waited for a burst"

    def end(self) -> None:
        """End the wait under way (it sees what arrived in it)."""
        self._ended.release()

    def open(self) -> None:
        """Nothing more arrives: the wait under way, and any later one, ends at once."""
        self._is_open.set()
        self._ended.release()


def test_a_burst_arriving_at_an_idle_engine_starts_in_one_step(make_engine):
    # Each request arrives inside the worker's burst wait after the one before (held open by BurstWaits,
    # as a 300 ms wait holds requests 30 ms apart), with prompts far longer than the 4-token chunk: gathered,
    # and prefilled in one step (no row decodes yet), they need 1 + 2 steps for 3 tokens.
    engine = make_engine(burst_wait_s=0.3, prefill_chunk_tokens=4)
    waits = BurstWaits(engine)

    async def burst():
        streams = []
        for i, task in enumerate(["x", "y", "z", None]):
            streams.append(await engine.submit(TEXTS[2 * i + 1], task_id=task, params=greedy(3, ignore_eos=True)))
            if i:
                waits.end()  # the wait under way saw this request arrive
            if i < 3:
                await waits.began()  # the worker waits for more, having seen this one
        waits.open()
        return [await s.result() for s in streams]

    results = run(burst())
    assert [r.generated_tokens for r in results] == [3, 3, 3, 3]
    assert engine.stats().num_steps == 3


def test_with_a_stall_ratio_prefill_chunks_shrink_while_rows_decode(make_engine):
    # Chunks sized from measured step times: a long prompt arriving beside decoding rows comes in more, and
    # smaller, pieces than the 128-token ceiling; outputs stay those of the fixed chunk.
    fixed, adaptive = make_engine(burst_wait_s=0), make_engine(burst_wait_s=0, max_stall_ratio=1.5)
    outputs, chunks = {}, {}
    for name, engine in (("fixed", fixed), ("adaptive", adaptive)):
        sizes = []
        forward = engine._worker.runner.forward  # noqa: SLF001 - counts the prompt tokens of each step
        engine._worker.runner.forward = lambda cs, f=forward, s=sizes: (
            s.append(sum(c.num_tokens for c in cs if not c.is_decode)), f(cs))[1]

        async def long_beside_decoding(engine=engine):
            first = await engine.submit(TEXTS[1], task_id="x", params=greedy(300, ignore_eos=True))
            for _ in range(20):  # decoding now, with step times measured
                await anext(first)
            second = await engine.submit(" ".join(TEXTS * 5), task_id="y", params=greedy(2, ignore_eos=True))
            return [(await first.result()).token_ids, (await second.result()).token_ids]

        outputs[name], chunks[name] = run(long_beside_decoding()), sizes
    assert outputs["adaptive"] == outputs["fixed"]
    assert max(chunks["adaptive"][1:]) < 128 <= max(chunks["fixed"][1:])


def test_prompts_closest_to_their_first_token_go_first_and_the_oldest_always_progresses(make_engine):
    # 16 prompt tokens a step; a long prompt, then four short ones (more than 16 tokens together), admitted
    # together. In arrival order the long one would take every step's 16 tokens and the short ones would wait
    # for it; shortest first alone, the short ones would take all of the first step. Here the long one, the
    # oldest, gets its share (a quarter of 16) every step, and the short ones the rest, shortest first.
    engine = make_engine(burst_wait_s=0, prefill_chunk_tokens=16, idle_prefill_tokens=16)
    steps = []
    forward = engine._worker.runner.forward  # noqa: SLF001 - records each step's prompt chunks
    engine._worker.runner.forward = lambda cs, f=forward: (  # noqa: SLF001
        steps.append({c.seq.request_id: c.num_tokens for c in cs if not c.is_decode}), f(cs))[1]
    shorts = {"s-x": "x", "s-y": "y", "s-z": "z", "s-bare": None}

    async def long_then_short():
        async with Hold(engine):  # all queued before any is admitted
            streams = [await engine.submit(" ".join(TEXTS * 2), task_id="x", params=greedy(1), request_id="long")]
            for request_id, task in shorts.items():
                streams.append(await engine.submit("Hi", task_id=task, params=greedy(1), request_id=request_id))
        return dict(zip(["long", *shorts], [await s.result() for s in streams]))

    results = run(long_then_short())
    sizes = {rid: r.virtual_tokens + r.prompt_tokens for rid, r in results.items()}
    prompt_steps = [s for s in steps if set(s) & set(sizes)]
    assert sum(sizes[rid] for rid in shorts) > 16 - 4  # the short ones cannot all fit beside the long one's share
    first = prompt_steps[0]  # e.g. long 4, then the shortest whole (3, 6 tokens), the next one's first 3 of 8
    assert first["long"] == 4 and sum(first.values()) == 16
    order = sorted(shorts, key=sizes.get)
    done = [rid for rid in order if first.get(rid) == sizes[rid]]
    assert done and done == order[:len(done)]
    assert first[order[len(done)]] == 16 - 4 - sum(sizes[rid] for rid in done)
    long_steps = [s["long"] for s in prompt_steps if "long" in s]
    assert len(long_steps) == len(prompt_steps) and sum(long_steps) == sizes["long"]  # progress every step
    last_short = max(i for i, s in enumerate(prompt_steps) if set(s) & set(shorts))
    assert last_short < len(prompt_steps) - 1  # every short prompt done before the long one
