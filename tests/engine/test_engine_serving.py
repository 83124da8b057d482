"""The engine as a service: continuous batching, seeds, streaming, cancellation, fault isolation,
typed errors at submit, shutdown; every pinned prompt is released whatever the ending."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from prompt_store.errors import InvalidTaskId, TaskNotFound
from prompt_store.store import PromptStore
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import EngineStopped, IncompatibleTask, InputTooLong, InvalidRequest, QueueFull, RequestFailed
from server.engine.model_loader import load_model
from server.engine.types import FINISH_CANCELLED, SamplingParams
from tests.engine.conftest import held, run, write_peft_adapters

TASKS = {"t1": 2, "t2": 5, "t3": 9}
SAMPLED = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=1234,
                         ignore_eos=True)


class CountingStore:
    """The real PromptStore, counting pins so tests can check every request gave its pin back."""

    def __init__(self, store: PromptStore):
        self.store, self.acquired, self.released = store, 0, 0

    def acquire(self, task_id):
        prompt = self.store.acquire(task_id)
        self.acquired += 1
        return prompt

    def release(self, prompt):
        self.released += 1
        return self.store.release(prompt)


@pytest.fixture(scope="module")
def setup(engine_model_dir, tmp_path_factory):
    model_dir = engine_model_dir("llama")
    root = tmp_path_factory.mktemp("serving-store")
    write_peft_adapters(model_dir, root, TASKS)
    return load_model(str(model_dir), device="cpu"), root


@pytest.fixture
def make_engine(setup):
    loaded, root = setup
    engines = []

    def make(**config) -> Engine:
        store = CountingStore(PromptStore(root, token_dim=loaded.hidden_size))
        engine = Engine(loaded, store, EngineConfig(**config))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(grace_s=0)
        assert engine.store.acquired == engine.store.released  # no pin leaked, whatever happened


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


async def until_monotonic(deadline: float) -> None:
    """Until time.monotonic() (the engine's clock for queue times) has passed `deadline`."""
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(left)


def test_short_request_finishes_first_and_slots_are_freed(make_engine):
    engine = make_engine(max_batch_size=2)

    async def go():
        faults = engine.fault_injector
        faults.hold("long", phase="decode")  # short1 arrives in its first decode step
        long = await engine.submit("The river runs", task_id="t1", params=greedy(120), request_id="long")
        await long.__anext__()  # the long one is decoding
        sent1 = time.monotonic()
        short1 = await engine.submit("Hi", task_id="t2", params=greedy(3), request_id="short1")
        faults.hold("short1", phase="decode")  # short2 arrives in short1's first decode step
        faults.release("long")
        await held(engine, "short1")
        short1_queued_at_most = time.monotonic() - sent1  # it was admitted before this step
        short2 = await engine.submit("Hello", task_id="t3", params=greedy(3))  # waits: batch of 2 is full
        # short2 waits in the queue for short1's row; the queue times compared below are wall-clock times,
        # so short1 (holding the row) goes on only once short2 has queued longer than short1 did.
        await until_monotonic(time.monotonic() + short1_queued_at_most)
        faults.release("short1")
        r1, r2 = await short1.result(), await short2.result()
        assert not long.done  # both short ones overtook the long one
        assert r2.timings.queue_s > r1.timings.queue_s  # short2 got short1's slot when it left
        assert (await long.result()).generated_tokens == 120
        return r1, r2

    r1, r2 = run(go())
    assert r1.generated_tokens == r2.generated_tokens == 3
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_finished == 3


def test_stream_events_add_up_to_the_result(make_engine):
    engine = make_engine()

    async def go():
        stream = await engine.submit("Café 😀", task_id="t2", params=greedy(15))
        events = [ev async for ev in stream]
        return events, await stream.result()

    events, result = run(go())
    assert [e.index for e in events] == list(range(15))
    assert [e.is_last for e in events] == [False] * 14 + [True]
    assert "".join(e.text for e in events) == result.text
    assert [e.token_id for e in events] == result.token_ids
    assert all(e.logprob <= 0 for e in events)
    assert result.prompt_tokens == len(engine.tokenizer("Café 😀")["input_ids"])
    assert result.virtual_tokens == TASKS["t2"] and result.task_version
    assert result.timings.first_token_s is not None and result.timings.total_s >= result.timings.first_token_s


def test_seeded_sampling_is_independent_of_batch_mates(make_engine):
    engine = make_engine()

    async def alone():
        return (await (await engine.submit("A story", task_id="t3", params=SAMPLED)).result()).token_ids

    async def crowded():
        engine.fault_injector.hold("mate", phase="decode")  # the others arrive in its first decode step
        mates = [await engine.submit("The bread", task_id="t1", params=greedy(30), request_id="mate")]
        await mates[0].__anext__()
        mates.append(await engine.submit("One two three four five", task_id=None,
                                         params=SamplingParams(max_new_tokens=20, do_sample=True, seed=7)))
        target = await engine.submit("A story", task_id="t3", params=SAMPLED)
        mates.append(await engine.submit("x", task_id="t2", params=SamplingParams(
            max_new_tokens=9, do_sample=True, temperature=1.3, repetition_penalty=1.2)))
        engine.fault_injector.release("mate")
        tokens = (await target.result()).token_ids
        for mate in mates:
            await mate.result()
        return tokens

    first = run(alone())
    assert run(crowded()) == first
    assert run(alone()) == first
    other_seed = SamplingParams(**{**SAMPLED.__dict__, "seed": 99})
    other = run(_tokens(engine, "A story", "t3", other_seed))
    assert other != first


async def _tokens(engine, text, task, params):
    return (await (await engine.submit(text, task_id=task, params=params)).result()).token_ids


def test_cancel_removes_request_at_next_step(make_engine):
    engine = make_engine()

    async def go():
        engine.fault_injector.hold("stream", phase="decode")  # cancelled in its first decode step
        stream = await engine.submit("The river", task_id="t1", params=greedy(200), request_id="stream")
        other = await engine.submit("The bread", task_id="t2", params=greedy(30))
        await stream.__anext__()
        stream.cancel()
        engine.fault_injector.release("stream")
        result = await stream.result()
        return result, await other.result()

    result, other = run(go())
    assert result.finish_reason == FINISH_CANCELLED and result.generated_tokens < 200
    assert other.generated_tokens == 30  # its batch mate carried on


def test_cancelled_request_leaves_the_batch_at_the_very_next_step(make_engine):
    """Cancel asked while step s emits token k: step s+1 drops the row before its forward, so no logits
    for token k+1 are ever computed for it, while its batch mate keeps decoding."""
    engine = make_engine()
    cancel_at = 5
    streams: dict[str, object] = {}
    seen: dict[str, list[int]] = {"doomed": [], "mate": []}

    submitted = threading.Event()

    def tap(request_id: str, index: int, logits) -> None:  # runs on the worker thread, inside a step
        seen[request_id].append(index)
        if request_id == "doomed" and index == cancel_at:
            assert submitted.wait(10)  # the test holds the stream by now
            streams["doomed"].cancel()

    engine.logits_tap = tap

    async def go():
        streams["mate"] = await engine.submit("The bread", task_id="t2", request_id="mate", params=greedy(20))
        streams["doomed"] = await engine.submit("The river", task_id="t1", request_id="doomed",
                                                params=greedy(200))
        submitted.set()
        return await streams["doomed"].result(), await streams["mate"].result()

    doomed, mate = run(go())
    assert doomed.finish_reason == FINISH_CANCELLED
    assert seen["doomed"] == list(range(cancel_at + 1))  # no forward after the step that asked
    assert doomed.generated_tokens == cancel_at + 1
    assert mate.generated_tokens == 20 and seen["mate"][-1] == 19


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_model_failure_fails_one_request_only(make_engine, phase):
    engine = make_engine()
    texts = {"a": ("The bread", "t1"), "bad": ("The river", "t2"), "c": ("Hello there", "t3"), "d": ("Hi", None)}

    async def go(fail: bool):
        if fail:
            engine.fault_injector.fail_request("bad", phase=phase)
        streams = {rid: await engine.submit(text, task_id=task, params=greedy(8), request_id=rid)
                   for rid, (text, task) in texts.items()}
        out = {}
        for rid, stream in streams.items():
            try:
                out[rid] = (await stream.result()).token_ids
            except RequestFailed as exc:
                out[rid] = exc
        engine.fault_injector.clear()
        return out

    clean = run(go(False))
    faulty = run(go(True))
    assert isinstance(faulty.pop("bad"), RequestFailed)
    assert faulty == {rid: tokens for rid, tokens in clean.items() if rid != "bad"}
    assert engine.fault_injector.num_raised >= 1 and engine.stats().num_failed == 1
    assert run(_tokens(engine, "The bread", "t1", greedy(8))) == clean["a"]  # still serving


def test_failed_request_raises_while_streaming(make_engine):
    engine = make_engine()

    async def go():
        engine.fault_injector.hold("x", phase="decode")  # the failure is armed in its first decode step
        stream = await engine.submit("Hi", task_id="t1", params=greedy(20), request_id="x")
        await stream.__anext__()
        engine.fault_injector.fail_request("x", phase="decode")
        engine.fault_injector.release("x")
        with pytest.raises(RequestFailed):
            async for _ in stream:
                pass
        with pytest.raises(RequestFailed):
            await stream.result()

    run(go())


def test_submit_errors_are_typed_and_immediate(make_engine):
    engine = make_engine(max_input_tokens=16, max_new_tokens=50, max_total_tokens=40, max_batch_size=1,
                         max_queue=1)
    store = engine.store.store
    store.put("s2s", store.get("t1").embeddings, task_type="SEQ_2_SEQ_LM")  # a seq2seq task of the same width

    async def go():
        cases = [
            (InputTooLong, {"inputs": "word " * 40, "task_id": None, "params": greedy(5)}),
            (InputTooLong, {"inputs": "Hi", "task_id": None, "params": greedy(51)}),
            (InputTooLong, {"inputs": "Hi there", "task_id": "t3", "params": greedy(35)}),  # 9 + 3 + 35 > 40
            (InvalidRequest, {"inputs": "Hi", "task_id": None, "params": SamplingParams(temperature=0.0)}),
            (InvalidRequest, {"inputs": "Hi", "task_id": None, "params": SamplingParams(top_p=0.0)}),
            # denormal values would overflow the float32 logits into NaN probabilities
            (InvalidRequest, {"inputs": "Hi", "task_id": None,
                              "params": SamplingParams(do_sample=True, temperature=5e-324)}),
            (InvalidRequest, {"inputs": "Hi", "task_id": None, "params": SamplingParams(repetition_penalty=1e-300)}),
            (InvalidRequest, {"inputs": [1, 10**6], "task_id": None, "params": greedy(2)}),
            (InvalidRequest, {"inputs": [], "task_id": None, "params": greedy(2)}),
            (TaskNotFound, {"inputs": "Hi", "task_id": "nope", "params": greedy(2)}),
            (InvalidTaskId, {"inputs": "Hi", "task_id": "../etc", "params": greedy(2)}),
            (IncompatibleTask, {"inputs": "Hi", "task_id": "s2s", "params": greedy(2)}),
        ]
        for error, kwargs in cases:
            with pytest.raises(error):
                await engine.submit(**kwargs)
        engine.fault_injector.hold("running", phase="decode")  # it keeps its row while the others arrive
        running = await engine.submit("Hi", task_id="t1", params=greedy(40 - 3 - 2), request_id="running")
        await running.__anext__()
        waiting = await engine.submit("Hi", task_id="t2", params=greedy(2))  # batch of 1 is full: it queues
        with pytest.raises(QueueFull):
            await engine.submit("Hi", task_id="t3", params=greedy(2))
        running.cancel()
        engine.fault_injector.release("running")
        await waiting.result()

    run(go())


def test_stop_lets_running_requests_finish_within_grace(make_engine):
    engine = make_engine()

    async def go():
        stream = await engine.submit("Hi", task_id="t1", params=greedy(20))
        await stream.__anext__()
        await engine.aclose(grace_s=60)  # returns as soon as the running request is done
        with pytest.raises(EngineStopped):
            await engine.submit("Hi", task_id=None, params=greedy(2))
        return await stream.result()

    assert run(go()).generated_tokens == 20
    assert not engine.stats().is_running


def test_stop_after_grace_fails_what_is_left(make_engine):
    engine = make_engine()

    async def go():
        engine.fault_injector.hold("endless", phase="decode")  # still decoding when stop begins; stop releases it
        endless = await engine.submit("Hi", task_id="t2", params=greedy(480), request_id="endless")
        queued = await engine.submit("Hi", task_id="t3", params=greedy(480))
        await endless.__anext__()
        await engine.aclose(grace_s=0)
        for stream in (endless, queued):
            with pytest.raises(EngineStopped):
                await stream.result()

    run(go())
