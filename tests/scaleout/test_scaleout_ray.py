"""Scale-out on Ray Serve, for real: `promptserve serve --replicas 2` (a local Ray cluster, 2 replicas of a
tiny Llama, 1 torch thread each) on loopback. Mixed-task requests give PEFT's tokens through /generate,
/generate_stream and /v1/completions; a task's requests land on one replica and several tasks use both;
a task written or deleted through the endpoint is served correctly by every replica; API keys behave as
in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from live_server_util import assert_error, free_port, sse_events, wait_for_process

from tests.engine.conftest import write_peft_adapters
from tests.engine.test_engine_parity import PeftReferee

pytest.importorskip("ray.serve", reason="the scale-out extra is not installed: pip install 'promptserve[ray]'")

TASKS = {"alpha": 3, "beta": 5, "gamma": 2, "delta": 4}
TEXTS = ["The bread", "A long walk by the river", "Hi", "Once upon a time"]
ADMIN, USER = "admin-key", "user-key"


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """(base URL, model folder, adapters written by PEFT) of a 2-replica deployment; stopped at the end."""
    model = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("ray")
    adapters = write_peft_adapters(model, root / "store", TASKS)
    keys = root / "keys.yaml"
    keys.write_text(json.dumps({"keys": [{"key": ADMIN, "tenant": "ops", "tasks": ["*"], "admin": True},
                                         {"key": USER, "tenant": "t1", "tasks": ["alpha", "beta"]}]}))
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--replicas", "2", "--replica-threads", "1",
         "--replica-num-cpus", "0.5", "--host", "127.0.0.1", "--port", str(port), "--model", str(model),
         "--store", str(root / "store"), "--api-keys", str(keys), "--no-compile", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_process(url, proc, 300)
        except RuntimeError:
            tail = (root / "server.log").read_text()[-3000:]
            raise AssertionError(f"the Ray deployment did not start: {tail}") from None
        yield url, model, adapters
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _client(url: str, key: str = ADMIN) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"})


def _generate(c: httpx.Client, task: str, text: str, max_new: int = 6) -> httpx.Response:
    return c.post("/generate", json={"task_id": task, "inputs": text,
                                     "parameters": {"max_new_tokens": max_new, "details": True}})


def test_a_tasks_requests_stay_on_one_replica_and_tasks_spread(cluster):
    """Runs first, on replicas that hold nothing yet. Ray learns which replica holds a task from the
    replica's reports (every 0.1 s, then to the routers): after a task's first request has been answered
    for a moment, the task's requests go to that replica. A task new to every replica goes to the one
    holding the fewest tasks, so tasks spread over both."""
    url, _, _ = cluster
    first: dict[str, str] = {}
    with _client(url) as c:
        for task in TASKS:
            r = _generate(c, task, "The river", 2)
            assert r.status_code == 200, r.text
            first[task] = r.headers["x-promptserve-replica"]
            time.sleep(1.0)
        for _ in range(3):
            for task in TASKS:
                assert _generate(c, task, "The river", 2).headers["x-promptserve-replica"] == first[task], task
        assert len(set(first.values())) == 2, first  # both replicas hold tasks
        metrics = c.get("/metrics").text
    assert "promptserve_affinity_requests_total" in metrics


def test_mixed_tasks_match_peft_on_every_route(cluster):
    url, model, adapters = cluster
    referee = PeftReferee(model, adapters)
    with _client(url) as c:
        for task, text in zip(TASKS, TEXTS):
            want, _ = referee.run(task, text, 6)
            r = _generate(c, task, text)
            assert r.status_code == 200, r.text
            assert [t["id"] for t in r.json()["details"]["tokens"]] == want, task
            with c.stream("POST", "/generate_stream", json={"task_id": task, "inputs": text,
                                                            "parameters": {"max_new_tokens": 6}}) as s:
                assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
                events = sse_events(s)
            assert [e["token"]["id"] for e in events] == want
            r = c.post("/v1/completions", json={"model": task, "prompt": text, "max_tokens": 6, "temperature": 0,
                                                "logprobs": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == len(want)


def test_writes_through_the_endpoint_reach_every_replica(cluster):
    url, _, _ = cluster
    with _client(url) as c:
        first = c.put("/v1/tasks/fresh", json={"init": "random", "num_virtual_tokens": 3, "seed": 1})
        assert first.status_code == 201, first.text
        replicas = set()
        for _ in range(2):  # the task lands on one replica; the bare model's requests reach the others
            for task in ("fresh", "alpha", "beta", "gamma", "delta"):
                replicas.add(_generate(c, task, "x", 1).headers["x-promptserve-replica"])
        assert len(replicas) == 2
        second = c.put("/v1/tasks/fresh", json={"init": "random", "num_virtual_tokens": 6, "seed": 2})
        assert second.status_code == 200
        r = _generate(c, "fresh", "x", 1)
        assert r.json()["details"]["virtual_tokens"] == 6, r.text
        assert c.delete("/v1/tasks/fresh").status_code == 204
        assert_error(_generate(c, "fresh", "x", 1), 404)


def test_api_keys_and_scopes_as_in_one_process(cluster):
    url, _, _ = cluster
    with _client(url, USER) as c:
        assert _generate(c, "alpha", "x", 1).status_code == 200
        assert_error(_generate(c, "gamma", "x", 1), 403)
        assert_error(c.put("/v1/tasks/nope", json={"init": "random", "num_virtual_tokens": 2}), 403)
    with _client(url, "wrong-key") as c:
        assert_error(_generate(c, "alpha", "x", 1), 401)
    with httpx.Client(base_url=url, timeout=60) as c:
        assert_error(_generate(c, "alpha", "x", 1), 401)  # no key at all
        assert c.get("/health").status_code == 200  # open, as in one process


def test_a_killed_replica_fails_only_its_own_requests(cluster):
    """Kill one replica's actor while requests run on both: requests in flight on it get 503 with
    Retry-After, every request on the other succeeds, and new requests succeed (Ray starts a new one)."""
    import concurrent.futures

    import ray

    url, _, _ = cluster
    with _client(url) as c:
        home = {}
        for task in TASKS:  # where each task is held (placed one by one, as in the affinity test)
            home[task] = _generate(c, task, "x", 1).headers["x-promptserve-replica"]
            time.sleep(1.0)
    victim_id = home[next(iter(TASKS))]
    assert len(set(home.values())) == 2, home
    ray.init(address="auto", namespace="serve", log_to_driver=False)
    try:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "promptserve-engine" in a["name"] and a["name"].endswith(victim_id)]
        assert len(names) == 1, names
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 480, "ignore_eos_token": True}}
        started = {task: threading.Event() for task in TASKS}

        def stream(c: httpx.Client, task: str) -> list[dict]:
            events = []
            with c.stream("POST", "/generate_stream", json={**body, "task_id": task}) as s:
                for line in s.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
                        started[task].set()
            return events

        with _client(url) as c, concurrent.futures.ThreadPoolExecutor(8) as pool:
            plain = {task: pool.submit(c.post, "/generate", json={**body, "task_id": task}) for task in TASKS}
            streams = {task: pool.submit(stream, c, task) for task in TASKS}
            assert all(started[task].wait(60) for task in TASKS)  # every request is decoding on its replica
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
            replies = {task: (plain[task].result(), streams[task].result()) for task in TASKS}
        for task, (reply, events) in replies.items():
            if home[task] == victim_id:  # in flight on the killed replica
                assert_error(reply, 503, "unavailable")
                assert reply.headers["retry-after"] == "1"
                assert events[-1].get("error_type") == "unavailable" and len(events) < 480
            else:
                assert reply.status_code == 200 and reply.json()["details"]["generated_tokens"] == 480, reply.text
                assert events[-1]["details"]["generated_tokens"] == 480
        with _client(url) as c:
            for task in TASKS:
                assert _generate(c, task, "x", 2).status_code == 200
    finally:
        ray.shutdown()
