"""Faults: a corrupt adapter and an exception injected into a model step fail only their own requests."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest
from live_server_util import assert_error

from reliability_util import TASKS, wait_for, write_store_folder

GOOD = [(task, f"hello {i}") for i, task in enumerate(TASKS)]


def body(task_id, inputs, n=12):
    return {"task_id": task_id, "inputs": inputs,
            "parameters": {"max_new_tokens": n, "ignore_eos_token": True, "details": True}}


def token_ids(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


@pytest.fixture(scope="module")
def references(rel_server) -> dict[tuple[str, str], list[int]]:
    """Each good request's greedy tokens when it runs alone."""
    with rel_server.client() as c:
        return {(t, x): token_ids(c.post("/generate", json=body(t, x))) for t, x in GOOD}


def run_batch(live, gate, extra: list[tuple[str, dict, dict]], num_queued: int) -> tuple[dict, dict]:
    """Queue the good requests and `extra` (name, body, headers) behind the gate, release them together."""
    with cf.ThreadPoolExecutor(len(GOOD) + len(extra) + 1) as pool, live.client() as c:
        held = pool.submit(c.post, "/generate", json=body(TASKS[0], "gate", 30), headers={"X-Request-Id": "gate"})
        assert gate.is_held.wait(30)
        good = {key: pool.submit(c.post, "/generate", json=body(*key)) for key in GOOD}
        bad = {name: pool.submit(c.post, "/generate", json=b, headers=h) for name, b, h in extra}
        engine = live.runtime.engine
        wait_for(lambda: engine.stats().num_waiting >= num_queued, what="the batch to queue up")
        gate.opened.set()
        assert held.result().status_code == 200
        return {k: f.result() for k, f in good.items()}, {k: f.result() for k, f in bad.items()}


def test_corrupt_adapter_fails_only_its_requests(rel_server, gate, references):
    store = rel_server.store_dir
    write_store_folder(store / "broken-json", b"{not json", b"\x00" * 64)
    cfg = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
                      "token_dim": 64, "num_transformer_submodules": 1}).encode()
    write_store_folder(store / "broken-tensor", cfg, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    extra = [(name, body(name, "x"), {}) for name in ("broken-json", "broken-tensor")]
    good, bad = run_batch(rel_server, gate, extra, num_queued=len(GOOD))
    for name, r in bad.items():
        assert_error(r, 422, "invalid_adapter")
        assert name in r.json()["error"] and str(store) not in r.json()["error"]  # no server paths leak
    for key, r in good.items():
        assert token_ids(r) == references[key], key
    with rel_server.client() as c:  # listed with its error, so an operator can see it
        listed = {t["id"]: t for t in c.get("/v1/tasks").json()["tasks"]}
    assert listed["broken-json"]["error"] and listed["broken-tensor"]["error"]
    wait_for(lambda: rel_server.runtime.store.stats().pinned == 0, what="pins released")


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_injected_step_exception_fails_only_the_affected_request(rel_server, gate, references, phase):
    injector = rel_server.runtime.engine.fault_injector
    injector.fail_request(f"boom-{phase}", phase=phase)
    try:
        extra = [("boom", body(TASKS[1], "boom"), {"X-Request-Id": f"boom-{phase}"})]
        good, bad = run_batch(rel_server, gate, extra, num_queued=len(GOOD) + 1)  # one prefill
    finally:
        injector.clear()
    assert_error(bad["boom"], 500, "generation")
    assert injector.num_raised >= 1
    for key, r in good.items():
        assert token_ids(r) == references[key], key
    with rel_server.client() as c:  # the loop keeps serving
        assert token_ids(c.post("/generate", json=body(*GOOD[0]))) == references[GOOD[0]]
    wait_for(lambda: rel_server.runtime.store.stats().pinned == 0, what="pins released")
