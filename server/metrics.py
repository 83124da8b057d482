"""Prometheus metrics, one registry per app (no process globals, so tests can run several apps)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.capped_labels import CappedLabels
from server.engine.types import GenerationResult
from server.tenancy.tenant_metrics import TenantMetrics

OTHER_TASKS = "__other__"
BASE_MODEL = "__base__"
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Store statistics that only ever grow are exported as counters; the rest (bytes, entries) as gauges.
_STORE_COUNTERS = {"hits", "misses", "loads", "load_errors", "not_found", "evictions", "writes", "deletes"}


class Metrics:
    """The server's metrics; `render()` gives the Prometheus text format."""

    def __init__(self, *, max_task_labels: int, engine_stats: Callable[[], object] | None = None,
                 store_stats: Callable[[], object] | None = None, max_tenant_labels: int = 100):
        self.registry = CollectorRegistry(auto_describe=True)
        self._task_labels = CappedLabels(max_task_labels, OTHER_TASKS)
        r = self.registry
        self.http_requests = Counter("promptserve_http_requests", "HTTP requests by route, method, status",
                                     ["route", "method", "status"], registry=r)
        self.generations = Counter("promptserve_generations", "Finished generations by finish reason",
                                   ["finish_reason"], registry=r)
        self.generated_tokens = Counter("promptserve_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("promptserve_prompt_tokens", "Input tokens processed", registry=r)
        self.task_requests = Counter("promptserve_task_requests",
                                     f"Generations by task (at most {max_task_labels} task labels; "
                                     f"the rest as {OTHER_TASKS})", ["task"], registry=r)
        self.ttft = Histogram("promptserve_time_to_first_token_seconds", "Submit to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("promptserve_request_latency_seconds", "Submit to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("promptserve_queue_time_seconds", "Time waiting before prefill",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.affinity = Counter("promptserve_affinity_requests", "Requests for a task that reached a replica "
                                "already holding it (hit) or not (miss); only with --replicas", ["result"],
                                registry=r)
        self.tenants = TenantMetrics(r, max_tenant_labels)
        r.register(_LiveCollector(engine_stats, store_stats))

    def observe_affinity(self, *, is_hit: bool) -> None:
        """A task's request reached this replica (scale-out): count a hit or a miss."""
        self.affinity.labels(result="hit" if is_hit else "miss").inc()

    def task_label(self, task_id: str | None) -> str:
        """The label for a task, capping the number of distinct labels."""
        return BASE_MODEL if task_id is None else self._task_labels(task_id)

    def forget_task(self, task_id: str) -> None:
        """A deleted task: its series leave /metrics and its label slot is free for another task."""
        if not self._task_labels.forget(task_id):
            return
        try:
            self.task_requests.remove(task_id)
        except KeyError:  # labelled but never counted
            pass

    def observe_http(self, route: str, method: str, status: int) -> None:
        """Count one finished HTTP request."""
        method = method if method in _METHODS else "OTHER"  # any token is a method: keep labels bounded
        self.http_requests.labels(route, method, str(status)).inc()

    def observe_generation(self, result: GenerationResult) -> None:
        """Record one finished generation."""
        self.generations.labels(result.finish_reason).inc()
        self.generated_tokens.inc(result.generated_tokens)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.task_requests.labels(self.task_label(result.task_id)).inc()
        self.latency.observe(result.timings.total_s)
        self.queue_time.observe(result.timings.queue_s)
        if result.timings.first_token_s is not None:
            self.ttft.observe(result.timings.first_token_s)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def render_for(self, may_see_task: Callable[[str], bool], may_see_tenant: Callable[[str], bool],
                   is_operator: bool = True) -> bytes:
        """`render()` without the samples labelled with tasks or tenants the caller may not see. The series of
        the whole server (queues, HTTP counts, the store) are an operator's: one tenant's admin key does not
        learn from them how busy the other tenants keep the server."""
        lines = self.render().decode().splitlines(keepends=True)
        kept = [line for line in lines if _visible(line, may_see_task, may_see_tenant, is_operator)]
        return "".join(kept).encode()


_TASK_LABEL = re.compile(r'[{,]task="([^"]*)"')
_TENANT_LABEL = re.compile(r'[{,]tenant="([^"]*)"')


def _visible(line: str, may_see_task: Callable[[str], bool], may_see_tenant: Callable[[str], bool],
             is_operator: bool) -> bool:
    if line.startswith("#"):
        return True
    task, tenant = _TASK_LABEL.search(line), _TENANT_LABEL.search(line)
    if task is None and tenant is None:
        return is_operator
    if task is not None and task.group(1) in (OTHER_TASKS, BASE_MODEL) and not is_operator:
        return False  # summed over many tenants' requests
    if task is not None and task.group(1) not in (OTHER_TASKS, BASE_MODEL) and not may_see_task(task.group(1)):
        return False
    return tenant is None or may_see_tenant(tenant.group(1))


class _LiveCollector:
    """Reads engine and store statistics at scrape time (queue depth, batch size, cache counters)."""

    def __init__(self, engine_stats, store_stats):
        self._engine_stats = engine_stats
        self._store_stats = store_stats

    def describe(self):
        return []  # names depend on the store's fields; nothing to check ahead of time

    def collect(self):
        s = self._engine_stats() if self._engine_stats is not None else None
        if s is not None:
            yield GaugeMetricFamily("promptserve_queue_depth", "Requests waiting", value=s.num_waiting)
            yield GaugeMetricFamily("promptserve_running_batch_size", "Requests being decoded",
                                    value=s.num_running)
            yield CounterMetricFamily("promptserve_engine_steps", "Engine steps", value=s.num_steps)
            yield CounterMetricFamily("promptserve_engine_preemptions", "Running requests whose row went to a "
                                      "less served tenant, or whose KV blocks others needed (recomputed when "
                                      "admitted again)", value=s.num_preempted)
            yield GaugeMetricFamily("promptserve_engine_running", "1 while the engine loop runs",
                                    value=float(s.is_running))
            if s.kv is not None:
                yield from _kv_families(s.kv)
        store = self._store_stats() if self._store_stats is not None else None
        if store is not None:
            yield from _store_families(store)


_KV_METRICS = (  # (name, help, KVStats field, is_counter)
    ("kv_cache_bytes", "KV memory allocated (once, at start)", "num_bytes", False),
    ("kv_cache_blocks", "KV blocks in all", "num_blocks", False),
    ("kv_cache_block_tokens", "Context positions one KV block holds", "block_tokens", False),
    ("kv_cache_blocks_used", "KV blocks held by running requests", "num_blocks_used", False),
    ("kv_cache_blocks_cached", "KV blocks registered for prefix sharing (held or free)", "num_blocks_cached", False),
    ("kv_cache_tokens_used", "Context positions held by running requests", "num_tokens_used", False),
    ("prefix_cache_prompt_tokens", "Context tokens of admitted requests", "num_prompt_tokens", True),
    ("prefix_cache_hit_tokens", "Context tokens of admitted requests found in cached KV blocks",
     "num_prefix_hit_tokens", True),
)


def _kv_families(kv):
    for name, text, field, is_counter in _KV_METRICS:
        family = CounterMetricFamily if is_counter else GaugeMetricFamily
        yield family(f"promptserve_{name}", text, value=getattr(kv, field))


def _store_families(stats):
    values = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))
    for name, value in _flatten(values):
        metric = f"promptserve_prompt_store_{name}"
        if name in _STORE_COUNTERS:
            yield CounterMetricFamily(metric, f"Prompt store {name}", value=value)
        else:
            yield GaugeMetricFamily(metric, f"Prompt store {name}", value=value)


def _flatten(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}_")
        elif isinstance(value, (int, float)):
            yield f"{prefix}{key}", value
