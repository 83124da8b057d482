"""Per-tenant figures of a run: who was served, how fast, and who was rate limited (HTTP 429)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from loadtest.client import RequestRecord
from loadtest.stats import Summary


@dataclass(frozen=True)
class TenantSummary:
    """One tenant's side of a run (latencies of its successful requests, in seconds)."""

    share: float  # the fraction of the requests the workload meant for it
    is_noisy: bool
    num_requests: int
    num_ok: int
    num_rate_limited: int  # HTTP 429, not an error
    num_failed: int  # errors: neither ok nor rate limited
    generated_tokens: int
    requests_per_s: float  # successful requests per second of the run
    tokens_per_s: float
    latency: Summary
    first_token: Summary  # streaming only
    by_status: dict[str, int] = field(default_factory=dict)


def tenant_summary(records: Sequence[RequestRecord], wall_s: float, share: float, is_noisy: bool) -> TenantSummary:
    """Summarise one tenant's records over a run of `wall_s` seconds."""
    ok = [r for r in records if r.is_ok]
    tokens = sum(r.generated_tokens for r in ok)
    num_rate_limited = sum(r.is_rate_limited for r in records)
    return TenantSummary(
        share=share, is_noisy=is_noisy, num_requests=len(records), num_ok=len(ok),
        num_rate_limited=num_rate_limited, num_failed=len(records) - len(ok) - num_rate_limited,
        generated_tokens=tokens,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        latency=Summary.of([r.latency_s for r in ok]),
        first_token=Summary.of([r.first_token_s for r in ok if r.first_token_s is not None]),
        by_status=dict(sorted(Counter(r.status for r in records).items())),
    )


def tenant_summaries(records: Sequence[RequestRecord], wall_s: float, shares: dict[str, float],
                     noisy_tenant: str | None = None) -> dict[str, TenantSummary]:
    """Every tenant of `shares`, in its order, even one that sent nothing; {} for a run without tenants."""
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        if r.tenant is not None:
            groups[r.tenant].append(r)
    return {name: tenant_summary(groups[name], wall_s, share, name == noisy_tenant)
            for name, share in shares.items()}
