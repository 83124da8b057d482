"""Figures from request records: percentiles, throughput, per-task summaries, throughput over time."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from loadtest.client import RequestRecord


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Distribution of one quantity, in seconds (None where there were no values)."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        """Summarise `values`."""
        values = list(values)
        mean = sum(values) / len(values) if values else None
        return cls(len(values), mean, percentile(values, 50), percentile(values, 90), percentile(values, 99),
                   max(values) if values else None)


@dataclass(frozen=True)
class TaskSummary:
    """One task's share of a run."""

    task_id: str
    num_requests: int
    num_ok: int
    generated_tokens: int
    latency: Summary


@dataclass(frozen=True)
class RunFigures:
    """The client's view of a run."""

    wall_s: float
    num_requests: int
    num_ok: int
    num_failed: int  # errors: neither ok nor rate limited
    num_rate_limited: int  # HTTP 429: the server's limits at work, not errors
    by_status: dict[str, int]
    requests_per_s: float
    generated_tokens: int
    tokens_per_s: float
    latency: Summary
    first_token: Summary
    inter_token: Summary
    per_task: list[TaskSummary] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # first few distinct error messages


def task_summaries(records: Iterable[RequestRecord]) -> list[TaskSummary]:
    """Per-task counts and latencies, busiest task first."""
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[r.task_id if r.task_id is not None else "(base model)"].append(r)
    out = [TaskSummary(task, len(rs), sum(r.is_ok for r in rs), sum(r.generated_tokens for r in rs if r.is_ok),
                       Summary.of([r.latency_s for r in rs if r.is_ok])) for task, rs in groups.items()]
    return sorted(out, key=lambda t: (-t.num_requests, t.task_id))


def run_figures(records: Sequence[RequestRecord], wall_s: float, max_errors: int = 5) -> RunFigures:
    """All client-side figures of a run that lasted `wall_s` seconds."""
    ok = [r for r in records if r.is_ok]
    tokens = sum(r.generated_tokens for r in ok)
    errors = Counter(f"{r.status}: {r.error}" for r in records if r.is_failed and r.error)
    num_rate_limited = sum(r.is_rate_limited for r in records)
    return RunFigures(
        wall_s=wall_s,
        num_requests=len(records),
        num_ok=len(ok),
        num_failed=len(records) - len(ok) - num_rate_limited,
        num_rate_limited=num_rate_limited,
        by_status=dict(sorted(Counter(r.status for r in records).items())),
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        generated_tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        latency=Summary.of([r.latency_s for r in ok]),
        first_token=Summary.of([r.first_token_s for r in ok if r.first_token_s is not None]),
        inter_token=Summary.of([gap for r in ok for gap in r.inter_token_s]),
        per_task=task_summaries(records),
        errors=dict(errors.most_common(max_errors)),
    )


def token_times(record: RequestRecord) -> list[float]:
    """When each generated token arrived (seconds from the run's start): streamed tokens, else the end."""
    if record.first_token_s is None:
        return [record.end_s] * record.generated_tokens
    times = [record.start_s + record.first_token_s]
    for gap in record.inter_token_s:
        times.append(times[-1] + gap)
    return times


def throughput_series(records: Sequence[RequestRecord], wall_s: float, bucket_s: float | None = None,
                      ) -> list[list[float]]:
    """[[bucket start s, completed requests/s, generated tokens/s], ...]; tokens counted as they arrive."""
    bucket_s = bucket_s or max(1.0, wall_s / 100)
    num_buckets = max(1, math.ceil(wall_s / bucket_s))
    reqs = [0] * num_buckets
    toks = [0] * num_buckets
    for r in records:
        if not r.is_ok:
            continue
        reqs[min(int(r.end_s / bucket_s), num_buckets - 1)] += 1
        for t in token_times(r):
            toks[min(int(t / bucket_s), num_buckets - 1)] += 1
    return [[round(i * bucket_s, 3), reqs[i] / bucket_s, toks[i] / bucket_s] for i in range(num_buckets)]
