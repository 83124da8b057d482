"""Percentile math and the figures computed from request records."""

from __future__ import annotations

import random

import numpy as np
import pytest

from loadtest.client import RequestRecord
from loadtest.stats import Summary, percentile, run_figures, throughput_series


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy_linear(n):
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="linear")))


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_of():
    s = Summary.of([0.1, 0.2, 0.3, 0.4])
    assert (s.count, s.max) == (4, 0.4)
    assert s.mean == pytest.approx(0.25) and s.p50 == pytest.approx(0.25)
    assert Summary.of([]) == Summary(0, None, None, None, None, None)


def record(index, status="200", start=0.0, end=1.0, tokens=4, task="a", ttft=None, gaps=()):
    return RequestRecord(index=index, task_id=task, start_s=start, end_s=end, status=status,
                         first_token_s=ttft, inter_token_s=list(gaps), generated_tokens=tokens)


def test_run_figures_counts_and_rates():
    records = [record(0, ttft=0.1, gaps=(0.01, 0.03)), record(1, end=2.0, task="b", ttft=0.3, gaps=(0.02,)),
               record(2, status="429", task="b", tokens=0), record(3, status="timeout", tokens=0)]
    records[3].error = "ReadTimeout"
    f = run_figures(records, wall_s=4.0)
    assert (f.num_requests, f.num_ok, f.num_failed, f.num_rate_limited) == (4, 2, 1, 1)  # a 429 is no error
    assert f.by_status == {"200": 2, "429": 1, "timeout": 1}
    assert f.generated_tokens == 8 and f.tokens_per_s == 2.0 and f.requests_per_s == 0.5
    assert f.latency.max == 2.0 and f.first_token.p50 == pytest.approx(0.2)
    assert f.inter_token.count == 3 and f.inter_token.max == pytest.approx(0.03)
    assert {t.task_id: (t.num_requests, t.num_ok) for t in f.per_task} == {"a": (2, 1), "b": (2, 1)}
    assert f.errors == {"timeout: ReadTimeout": 1}


def test_throughput_series_buckets_by_completion():
    records = [record(0, end=0.5), record(1, end=0.7), record(2, end=2.2, tokens=10), record(3, end=2.9, status="500")]
    series = throughput_series(records, wall_s=3.0)
    assert series == [[0.0, 2.0, 8.0], [1.0, 0.0, 0.0], [2.0, 1.0, 10.0]]


def test_streamed_tokens_are_counted_when_they_arrive():
    r = record(0, start=0.5, end=3.2, tokens=4, ttft=0.2, gaps=(0.5, 1.0, 1.0))  # tokens at 0.7, 1.2, 2.2, 3.2
    assert throughput_series([r], wall_s=4.0, bucket_s=1.0) == [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0],
                                                                 [2.0, 0.0, 1.0], [3.0, 1.0, 1.0]]


def test_request_body_is_tgi_shaped():
    from loadtest.client import request_body
    from loadtest.workload import RequestSpec

    spec = RequestSpec(index=0, task_id="t", prompt="hi there", prompt_words=2, max_new_tokens=7)
    assert request_body(spec, ignore_eos=False) == {"inputs": "hi there", "task_id": "t",
                                                    "parameters": {"max_new_tokens": 7, "details": True}}
    bare = RequestSpec(index=0, task_id=None, prompt="x", prompt_words=1, max_new_tokens=1)
    body = request_body(bare, ignore_eos=True)
    assert "task_id" not in body and body["parameters"]["ignore_eos_token"] is True
