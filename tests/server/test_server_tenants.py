"""Tenants over real HTTP: each limit exceeded once (429, Retry-After, x-ratelimit-* read by the real openai
client); usage in GET /v1/usage and /metrics equal to the client's own counts, private to its tenant, and
still there after a restart."""

from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest
import yaml
from live_server_util import LiveServer, run_server

OPERATOR = "ops-key-000001"
KEYS = [
    {"key": OPERATOR, "tenant": "ops", "tasks": ["*"], "admin": True, "operator": True},
    {"key": "acme-key-00001", "tenant": "acme", "tasks": ["acme-*"], "weight": 3},
    {"key": "acme-adm-00001", "tenant": "acme", "tasks": ["acme-*"], "admin": True},
    {"key": "globex-key-001", "tenant": "globex", "tasks": ["globex-*"]},
    {"key": "rpm-key-000001", "tenant": "rpm", "tasks": ["*"], "limits": {"requests_per_minute": 2}},
    {"key": "tpm-key-000001", "tenant": "tpm", "tasks": ["*"], "limits": {"tokens_per_minute": 60}},
    {"key": "conc-key-00001", "tenant": "conc", "tasks": ["*"], "limits": {"max_concurrent": 1}},
    {"key": "day-key-000001", "tenant": "day", "tasks": ["*"], "limits": {"tokens_per_day": 20}},
]
TASKS = {"acme-a": 3, "acme-b": 5, "globex-a": 4}


@pytest.fixture(scope="module")
def settings(make_settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    (folder / "keys.yaml").write_text(yaml.safe_dump({"keys": KEYS}))
    return make_settings(store=folder / "store", api_keys=folder / "keys.yaml", compile=False)


@pytest.fixture(scope="module")
def live(settings):
    with run_server(settings) as server:
        with server.client(headers=_auth(OPERATOR)) as c:
            for task_id, n in TASKS.items():
                assert c.put(f"/v1/tasks/{task_id}", json={"init": "random", "num_virtual_tokens": n}).status_code == 201
        yield server


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _openai(live: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_requests_per_minute_with_the_openai_client(live):
    with _openai(live, "rpm-key-000001") as client:
        ok = client.completions.with_raw_response.create(model="acme-a", prompt="The bread", max_tokens=2)
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        client.completions.create(model="acme-a", prompt="The bread", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model="acme-a", prompt="The bread", max_tokens=2)
    headers = caught.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 30  # a request refills in 30 s at 2 per minute
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+s|\d+m\d+s", headers["x-ratelimit-reset-requests"])
    body = caught.value.response.json()
    assert body["error_type"] == "rate_limited" and "2 requests per minute" in body["error"]


def test_tokens_per_minute(live):
    with live.client(headers=_auth("tpm-key-000001")) as c:
        first = c.post("/generate", json={"inputs": "The bread", "parameters": {"max_new_tokens": 40}})
        assert first.status_code == 200, first.text
        assert int(first.headers["x-ratelimit-remaining-tokens"]) < 60 - 40
        second = c.post("/generate", json={"inputs": "The bread", "parameters": {"max_new_tokens": 40}})
    assert second.status_code == 429, second.text
    assert "tokens per minute" in second.json()["error"] and int(second.headers["retry-after"]) >= 1
    assert second.headers["x-ratelimit-limit-tokens"] == "60"


def test_max_concurrent(live):
    # The engine holds the first request inside its first step until the second has been answered: the two
    # are in flight together by construction, not by the first's 60 tokens outlasting the second's trip.
    faults = live.runtime.engine.fault_injector
    faults.hold("conc-first")
    try:
        with live.client(headers=_auth("conc-key-00001")) as c:
            outcome = {}

            def long_stream():
                body = {"inputs": "The bread", "parameters": {"max_new_tokens": 60, "ignore_eos": True}}
                with c.stream("POST", "/generate_stream", json=body, headers={"X-Request-Id": "conc-first"}) as r:
                    outcome["first"] = r.status_code
                    r.read()

            worker = threading.Thread(target=long_stream)
            worker.start()
            assert faults.wait_held("conc-first", 30)  # admitted by the gate, and running in the engine
            with live.client(headers=_auth("conc-key-00001")) as other:
                second = other.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            faults.release("conc-first")
            worker.join(60)
            third = c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    finally:
        faults.release("conc-first")
    assert outcome["first"] == 200
    assert second.status_code == 429 and "max_concurrent" in second.json()["error"], second.text
    assert second.headers["retry-after"] == "1"
    assert third.status_code == 200  # the first ended: its place is free again


def test_daily_quota(live):
    with live.client(headers=_auth("day-key-000001")) as c:
        first = c.post("/generate", json={"inputs": "The bread by the river", "parameters": {"max_new_tokens": 30}})
        assert first.status_code == 200, first.text  # below the quota when it started
        second = c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert second.status_code == 429 and second.json()["error_type"] == "quota_exceeded"
    seconds_to_midnight = 86_400 - time.time() % 86_400
    assert abs(int(second.headers["retry-after"]) - seconds_to_midnight) < 60


def _client_counts(live: LiveServer, key: str, plan: list[tuple[str, str, int, bool]]) -> dict:
    """Send `plan` (task, prompt, max_tokens, stream) through the openai client; sum what it was told."""
    totals = {}
    with _openai(live, key) as client:
        for task, prompt, max_tokens, stream in plan:
            if stream:
                chunks = list(client.completions.create(model=task, prompt=prompt, max_tokens=max_tokens, stream=True,
                                                        stream_options={"include_usage": True}))
                usage = chunks[-1].usage
            else:
                usage = client.completions.create(model=task, prompt=prompt, max_tokens=max_tokens).usage
            t = totals.setdefault(task, {"requests": 0, "input_tokens": 0, "virtual_tokens": 0, "generated_tokens": 0})
            t["requests"] += 1
            t["input_tokens"] += usage.prompt_tokens
            t["virtual_tokens"] += TASKS[task]
            t["generated_tokens"] += usage.completion_tokens
    return totals


def _usage(live: LiveServer, key: str, **params) -> httpx.Response:
    with live.client(headers=_auth(key)) as c:
        return c.get("/v1/usage", params=params)


def _metric(text: str, name: str, **labels) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_usage_equals_the_clients_counts_and_is_private(live, settings):
    acme = _client_counts(live, "acme-key-00001", [("acme-a", "The bread", 5, False), ("acme-b", "Once upon", 3, True),
                                                   ("acme-a", "A long walk by the river", 7, True)])
    globex = _client_counts(live, "globex-key-001", [("globex-a", "Hi there", 4, False)])
    mine = _usage(live, "acme-key-00001")
    assert mine.status_code == 200, mine.text
    by_task = {row["task"]: row for row in mine.json()["by_task"]}
    for task, counts in acme.items():
        assert {k: by_task[task][k] for k in counts} == counts
    assert mine.json()["totals"]["requests"] == 3 and sum(h["requests"] for h in mine.json()["by_hour"]) == 3
    assert _usage(live, "acme-key-00001", tenant="globex").status_code == 403  # not another tenant's
    everyone = _usage(live, OPERATOR, tenant="*").json()
    by_tenant = {row["tenant"]: row for row in everyone["by_tenant"]}
    assert by_tenant["globex"]["generated_tokens"] == globex["globex-a"]["generated_tokens"]
    with live.client(headers=_auth(OPERATOR)) as c:
        metrics = c.get("/metrics").text
    for kind in ("input", "virtual", "generated"):
        expected = sum(t[f"{kind}_tokens"] for t in acme.values())
        assert _metric(metrics, "promptserve_tenant_tokens_total", tenant="acme", kind=kind) == expected
    assert _metric(metrics, "promptserve_tenant_requests_total", tenant="acme") == 3
    assert _metric(metrics, "promptserve_tenant_refused_total", tenant="rpm", reason="rate_limited") >= 1
    with live.client(headers=_auth("acme-adm-00001")) as c:  # a tenant's admin sees its own series only
        scoped = c.get("/metrics").text
    assert _metric(scoped, "promptserve_tenant_requests_total", tenant="acme") == 3
    assert 'tenant="globex"' not in scoped and 'tenant="rpm"' not in scoped


def test_usage_survives_a_restart(live, settings):
    before = _usage(live, OPERATOR, tenant="*").json()["totals"]
    with run_server(settings) as restarted:  # the same store folder, so the same usage files
        after = _usage(restarted, OPERATOR, tenant="*").json()["totals"]
    assert after == before and after["requests"] > 0


def test_usage_time_window_and_bad_parameters(live):
    now = time.time()
    assert _usage(live, OPERATOR, start=now + 7200, end=now + 9000).json()["totals"]["requests"] == 0  # the future
    assert _usage(live, OPERATOR, tenant="*", start="2020-01-01T00:00:00Z").json()["totals"]["requests"] > 0
    for params in ({"start": "yesterday"}, {"start": "nan"}, {"start": now, "end": now - 10}, {"end": "1e300"}):
        r = _usage(live, OPERATOR, **params)
        assert r.status_code == 400 and r.json()["error_type"] == "bad_request", (params, r.text)
