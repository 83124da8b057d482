"""The harness with tenants against the stub server: each request carries its tenant's key, 429s are
counted apart (never retried), per-tenant figures reach the table and the JSON, noisy neighbours flood."""

from __future__ import annotations

import asyncio
import json

from rich.console import Console

from loadtest import runner
from loadtest.cli import main
from loadtest.config import LoadConfig
from loadtest.session import run_session
from loadtest.table import render
from loadtest.tenants import TenantSpec

TENANTS = (TenantSpec("acme", "sk-acme-0001", 2), TenantSpec("beta", "sk-beta-0002", 1),
           TenantSpec("flood", "sk-flood-0003", 1))


def run(config: LoadConfig):
    return asyncio.run(run_session(config))[0]


def test_each_request_carries_its_tenants_key(stub_server):
    url, state = stub_server
    report = run(LoadConfig(url=url, concurrency=4, num_requests=120, tenants=TENANTS, api_key="sk-admin"))
    assert report.client.by_status == {"200": 120}
    by_key = {t.name: state.keys[t.key] for t in TENANTS}
    assert by_key == {name: t.num_requests for name, t in report.tenants.items()}
    assert "sk-admin" not in state.keys  # the run's own key is for /metrics and task setup, not the load
    assert sum(by_key.values()) == 120 and by_key["acme"] > by_key["beta"]  # popularity 2 : 1 : 1
    assert {row["tenant"] for row in report.requests} == {"acme", "beta", "flood"}


def test_429s_are_rate_limited_not_errors_and_never_retried(stub_server, tmp_path):
    url, state = stub_server
    state.rate_limited_keys = {"sk-flood-0003"}
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n" + "".join(f"  - {{name: {t.name}, key: {t.key}, popularity: {t.popularity:g}}}\n"
                                           for t in TENANTS))
    out = tmp_path / "r.json"
    assert main(["--url", url, "--tenants", str(path), "--requests", "60", "--concurrency", "3",
                 "--out", str(out), "--quiet"]) == 0
    assert sum(state.keys.values()) == 60  # one HTTP request per request: no retry after a 429
    text = out.read_text()
    assert "sk-acme" not in text and "sk-flood" not in text  # keys never land in the report
    report = json.loads(text)
    flood, acme = report["tenants"]["flood"], report["tenants"]["acme"]
    assert flood["num_requests"] == flood["num_rate_limited"] == state.keys["sk-flood-0003"] > 0
    assert flood["num_ok"] == flood["num_failed"] == 0 and flood["latency"]["count"] == 0
    assert flood["by_status"] == {"429": flood["num_requests"]}
    assert acme["num_ok"] == acme["num_requests"] and acme["num_rate_limited"] == 0
    assert acme["latency"]["p99"] > 0 and acme["first_token"]["p50"] > 0 and acme["share"] == 0.5
    client = report["client"]
    assert client["num_rate_limited"] == flood["num_requests"] and client["num_failed"] == 0
    assert client["num_ok"] == 60 - flood["num_requests"] and client["errors"] == {}
    assert [t["name"] for t in report["workload"]["tenants"]] == ["acme", "beta", "flood"]


def test_noisy_neighbour_open_loop_floods_and_the_table_shows_it(stub_server):
    url, state = stub_server
    config = LoadConfig(url=url, mode="open", rate=8.0, duration_s=1.5, tenants=TENANTS, noisy_tenant="flood",
                        noisy_factor=6.0, seed=3)
    report = run(config)
    counts = {name: t.num_requests for name, t in report.tenants.items()}
    assert counts["flood"] > 3 * max(counts["acme"], counts["beta"]) > 0  # 48 req/s against 8 and 8
    assert report.client.num_ok == sum(counts.values()) == sum(state.keys.values())
    assert report.tenants["flood"].is_noisy and not report.tenants["acme"].is_noisy
    assert {n: t.num_requests for n, t in run(config).tenants.items()} == counts  # same seed, same arrivals
    console = Console(record=True, width=160)
    render(report, console)
    shown = console.export_text()
    assert "per tenant" in shown and "flood *" in shown and "the noisy tenant" in shown and "ttft p99" in shown
    assert "noisy: flood x6; rate per steady tenant" in shown and "0 rate limited" in shown


def test_noisy_neighbour_closed_loop_has_factor_times_the_workers(stub_server, monkeypatch):
    url, state = stub_server
    monkeypatch.setattr(runner, "GRACE_S", 0.2)
    state.mode = "trickle"  # requests never finish within the run: each worker has exactly one in flight
    report = run(LoadConfig(url=url, concurrency=2, duration_s=0.3, request_timeout_s=0.5, tenants=TENANTS,
                            noisy_tenant="flood", noisy_factor=3))
    assert {name: t.num_requests for name, t in report.tenants.items()} == {"acme": 2, "beta": 2, "flood": 6}
    assert {name: t.num_failed for name, t in report.tenants.items()} == {"acme": 2, "beta": 2, "flood": 6}


def test_cli_refuses_bad_tenant_flags(stub_server, tmp_path, capsys):
    url, _ = stub_server
    good = tmp_path / "t.yaml"
    good.write_text("tenants:\n  - {name: a, key: sk-a-1}\n  - {name: b, key: sk-b-1}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  - {name: a}\n")
    for argv in (["--tenants", str(bad)], ["--tenants", str(tmp_path / "missing.yaml")],
                 ["--tenants", str(good), "--noisy-tenant", "zed"], ["--noisy-factor", "3"],
                 ["--tenants", str(good), "--noisy-tenant", "a", "--noisy-factor", "0.5"]):
        assert main(["--url", url, "--requests", "1", "--quiet", *argv]) == 2, argv
    out = capsys.readouterr().out
    assert "'key' must be a non-empty string" in out and "cannot read tenants file" in out
    assert "not in the tenants file" in out and "--noisy-factor needs --noisy-tenant" in out
