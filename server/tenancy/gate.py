"""One request's way past the tenant's limits and into the meters: reserve, then settle exactly once."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server.config import Settings
from server.engine.types import GenerationResult
from server.tenancy.rate_limiter import RateLimited, RateLimiter, Reservation
from server.tenancy.tenant import Tenant
from server.tenancy.tenant_metrics import TenantMetrics
from server.tenancy.usage_log import Counts, UsageLog

log = logging.getLogger("promptserve.usage")


@dataclass
class Pass:
    """An admitted request's hold on its tenant's limits (settled once, whatever the outcome)."""

    tenant: str
    task_id: str | None
    reservation: Reservation
    num_input_tokens: int
    num_virtual_tokens: int = 0
    is_settled: bool = False

    @property
    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers to send with the response."""
        return self.reservation.headers


class TenantGate:
    """Rate limits before a request is queued; usage and per-tenant metrics when it ends."""

    def __init__(self, limiter: RateLimiter, usage: UsageLog | None, metrics: TenantMetrics):
        self.limiter = limiter
        self.usage = usage
        self.metrics = metrics

    def admit(self, tenant: Tenant, task_id: str | None, num_input_tokens: int, max_new_tokens: int) -> Pass:
        """Reserve the request's input tokens plus max_new_tokens, or raise RateLimited (counted)."""
        try:
            reservation = self.limiter.admit(tenant, num_input_tokens + max_new_tokens)
        except RateLimited as e:
            self.refused(tenant.name, task_id, e.error_type)
            raise
        return Pass(tenant.name, task_id, reservation, num_input_tokens)

    def queued(self, grant: Pass, num_virtual_tokens: int) -> None:
        """The engine queued it; its task's virtual tokens count too."""
        grant.num_virtual_tokens = num_virtual_tokens
        self.limiter.add_tokens(grant.reservation, num_virtual_tokens)

    def refused(self, tenant: str, task_id: str | None, reason: str, grant: Pass | None = None) -> None:
        """A 429 (a limit here, or the engine's full queue): counted; a reservation is given back whole."""
        if grant is not None:
            grant.is_settled = True
            self.limiter.settle(grant.reservation, 0, refund_request=True)
        self.metrics.observe_refused(tenant, reason)
        self._record(tenant, task_id, Counts(rate_limited=1))

    def not_queued(self, grant: Pass) -> None:
        """The engine refused it for another reason (a 4xx or 503): nothing was used, nothing is metered."""
        grant.is_settled = True
        self.limiter.settle(grant.reservation, 0, refund_request=True)

    def finished(self, grant: Pass, result: GenerationResult | None) -> None:
        """It ended: `result`, or None when it failed. Settles the reservation and meters it, once."""
        if grant.is_settled:
            return
        grant.is_settled = True
        if result is None:
            counts = Counts(failed=1)
            used = grant.num_input_tokens + grant.num_virtual_tokens
        else:
            counts = Counts(requests=1, input_tokens=result.prompt_tokens, virtual_tokens=result.virtual_tokens,
                            generated_tokens=result.generated_tokens, queue_seconds=result.timings.queue_s)
            used = result.prompt_tokens + result.virtual_tokens + result.generated_tokens
        self.limiter.settle(grant.reservation, used)
        self.metrics.observe(grant.tenant, counts)
        self._record(grant.tenant, grant.task_id, counts)

    def read_usage(self) -> None:
        """Read the usage files written so far (at start, off the event loop: the daily quota reads them)."""
        if self.usage is not None:
            self.usage.read_new()

    def close(self) -> None:
        """Close the usage file (the server is stopping)."""
        if self.usage is not None:
            self.usage.close()

    def _record(self, tenant: str, task_id: str | None, counts: Counts) -> None:
        if self.usage is not None:
            self.usage.append(tenant, task_id, counts)


def tenant_gate(settings: Settings, metrics: TenantMetrics) -> TenantGate:
    """The gate of one app: usage under --usage-dir (default <store>/.usage), limits from the keys file."""
    folder = settings.usage_dir or settings.store / ".usage"
    try:
        usage = UsageLog(folder, retention_days=settings.usage_retention_days,
                         max_tasks_per_hour=settings.usage_max_tasks_per_hour)
    except OSError as e:  # a read-only store: serve, without usage (GET /v1/usage says why)
        log.error("usage metering is off: cannot write %s: %s", folder, e)
        return TenantGate(RateLimiter(), None, metrics)
    return TenantGate(RateLimiter(tokens_on_day=usage.tokens_on_day), usage, metrics)
