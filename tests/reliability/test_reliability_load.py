"""Overload sheds with 429 + Retry-After (never 5xx) and a bounded queue; 200 abandoned requests leak nothing."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from live_server_util import run_server

from reliability_util import TASKS, metric, settled, wait_for

NUM_ABORTED = 200


@pytest.fixture(scope="module")
def tiny_queue_server(rel_settings):
    """Batch 2, queue 3: a handful of concurrent requests overloads it."""
    with run_server(rel_settings(max_batch_size=2, max_queue=3)) as live:
        with live.client() as c:
            assert c.put("/v1/tasks/t", json={"init": "random", "num_virtual_tokens": 4}).status_code == 201
        yield live


def test_overload_sheds_with_429_and_a_bounded_queue(tiny_queue_server):
    live = tiny_queue_server
    engine = live.runtime.engine
    peak = {"waiting": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["waiting"] = max(peak["waiting"], engine.stats().num_waiting)

    body = {"task_id": "t", "inputs": "x", "parameters": {"max_new_tokens": 24, "ignore_eos_token": True}}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/generate", json=body) for _ in range(40)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        responses = asyncio.run(burst())
    finally:
        stop.set()
        watcher.join()
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error_type"] == "overloaded"
    assert peak["waiting"] <= 3
    wait_for(lambda: settled(live), what="the queue to drain")
    with live.client() as c:  # afterwards, normal service
        assert c.post("/generate", json=body).status_code == 200
        text = c.get("/metrics").text
    assert 'promptserve_http_requests_total{method="POST",route="/generate",status="429"}' in text
    assert 'status="500"' not in text


async def _abandon(url: str, i: int, started: asyncio.Event) -> None:
    body = {"task_id": TASKS[i % len(TASKS)], "inputs": f"abandon {i}",
            "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        if i % 2:  # a stream dropped after its first event
            async with c.stream("POST", "/generate_stream", json=body) as r:
                async for _ in r.aiter_lines():
                    started.set()
                    return
        else:  # a pending request the client gives up on
            await c.post("/generate", json=body)


def test_200_aborted_requests_leave_nothing_behind(rel_server):
    live = rel_server
    engine = live.runtime.engine
    before = engine.stats()
    store_before = live.runtime.store.stats()

    async def main():
        started = asyncio.Event()
        tasks = [asyncio.create_task(_abandon(live.url, i, started)) for i in range(NUM_ABORTED)]
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()  # closes the connections of the ones still pending
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    wait_for(lambda: settled(live), timeout_s=60, what="running, queued and pinned back to zero")
    after = engine.stats()
    assert after.num_finished - before.num_finished == NUM_ABORTED  # every one ended (cancelled ones too)
    assert after.num_cancelled - before.num_cancelled >= NUM_ABORTED - 8  # all but a few were cut short
    # Far fewer tokens than the 200 x 200 asked for: a cancelled sequence leaves the batch at once.
    assert after.num_generated_tokens - before.num_generated_tokens < NUM_ABORTED * 200 // 4
    store_after = live.runtime.store.stats()
    assert store_after.pinned == 0 and store_after.pinned_bytes == 0
    assert store_after.device_entries <= max(store_before.device_entries, len(TASKS))
    with live.client() as c:
        text = c.get("/metrics").text
        assert metric(text, "promptserve_prompt_store_pinned") == 0
        assert c.post("/generate", json={"task_id": TASKS[0], "inputs": "still here"}).status_code == 200
