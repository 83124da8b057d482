"""The report of a run (or a sweep): one dataclass, written as JSON, shown as a rich table."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.client import RequestRecord
from loadtest.config import LoadConfig
from loadtest.cpu import CpuUse
from loadtest.server_figures import ServerFigures
from loadtest.stats import RunFigures
from loadtest.tenant_stats import TenantSummary

REPORT_VERSION = 2  # 2: per-tenant figures; num_failed no longer counts 429s (num_rate_limited)
MAX_REQUEST_ROWS = 100_000  # per-request rows kept in the JSON


@dataclass
class CountCheck:
    """Requests the client saw answered with an HTTP status vs requests the server counted."""

    client_total: int
    server_total: float | None
    is_match: bool | None  # None: the server's request counter was not found


@dataclass
class Report:
    """Everything about one run: the workload, the client's figures, the server's figures."""

    target: str
    started_at: str
    workload: dict
    num_tasks: int
    tasks_created: bool
    client: RunFigures
    server: ServerFigures
    counts: CountCheck
    throughput_series: list[list[float]] = field(default_factory=list)  # [t, req/s, tok/s]
    requests: list[dict] = field(default_factory=list)  # one row per request
    server_cpu: CpuUse | None = None  # with --server-pid
    client_cpu_s: float | None = None  # this harness's own CPU time over the run (is the client a bottleneck?)
    tenants: dict[str, TenantSummary] = field(default_factory=dict)  # with --tenants: name -> its figures
    version: int = REPORT_VERSION


def workload_dict(config: LoadConfig) -> dict:
    """The config as JSON-friendly values, without a single API key (neither --api-key nor a tenant's)."""
    out = dataclasses.asdict(config)
    out["prompt_tokens"] = str(config.prompt_tokens)
    out["max_new_tokens"] = str(config.max_new_tokens)
    out["api_key"] = "***" if config.api_key else None
    out["tenants"] = [{"name": t.name, "key": "***", "popularity": t.popularity} for t in config.tenants]
    out["task_ids"] = list(config.task_ids)[:100]
    return out


def request_rows(records: list[RequestRecord]) -> list[dict]:
    """Compact per-request rows, in the order requests were issued."""
    rows = []
    for r in sorted(records, key=lambda r: r.index)[:MAX_REQUEST_ROWS]:
        rows.append({"index": r.index, "task_id": r.task_id, "tenant": r.tenant, "start_s": round(r.start_s, 4),
                     "latency_s": round(r.latency_s, 4), "status": r.status,
                     "first_token_s": None if r.first_token_s is None else round(r.first_token_s, 4),
                     "generated_tokens": r.generated_tokens, "prompt_tokens": r.prompt_tokens,
                     "finish_reason": r.finish_reason})
    return rows


def count_check(client: RunFigures, server: ServerFigures) -> CountCheck:
    """Compare requests with an HTTP answer (client) to the server's request counter delta."""
    client_total = sum(n for status, n in client.by_status.items() if status.isdigit())
    counted = server.counters.get("requests")
    if counted is None:
        return CountCheck(client_total, None, None)
    server_total = sum(counted.values())
    return CountCheck(client_total, server_total, abs(server_total - client_total) < 0.5)


def to_jsonable(value):
    """Dataclasses and tuples as JSON values (a CpuUse with its derived figures)."""
    if isinstance(value, CpuUse):
        return {**to_jsonable(dataclasses.asdict(value)), "cores_busy": round(value.cores_busy, 4),
                "tokens_per_cpu_s": round(value.tokens_per_cpu_s, 4)}
    if dataclasses.is_dataclass(value):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def write_json(data, path: str | Path) -> Path:
    """Write a report (or a list of them, for a sweep) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2) + "\n", encoding="utf-8")
    return path
