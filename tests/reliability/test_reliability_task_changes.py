"""A task replaced or deleted while its requests run: they finish on their version; later ones see the change."""

from __future__ import annotations

import concurrent.futures as cf

from live_server_util import assert_error, sse_events

from reliability_util import wait_for

TASK = "swap-me"


def body(inputs: str, n: int = 12) -> dict:
    return {"task_id": TASK, "inputs": inputs, "parameters": {"max_new_tokens": n, "ignore_eos_token": True,
                                                               "details": True}}


def put(c, seed: int) -> dict:
    r = c.put(f"/v1/tasks/{TASK}", json={"init": "random", "num_virtual_tokens": 5, "seed": seed})
    assert r.status_code in (200, 201), r.text
    return r.json()


def alone(c) -> tuple[list[int], str]:
    """Greedy tokens and version of the request 'gate' run alone, right now."""
    r = c.post("/generate", json=body("gate"))
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]], r.json()["details"]["task_version"]


def test_replace_under_traffic(rel_server, gate):
    with rel_server.client() as c, cf.ThreadPoolExecutor(2) as pool:
        gate.opened.set()  # references first, with the gate open
        v1 = put(c, seed=101)["version"]
        ref1 = alone(c)
        v2 = put(c, seed=202)["version"]
        ref2 = alone(c)
        assert v1 != v2 and ref1[1] == v1 and ref2[1] == v2
        put(c, seed=101)
        gate.opened.clear()
        gate.is_held.clear()
        in_flight = pool.submit(c.post, "/generate", json=body("gate"), headers={"X-Request-Id": "gate-1"})
        assert gate.is_held.wait(30)  # started on v1, held inside its first decode
        assert put(c, seed=202)["version"] == v2  # replaced while it runs
        later = pool.submit(c.post, "/generate", json=body("gate"), headers={"X-Request-Id": "later"})
        wait_for(lambda: rel_server.runtime.engine.stats().num_waiting == 1, what="the later request to queue")
        gate.opened.set()
        first, second = in_flight.result(), later.result()
    assert first.json()["details"]["task_version"] == v1
    assert [t["id"] for t in first.json()["details"]["tokens"]] == ref1[0]
    assert second.json()["details"]["task_version"] == v2
    assert [t["id"] for t in second.json()["details"]["tokens"]] == ref2[0]
    wait_for(lambda: rel_server.runtime.store.stats().pinned == 0, what="both versions unpinned")


def test_delete_under_traffic(rel_server, gate):
    with rel_server.client() as c, cf.ThreadPoolExecutor(1) as pool:
        version = put(c, seed=303)["version"]

        def stream() -> list[dict]:
            with c.stream("POST", "/generate_stream", json=body("gate"), headers={"X-Request-Id": "gate-2"}) as r:
                assert r.status_code == 200
                return sse_events(r)

        in_flight = pool.submit(stream)
        assert gate.is_held.wait(30)
        assert c.delete(f"/v1/tasks/{TASK}").status_code == 204  # deleted while it runs
        assert_error(c.post("/generate", json=body("next")), 404, "not_found")
        assert_error(c.get(f"/v1/tasks/{TASK}"), 404, "not_found")
        gate.opened.set()
        events = in_flight.result()
    assert "error" not in events[-1], events[-1]
    assert events[-1]["details"]["generated_tokens"] == 12 and len(events) == 12
    wait_for(lambda: rel_server.runtime.store.stats().pinned == 0, what="the deleted version unpinned")
    with rel_server.client() as c:
        assert put(c, seed=303)["version"] == version  # re-created from the same seed: the same version
