"""Report writing: JSON with the workload and every figure; PNG plots of a run and of a sweep."""

from __future__ import annotations

import json

from rich.console import Console

from loadtest.client import RequestRecord
from loadtest.config import LoadConfig
from loadtest.distributions import Distribution
from loadtest.plot import plot_run, plot_sweep
from loadtest.report import Report, count_check, request_rows, workload_dict, write_json
from loadtest.server_figures import ServerFigures
from loadtest.stats import run_figures, throughput_series
from loadtest.table import render

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_report(concurrency=4, server=None):
    config = LoadConfig(url="http://127.0.0.1:9", concurrency=concurrency, num_requests=30, api_key="secret",
                        max_new_tokens=Distribution.parse("uniform:4,8"))
    records = []
    for i in range(30):
        r = RequestRecord(i, f"t{i % 3}", start_s=i * 0.1, end_s=i * 0.1 + 0.2 + concurrency * 0.01,
                          status="200" if i % 10 else "429", first_token_s=0.05, inter_token_s=[0.01, 0.02],
                          generated_tokens=6 if i % 10 else 0)
        records.append(r)
    figures = run_figures(records, 3.5)
    server = server or ServerFigures(is_available=True, families={"requests": "x_http_requests",
                                                                  "queue_depth": "x_queue_depth"},
                                     counters={"requests": {"200": 27, "429": 3}},
                                     gauge_series={"queue_depth": [[0.0, 0], [1.0, 2], [2.0, 1]]})
    return Report(target="http://127.0.0.1:9", started_at="2026-01-01T00:00:00+00:00", workload=workload_dict(config),
                  num_tasks=3, tasks_created=True, client=figures, server=server, counts=count_check(figures, server),
                  throughput_series=throughput_series(records, 3.5), requests=request_rows(records))


def test_json_has_workload_and_figures(tmp_path):
    report = make_report()
    path = write_json(report, tmp_path / "sub" / "report.json")
    data = json.loads(path.read_text())
    assert data["workload"]["num_requests"] == 30 and data["workload"]["max_new_tokens"] == "uniform:4,8"
    assert data["workload"]["api_key"] == "***"  # the key never lands in a file
    assert data["client"]["by_status"] == {"200": 27, "429": 3}
    assert data["client"]["latency"]["p99"] > 0 and data["client"]["first_token"]["p50"] == 0.05
    assert data["counts"] == {"client_total": 30, "server_total": 30.0, "is_match": True}
    assert len(data["requests"]) == 30 and data["requests"][0]["task_id"] == "t0"
    assert [t["task_id"] for t in data["client"]["per_task"]] == ["t0", "t1", "t2"]
    assert data["server"]["gauge_series"]["queue_depth"][1] == [1.0, 2]


def test_count_check_mismatch_and_unknown():
    report = make_report(server=ServerFigures(is_available=True, counters={"requests": {"200": 29}}))
    assert report.counts.is_match is False
    report = make_report(server=ServerFigures(is_available=False))
    assert report.counts.is_match is None and report.counts.server_total is None


def test_plots_are_png(tmp_path):
    run_png = plot_run(make_report(), tmp_path / "run.png")
    sweep_png = plot_sweep([make_report(c) for c in (1, 2, 4)], tmp_path / "sweep.png")
    for path in (run_png, sweep_png):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_sweep_json_and_table(tmp_path):
    reports = [make_report(c) for c in (1, 2)]
    data = json.loads(write_json({"sweep": reports}, tmp_path / "s.json").read_text())
    assert [r["workload"]["concurrency"] for r in data["sweep"]] == [1, 2]
    console = Console(record=True, width=120)
    render(reports[0], console)
    text = console.export_text()
    assert "27 ok, 3 rate limited, 0 failed" in text and "server count" in text and "match" in text and "t0" in text


def test_progress_bar_by_count_and_by_duration():
    import io

    from loadtest.progress import RichProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    progress = RichProgress(console)
    for num_requests, duration in ((3, None), (None, 2.0)):
        progress.begin("concurrency 2", num_requests, duration)
        for elapsed in (0.5, 1.0, 1.5):
            progress.update(elapsed)
        task = progress.progress.tasks[0]
        assert task.completed == (3 if num_requests else 1.5) and task.fields["done"] == 3
        progress.end()
        assert progress.progress is None
