"""The harness end to end against a stub server under uvicorn: counts, bounds, failures, redirects."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from loadtest import runner
from loadtest.cli import main
from loadtest.config import LoadConfig, TaskSetup
from loadtest.cpu import ProcessError, cpu_seconds
from loadtest.distributions import Distribution
from loadtest.session import run_session


def run(config: LoadConfig):
    return asyncio.run(run_session(config))[0]


def test_closed_loop_counts_tasks_and_cleanup(stub_server):
    url, state = stub_server
    state.num_tokens = 5
    report = run(LoadConfig(url=url, concurrency=4, num_requests=25, setup=TaskSetup(num_tasks=3),
                            max_new_tokens=Distribution.fixed(5)))
    assert report.client.num_requests == 25 and report.client.by_status == {"200": 25}
    assert state.hits == {"/generate_stream": 25}
    assert report.counts.is_match is True and report.counts.server_total == 25
    assert report.num_tasks == 3 and report.tasks_created
    assert sum(t.num_requests for t in report.client.per_task) == 25
    assert state.task_ids == []  # created before the run, deleted after it
    assert report.client.first_token.count == 25 and report.client.inter_token.count == 25 * 4
    assert report.client.generated_tokens == 25 * 5


def test_plain_generate_and_open_loop(stub_server):
    url, state = stub_server
    report = run(LoadConfig(url=url, mode="open", rate=40, duration_s=1.0, is_stream=False,
                            max_new_tokens=Distribution.parse("uniform:1,9")))
    n = report.client.num_requests
    assert n > 5 and state.hits == {"/generate": n} and report.client.num_ok == n
    assert report.client.generated_tokens == sum(r["generated_tokens"] for r in report.requests)
    assert report.client.first_token.count == 0  # no stream, no time to first token
    assert max(r["start_s"] for r in report.requests) < 1.0  # nothing issued after the duration


def test_redirects_are_not_followed(stub_server):
    url, state = stub_server
    state.mode = "redirect"
    report = run(LoadConfig(url=url, concurrency=2, num_requests=6))
    assert report.client.by_status == {"307": 6} and report.client.num_ok == 0
    assert state.hits == {"/generate_stream": 6}


def test_stream_errors_are_failures(stub_server):
    url, state = stub_server
    state.mode = "stream_error"
    report = run(LoadConfig(url=url, concurrency=2, num_requests=4))
    assert report.client.by_status == {"stream_error": 4}
    assert list(report.client.errors) == ["stream_error: boom"]


def test_a_hanging_server_cannot_stall_the_run(stub_server):
    url, state = stub_server
    state.mode = "hang"
    report = run(LoadConfig(url=url, concurrency=3, duration_s=0.3, request_timeout_s=0.5))
    assert report.client.by_status == {"timeout": 3}  # one per worker, then the duration was over


def test_the_hard_deadline_cancels_endless_streams(stub_server, monkeypatch):
    url, state = stub_server
    state.mode = "trickle"
    monkeypatch.setattr(runner, "GRACE_S", 0.2)
    report = run(LoadConfig(url=url, concurrency=2, duration_s=0.2, request_timeout_s=0.5))
    # hard deadline = duration + request timeout + grace: both streams are cut there, not after 60 s
    assert report.client.by_status == {"cancelled": 2}


def test_cli_writes_json_and_png(stub_server, tmp_path):
    url, state = stub_server
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["--url", url, "--requests", "12", "--concurrency", "3", "--out", str(out), "--plot", str(png),
                 "--quiet", "--prompt-tokens", "normal:20,4"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["client"]["num_ok"] == 12 and data["workload"]["prompt_tokens"] == "normal:20,4"
    assert png.read_bytes().startswith(b"\x89PNG")
    sweep = tmp_path / "s.json"
    assert main(["--url", url, "--requests", "4", "--sweep", "1,2", "--out", str(sweep), "--plot",
                 str(tmp_path / "s.png"), "--quiet"]) == 0
    assert [r["workload"]["concurrency"] for r in json.loads(sweep.read_text())["sweep"]] == [1, 2]


def test_cli_refuses_remote_and_dead_targets(capsys):
    assert main(["--url", "http://10.1.2.3:8000", "--requests", "1", "--quiet"]) == 2
    assert main(["--url", "http://127.0.0.1:9", "--requests", "1", "--quiet"]) == 2
    assert "nothing answers" in capsys.readouterr().out


def test_server_cpu_of_a_local_pid(stub_server, tmp_path):
    url, _ = stub_server  # the stub runs in this process
    out = tmp_path / "cpu.json"
    assert main(["--url", url, "--requests", "8", "--server-pid", str(os.getpid()), "--out", str(out), "--quiet"]) == 0
    cpu = json.loads(out.read_text())["server_cpu"]
    assert cpu["pid"] == os.getpid() and cpu["cpu_s"] > 0 and cpu["generated_tokens"] == 8 * 3
    assert cpu["tokens_per_cpu_s"] == pytest.approx(24 / cpu["cpu_s"], rel=1e-3)
    assert main(["--url", url, "--requests", "1", "--server-pid", "999999999", "--quiet"]) == 2


def test_cpu_seconds_reads_proc():
    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert cpu_seconds(os.getpid()) >= before > 0
    with pytest.raises(ProcessError):
        cpu_seconds(999_999_999)
