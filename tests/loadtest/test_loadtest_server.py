"""The harness against the real promptserve (subprocess, real uvicorn, tiny model): its counts match /metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest
import yaml
from live_server_util import free_port, wait_for_process
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cli import main

READY_TIMEOUT_S = 180


@contextmanager
def serve(model, store, *extra: str) -> Iterator[str]:
    """Base URL of `promptserve serve` (with `extra` flags) on a free loopback port; stopped after."""
    port = free_port()
    log = open(store.parent / f"server-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--model", str(model), "--store", str(store), "--max-batch-size", "8", "--log-level", "warning", *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_process(url, proc, READY_TIMEOUT_S)
        except RuntimeError:
            raise AssertionError(f"server exited: {open(log.name).read()[-2000:]}") from None
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def real_server(tiny_model_dir, tmp_path_factory):
    """Base URL of `promptserve serve` on a free loopback port, serving a tiny Llama."""
    with serve(tiny_model_dir("llama"), tmp_path_factory.mktemp("loadtest-store")) as url:
        yield url


def scrape(url: str) -> dict[tuple, float]:
    """Every sample of /metrics, read by the test itself (not through the harness)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    """Change of the samples called `name` whose labels include `labels`."""
    def total(snapshot):
        return sum(v for (n, ls), v in snapshot.items() if n == name and set(labels.items()) <= set(ls))
    return total(after) - total(before)


def test_streaming_run_for_a_few_seconds_matches_metrics(real_server, tmp_path):
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    before = scrape(real_server)
    code = main(["--url", real_server, "--duration", "3", "--concurrency", "4", "--setup-tasks", "3",
                 "--task-init", "random", "--popularity", "zipf", "--max-new-tokens", "uniform:4,12",
                 "--prompt-tokens", "uniform:8,24", "--out", str(out), "--plot", str(png), "--quiet"])
    after = scrape(real_server)
    assert code == 0
    report = json.loads(out.read_text())
    n = report["client"]["num_requests"]
    assert n > 0 and report["client"]["by_status"] == {"200": n}
    # no request lost or double-counted: the server saw exactly what the client sent
    assert delta(before, after, "promptserve_http_requests_total", route="/generate_stream") == n
    assert delta(before, after, "promptserve_http_requests_total", route="/generate_stream", status="200") == n
    assert delta(before, after, "promptserve_generations_total") == n
    assert delta(before, after, "promptserve_generated_tokens_total") == report["client"]["generated_tokens"]
    assert delta(before, after, "promptserve_http_requests_total", route="/v1/tasks/{task_id}", method="PUT") == 3
    assert report["counts"] == {"client_total": n, "server_total": n, "is_match": True}
    assert sum(report["server"]["counters"]["requests_per_task"].values()) == n
    assert {t["task_id"] for t in report["client"]["per_task"]} <= set(report["server"]["counters"]["requests_per_task"])
    assert report["client"]["first_token"]["count"] == n and report["client"]["latency"]["p99"] > 0
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    # the three tasks made for the run are gone again
    listed = httpx.get(f"{real_server}/v1/tasks", timeout=10).json()
    assert not [t for t in json.dumps(listed).split('"') if t.startswith("loadtest-")]


def test_plain_requests_by_count_match_metrics(real_server, tmp_path):
    out = tmp_path / "plain.json"
    before = scrape(real_server)
    code = main(["--url", real_server, "--requests", "10", "--concurrency", "5", "--no-stream",
                 "--max-new-tokens", "6", "--ignore-eos", "--out", str(out), "--quiet"])
    after = scrape(real_server)
    assert code == 0
    report = json.loads(out.read_text())
    assert report["client"]["num_ok"] == 10
    assert report["client"]["generated_tokens"] == 10 * 6  # ignore_eos_token reached the server
    assert delta(before, after, "promptserve_http_requests_total", route="/generate", status="200") == 10
    assert delta(before, after, "promptserve_generated_tokens_total") == report["client"]["generated_tokens"]
    assert report["counts"]["is_match"] is True


def test_existing_tasks_pages_through_the_whole_listing(real_server):
    """More tasks than one page holds: the harness reads page after page (here pages of 3)."""
    import asyncio

    from loadtest.tasks import existing_tasks

    ids = [f"page-{i:02d}" for i in range(8)]
    with httpx.Client(base_url=real_server, timeout=30) as c:
        for task_id in ids:
            r = c.put(f"/v1/tasks/{task_id}", json={"init": "random", "num_virtual_tokens": 2, "seed": 1})
            assert r.status_code in (200, 201), r.text
        everything = sorted(t["id"] for t in c.get("/v1/tasks").json()["tasks"])

    async def listed(limit: int) -> list[str]:
        async with httpx.AsyncClient(base_url=real_server, timeout=30) as client:
            return await existing_tasks(client, limit, page_size=3)

    try:
        assert asyncio.run(listed(100)) == everything  # every page, not just the first 3
        assert asyncio.run(listed(7)) == everything[:7]
    finally:
        with httpx.Client(base_url=real_server, timeout=30) as c:
            for task_id in ids:
                c.delete(f"/v1/tasks/{task_id}")


KEYS = {"keys": [
    {"key": "sk-ops-000000", "tenant": "ops", "tasks": ["*"], "admin": True, "operator": True},
    {"key": "sk-acme-00001", "tenant": "acme", "tasks": ["*"]},
    {"key": "sk-acme-00002", "tenant": "acme", "tasks": ["*"]},
    {"key": "sk-beta-00003", "tenant": "beta", "tasks": ["*"]},
]}


def test_tenants_against_a_server_with_api_keys(tiny_model_dir, tmp_path_factory, tmp_path):
    """The server's own keys file drives the load; each request carries its tenant's key."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS))
    mixed = tmp_path / "mixed.yaml"  # the loadtest's shape, with a tenant the server does not know
    mixed.write_text("tenants:\n  - {name: acme, key: sk-acme-00001}\n  - {name: ghost, key: sk-ghost-0000}\n")
    store = tmp_path_factory.mktemp("loadtest-keys-store")
    with serve(tiny_model_dir("llama"), store, "--api-keys", str(keys)) as url:
        def run(name: str, *flags: str) -> dict:
            out = tmp_path / f"{name}.json"
            assert main(["--url", url, "--api-key", "sk-ops-000000", "--max-new-tokens", "4", "--out", str(out),
                         "--quiet", *flags]) == 0
            return json.loads(out.read_text())

        report = run("keys", "--tenants", str(keys), "--requests", "24", "--concurrency", "4")
        tenants = report["tenants"]
        assert report["client"]["by_status"] == {"200": 24}  # a missing or wrong key would be 401
        assert list(tenants) == ["ops", "acme", "beta"] and sum(t["num_ok"] for t in tenants.values()) == 24
        assert all(t["num_ok"] > 0 and t["latency"]["p99"] > 0 and t["first_token"]["p50"] > 0
                   for t in tenants.values())
        assert report["counts"]["is_match"] is True  # /metrics read with --api-key (an operator's: server-wide series)
        report = run("mixed", "--tenants", str(mixed), "--requests", "20", "--concurrency", "2")
        acme, ghost = report["tenants"]["acme"], report["tenants"]["ghost"]
        assert acme["by_status"] == {"200": acme["num_requests"]} and acme["num_requests"] > 0
        assert ghost["by_status"] == {"401": ghost["num_requests"]} == {"401": ghost["num_failed"]}
        report = run("noisy", "--tenants", str(keys), "--noisy-tenant", "acme", "--noisy-factor", "3",
                     "--concurrency", "1", "--duration", "2")
        n = {name: t["num_requests"] for name, t in report["tenants"].items()}
        assert report["client"]["num_failed"] == 0 and n["acme"] >= 2 * max(n["ops"], n["beta"]) > 0
