"""Per-tenant series in /metrics: requests, tokens by kind, queue time, refusals (429s), failures."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from server.capped_labels import CappedLabels
from server.tenancy.usage_log import Counts

OTHER_TENANTS = "__other__"


class TenantMetrics:
    """Counters labelled by tenant; at most `max_labels` distinct tenants, the rest as __other__."""

    def __init__(self, registry: CollectorRegistry, max_labels: int):
        self.label = CappedLabels(max_labels, OTHER_TENANTS)
        note = f"(at most {max_labels} tenant labels; the rest as {OTHER_TENANTS})"
        self.requests = Counter("promptserve_tenant_requests", f"Generations served, by tenant {note}",
                                ["tenant"], registry=registry)
        self.tokens = Counter("promptserve_tenant_tokens", f"Tokens by tenant and kind: input, virtual, generated "
                              f"{note}", ["tenant", "kind"], registry=registry)
        self.queue = Counter("promptserve_tenant_queue_seconds", f"Seconds requests waited before prefill, by "
                             f"tenant {note}", ["tenant"], registry=registry)
        self.refused = Counter("promptserve_tenant_refused", f"Requests refused with 429, by tenant and reason: "
                               f"rate_limited, quota_exceeded, overloaded {note}", ["tenant", "reason"],
                               registry=registry)
        self.failed = Counter("promptserve_tenant_failed", f"Generations that failed, by tenant {note}",
                              ["tenant"], registry=registry)

    def observe(self, tenant: str, counts: Counts) -> None:
        """Count one request's usage."""
        name = self.label(tenant)
        if counts.requests:
            self.requests.labels(name).inc(counts.requests)
            for kind in ("input", "virtual", "generated"):
                self.tokens.labels(name, kind).inc(getattr(counts, f"{kind}_tokens"))
            self.queue.labels(name).inc(counts.queue_seconds)
        if counts.failed:
            self.failed.labels(name).inc(counts.failed)

    def observe_refused(self, tenant: str, reason: str) -> None:
        """Count one 429."""
        self.refused.labels(self.label(tenant), reason).inc()
