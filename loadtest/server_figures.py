"""What the server's /metrics says about a run: counter deltas (before/after) and gauges sampled during it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx

from loadtest.metrics import FIGURES, MetricsSnapshot, by_label, counter_values, find_family, scrape


@dataclass
class ServerFigures:
    """The server's side of a run. Figures we could not find by name are listed in `missing`."""

    is_available: bool = False  # False: no /metrics, or not Prometheus text
    families: dict[str, str] = field(default_factory=dict)  # figure -> metric family used
    missing: list[str] = field(default_factory=list)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # figure -> label value -> delta
    gauges_after: dict[str, float] = field(default_factory=dict)
    gauge_series: dict[str, list[list[float]]] = field(default_factory=dict)  # figure -> [[t, value], ...]

    def gauge_peak(self, key: str) -> float | None:
        """The highest value of a sampled gauge during the run."""
        series = self.gauge_series.get(key)
        return max(v for _, v in series) if series else None

    def gauge_mean(self, key: str) -> float | None:
        """The mean of a sampled gauge during the run."""
        series = self.gauge_series.get(key)
        return sum(v for _, v in series) / len(series) if series else None


def compare(before: MetricsSnapshot | None, after: MetricsSnapshot | None) -> ServerFigures:
    """Counter deltas and gauge values between two scrapes."""
    figures = ServerFigures(is_available=before is not None and after is not None)
    if not figures.is_available:
        figures.missing = [spec.key for spec in FIGURES]
        return figures
    for spec in FIGURES:
        family = find_family(after, spec)
        if family is None:
            figures.missing.append(spec.key)
            continue
        figures.families[spec.key] = family
        if spec.kind == "counter":
            old = by_label(counter_values(before, family), spec.label, spec.is_generation_route)
            new = by_label(counter_values(after, family), spec.label, spec.is_generation_route)
            delta = {k: v - old.get(k, 0.0) for k, v in new.items()}
            figures.counters[spec.key] = {k: v for k, v in delta.items() if v}
        else:
            figures.gauges_after[spec.key] = sum(after.family_samples(family).values())
    return figures


class GaugeSampler:
    """Samples the gauges (queue depth, running batch size) every `interval_s` until stopped."""

    def __init__(self, client: httpx.AsyncClient, families: dict[str, str], interval_s: float, clock):
        self.client = client
        self.families = {k: v for k, v in families.items() if k in ("queue_depth", "running_batch_size")}
        self.interval_s = interval_s
        self.clock = clock
        self.series: dict[str, list[list[float]]] = {k: [] for k in self.families}

    async def run(self, stop: asyncio.Event, max_samples: int = 100_000) -> None:
        """Sample until `stop` is set (bounded by `max_samples` as well)."""
        for _ in range(max_samples):
            if not self.families:
                return
            snapshot = await scrape(self.client)
            if snapshot is not None:
                t = self.clock()
                for key, family in self.families.items():
                    self.series[key].append([round(t, 3), sum(snapshot.family_samples(family).values())])
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
                return
            except asyncio.TimeoutError:
                continue
