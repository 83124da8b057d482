"""The server's own /metrics: scraped with prometheus_client's parser, figures found by name, deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

LabelKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every sample of one scrape: (sample name, sorted labels) -> value; family name -> type."""

    samples: dict[tuple[str, LabelKey], float]
    types: dict[str, str]

    def family_samples(self, family: str, suffix: str = "") -> dict[LabelKey, float]:
        """The samples of `family` (with `suffix`, e.g. "_total", "_count"), by labels."""
        name = family + suffix
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


@dataclass(frozen=True)
class FigureSpec:
    """How to find one figure among metric families whose names we do not know for sure."""

    key: str
    kind: str  # "counter" | "gauge"
    any_of: tuple[str, ...]  # the family name must contain one of these ...
    none_of: tuple[str, ...] = ()  # ... and none of these
    label: str | None = None  # break the figure down by this label (first of a few spellings)
    is_generation_route: bool = False  # keep only samples whose route label (if any) is a generation route


FIGURES = (
    FigureSpec("requests", "counter", ("request",), ("duration", "latency", "seconds", "size", "task"), "status",
               is_generation_route=True),
    FigureSpec("generations", "counter", ("generation",), ("token", "seconds"), "finish_reason"),
    FigureSpec("requests_per_task", "counter", ("request",), ("duration", "latency", "seconds", "size"), "task"),
    FigureSpec("generated_tokens", "counter", ("generated_tokens", "generation_tokens", "output_tokens")),
    FigureSpec("prompt_tokens", "counter", ("prompt_tokens", "input_tokens")),
    FigureSpec("queue_depth", "gauge", ("queue",)),
    FigureSpec("running_batch_size", "gauge", ("batch",)),
    FigureSpec("store_hits", "counter", ("hit",)),
    FigureSpec("store_misses", "counter", ("miss",)),
    FigureSpec("store_loads", "counter", ("load",), ("download", "upload")),
    FigureSpec("store_evictions", "counter", ("evict",)),
)
LABEL_SPELLINGS = {"status": ("status", "code", "status_code"), "task": ("task", "task_id", "adapter"),
                   "finish_reason": ("finish_reason", "reason")}
ROUTE_LABELS = ("route", "path", "handler", "endpoint")
GENERATION_ROUTES = ("/generate", "/generate_stream")


def parse_metrics(text: str) -> MetricsSnapshot:
    """Parse Prometheus text exposition into a snapshot."""
    samples: dict[tuple[str, LabelKey], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return MetricsSnapshot(samples, types)


async def scrape(client: httpx.AsyncClient) -> MetricsSnapshot | None:
    """GET /metrics, or None when the server has none (or it is not Prometheus text)."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return parse_metrics(response.text)
    except ValueError:
        return None


def find_family(snapshot: MetricsSnapshot, spec: FigureSpec) -> str | None:
    """The family that best fits `spec` (shortest matching name, labelled ones first), or None."""
    label_names = LABEL_SPELLINGS.get(spec.label or "", ())
    candidates = []
    for name, kind in snapshot.types.items():
        if kind != spec.kind or not any(k in name for k in spec.any_of) or any(k in name for k in spec.none_of):
            continue
        labels = {k for (n, ls), _ in snapshot.samples.items() if n.startswith(name) for k, _ in ls}
        if label_names and not labels & set(label_names):
            continue
        candidates.append(name)
    return min(candidates, key=len) if candidates else None


def counter_values(snapshot: MetricsSnapshot, family: str) -> dict[LabelKey, float]:
    """A counter's samples by labels (prometheus_client names counter samples `<family>_total`)."""
    return snapshot.family_samples(family, "_total") or snapshot.family_samples(family)


def on_generation_route(labels: LabelKey) -> bool:
    """True unless the sample has a route label naming something other than /generate(_stream)."""
    routes = [v for k, v in labels if k in ROUTE_LABELS]
    return not routes or routes[0] in GENERATION_ROUTES


def by_label(values: dict[LabelKey, float], label: str | None, is_generation_route: bool = False) -> dict[str, float]:
    """Sum `values` over all labels but `label` (any of its spellings); "all" when there is none."""
    out: dict[str, float] = {}
    spellings = LABEL_SPELLINGS.get(label or "", ())
    for labels, value in values.items():
        if is_generation_route and not on_generation_route(labels):
            continue
        key = next((v for k, v in labels if k in spellings), "all")
        out[key] = out.get(key, 0.0) + value
    return out
