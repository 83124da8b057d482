"""Workload generators: length distributions, Zipf / uniform task choice, Poisson arrivals."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from loadtest.config import ConfigError, LoadConfig, TaskSetup
from loadtest.distributions import Distribution
from loadtest.workload import TaskPicker, Workload, make_prompt, poisson_arrivals, zipf_weights


@pytest.mark.parametrize("spec, kind, a, b", [
    ("32", "fixed", 32, 0), ("fixed:7", "fixed", 7, 0), ("uniform:16,64", "uniform", 16, 64),
    ("normal:48,8", "normal", 48, 8), ("lognormal:32,0.5", "lognormal", 32, 0.5),
])
def test_distribution_parse(spec, kind, a, b):
    d = Distribution.parse(spec)
    assert (d.kind, d.a, d.b) == (kind, a, b)
    assert Distribution.parse(str(d)) == d  # the report's spelling parses back


@pytest.mark.parametrize("spec", ["", "x", "uniform:5", "uniform:9,3", "fixed:0", "normal:0,1", "zipf:1,2", "1,2"])
def test_distribution_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        Distribution.parse(spec)


@pytest.mark.parametrize("spec", ["uniform:16,64", "normal:48,8", "lognormal:32,0.5"])
def test_distribution_samples_match_mean_and_stay_positive(spec):
    d = Distribution.parse(spec)
    rng = random.Random(0)
    values = [d.sample(rng) for _ in range(20_000)]
    assert min(values) >= 1 and all(isinstance(v, int) for v in values)
    assert statistics.fmean(values) == pytest.approx(d.mean, rel=0.03)


def test_uniform_covers_both_ends_and_nothing_else():
    rng = random.Random(1)
    values = {Distribution.parse("uniform:3,6").sample(rng) for _ in range(2000)}
    assert values == {3, 4, 5, 6}


def test_normal_is_clipped_at_one():
    rng = random.Random(2)
    values = [Distribution.parse("normal:2,10").sample(rng) for _ in range(2000)]
    assert min(values) == 1


def test_zipf_weights():
    w = zipf_weights(64, 1.1)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2 ** 1.1)
    assert w[0] / w[9] == pytest.approx(10 ** 1.1)
    assert all(x > y for x, y in zip(w, w[1:]))


def test_zipf_picker_follows_the_weights():
    ids = [f"t{i}" for i in range(8)]
    picker = TaskPicker(ids, "zipf", 1.0, random.Random(3))
    n = 40_000
    counts = Counter(picker.pick() for _ in range(n))
    for task_id, weight in zip(ids, zipf_weights(8, 1.0)):
        assert counts[task_id] / n == pytest.approx(weight, abs=0.01)


def test_uniform_picker_is_flat_and_no_tasks_means_bare_model():
    ids = [f"t{i}" for i in range(4)]
    picker = TaskPicker(ids, "uniform", 1.0, random.Random(4))
    counts = Counter(picker.pick() for _ in range(20_000))
    assert set(counts) == set(ids)
    assert max(counts.values()) / min(counts.values()) < 1.1
    assert TaskPicker([], "zipf", 1.0, random.Random(0)).pick() is None


def test_poisson_arrivals_have_exponential_gaps():
    rate = 25.0
    arrivals = poisson_arrivals(rate, random.Random(5))
    times = [next(arrivals) for _ in range(20_000)]
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # exponential: standard deviation equals the mean (coefficient of variation 1)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)
    # counts in 1 s windows: Poisson, variance equals mean
    windows = Counter(int(t) for t in times if t < 700)
    per_s = [windows.get(i, 0) for i in range(700)]
    assert statistics.pvariance(per_s) / statistics.fmean(per_s) == pytest.approx(1.0, abs=0.15)


def test_workload_is_deterministic_for_a_seed():
    config = LoadConfig(url="http://127.0.0.1:1", num_requests=5, prompt_tokens=Distribution.parse("uniform:4,9"),
                        max_new_tokens=Distribution.parse("uniform:1,5"), popularity="zipf")
    one = [Workload(config, ["a", "b", "c"]).spec(i) for i in range(1)]
    w1, w2 = Workload(config, ["a", "b", "c"]), Workload(config, ["a", "b", "c"])
    assert [w1.spec(i) for i in range(50)] == [w2.spec(i) for i in range(50)]
    spec = one[0]
    assert len(spec.prompt.split()) == spec.prompt_words and 4 <= spec.prompt_words <= 9
    assert 1 <= spec.max_new_tokens <= 5 and spec.task_id in ("a", "b", "c")


def test_make_prompt_length():
    assert len(make_prompt(17, random.Random(0)).split()) == 17


@pytest.mark.parametrize("kwargs", [
    {}, {"duration_s": 0}, {"num_requests": 0}, {"num_requests": 10 ** 7}, {"duration_s": 10 ** 6},
    {"num_requests": 1, "concurrency": 0}, {"num_requests": 1, "mode": "open"},
    {"num_requests": 1, "popularity": "pareto"}, {"num_requests": 1, "zipf_s": 0, "popularity": "zipf"},
    {"num_requests": 1, "task_ids": ("a",), "setup": TaskSetup(num_tasks=2)},
])
def test_config_refuses_unbounded_or_odd_runs(kwargs):
    with pytest.raises(ConfigError):
        LoadConfig(url="http://127.0.0.1:1", **kwargs).validate()
