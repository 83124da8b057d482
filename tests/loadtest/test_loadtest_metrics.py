"""The server's /metrics: parsed with prometheus_client, figures found by name, deltas, missing names reported."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loadtest.metrics import FIGURES, parse_metrics
from loadtest.server_figures import compare


def registry_like_a_server():
    r = CollectorRegistry()
    m = {
        "http": Counter("promptserve_http_requests", "x", ["route", "method", "status"], registry=r),
        "gens": Counter("promptserve_generations", "x", ["finish_reason"], registry=r),
        "tokens": Counter("promptserve_generated_tokens", "x", registry=r),
        "task": Counter("promptserve_task_requests", "x", ["task"], registry=r),
        "queue": Gauge("promptserve_queue_depth", "x", registry=r),
        "batch": Gauge("promptserve_running_batch_size", "x", registry=r),
        "running": Gauge("promptserve_engine_running", "x", registry=r),
        "hits": Counter("promptserve_prompt_store_hits", "x", registry=r),
        "misses": Counter("promptserve_prompt_store_misses", "x", registry=r),
        "loads": Counter("promptserve_prompt_store_loads", "x", registry=r),
        "load_errors": Counter("promptserve_prompt_store_load_errors", "x", registry=r),
        "lat": Histogram("promptserve_request_latency_seconds", "x", registry=r),
        "qt": Histogram("promptserve_queue_time_seconds", "x", registry=r),
    }
    return r, m


def test_deltas_by_status_route_task_and_store():
    r, m = registry_like_a_server()
    m["http"].labels("/generate", "POST", "200").inc(5)
    m["http"].labels("/metrics", "GET", "200").inc(3)
    m["hits"].inc(2)
    before = parse_metrics(generate_latest(r).decode())
    m["http"].labels("/generate_stream", "POST", "200").inc(7)
    m["http"].labels("/generate", "POST", "429").inc(2)
    m["http"].labels("/metrics", "GET", "200").inc(4)  # scrapes are not generation requests
    m["http"].labels("/v1/tasks/{task_id}", "PUT", "201").inc(3)
    m["gens"].labels("length").inc(7)
    m["tokens"].inc(112)
    m["task"].labels("a").inc(4)
    m["task"].labels("b").inc(3)
    m["hits"].inc(6)
    m["misses"].inc(1)
    m["queue"].set(3)
    m["batch"].set(8)
    m["running"].set(1)
    after = parse_metrics(generate_latest(r).decode())
    f = compare(before, after)
    assert f.is_available
    assert f.counters["requests"] == {"200": 7, "429": 2}
    assert f.counters["requests_per_task"] == {"a": 4, "b": 3}
    assert f.counters["generations"] == {"length": 7}
    assert f.counters["generated_tokens"] == {"all": 112}
    assert f.counters["store_hits"] == {"all": 6} and f.counters["store_misses"] == {"all": 1}
    assert f.counters["store_loads"] == {}  # found, did not move
    assert f.families["store_loads"] == "promptserve_prompt_store_loads"
    assert f.families["running_batch_size"] == "promptserve_running_batch_size"
    assert f.gauges_after == {"queue_depth": 3, "running_batch_size": 8}
    assert f.missing == ["prompt_tokens", "store_evictions"]


def test_unknown_names_are_reported_missing_not_fatal():
    r = CollectorRegistry()
    Counter("something_else", "x", registry=r).inc()
    snap = parse_metrics(generate_latest(r).decode())
    f = compare(snap, snap)
    assert f.is_available and f.counters == {}
    assert f.missing == [s.key for s in FIGURES]


def test_no_metrics_endpoint():
    f = compare(None, None)
    assert not f.is_available and len(f.missing) == len(FIGURES)


def test_parse_keeps_labels_and_types():
    text = '# HELP x_total a\n# TYPE x_total counter\nx_total{route="/generate",status="200"} 3.0\n'
    snap = parse_metrics(text)
    assert snap.types == {"x": "counter"}
    assert snap.family_samples("x", "_total") == {(("route", "/generate"), ("status", "200")): 3.0}
