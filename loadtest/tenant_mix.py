"""How a run's load is shared among tenants.

Without a noisy tenant, the tenants share one load (one arrival stream, or one pool of workers) and each
request picks its tenant by popularity. With `--noisy-tenant`, every tenant has its own load: each steady
tenant at `--rate` requests/s (or `--concurrency` workers), the noisy one at `--noisy-factor` times that.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest.config import LoadConfig, noisy_concurrency
from loadtest.tenants import TenantSpec


@dataclass(frozen=True)
class TenantStream:
    """One tenant's own load in a noisy-neighbour run."""

    name: str
    rate: float  # open loop: Poisson arrivals per second
    concurrency: int  # closed loop: workers
    is_noisy: bool


def tenant_streams(config: LoadConfig) -> list[TenantStream]:
    """One stream per tenant in a noisy-neighbour run; [] when the tenants share one load."""
    if config.noisy_tenant is None:
        return []
    streams = []
    for tenant in config.tenants:
        is_noisy = tenant.name == config.noisy_tenant
        factor = config.noisy_factor if is_noisy else 1.0
        workers = noisy_concurrency(config.concurrency, factor) if is_noisy else config.concurrency
        streams.append(TenantStream(tenant.name, config.rate * factor, workers, is_noisy))
    return streams


def closed_workers(config: LoadConfig) -> list[str | None]:
    """The tenant of each closed-loop worker (None: each request picks its tenant by popularity)."""
    streams = tenant_streams(config)
    if not streams:
        return [None] * config.concurrency
    return [s.name for s in streams for _ in range(s.concurrency)]


def tenant_shares(config: LoadConfig) -> dict[str, float]:
    """Each tenant's intended fraction of the requests, in file order (empty without tenants)."""
    streams = tenant_streams(config)
    if streams:
        weights = {s.name: (s.rate if config.mode == "open" else s.concurrency) for s in streams}
    else:
        weights = {t.name: t.popularity for t in config.tenants}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class TenantPicker:
    """Chooses a tenant per request by popularity (relative weights)."""

    def __init__(self, tenants: Sequence[TenantSpec], rng: random.Random):
        self.names = [t.name for t in tenants]
        self.cum = list(itertools.accumulate(t.popularity for t in tenants))
        self.rng = rng

    def pick(self) -> str | None:
        """A tenant name, or None when the run has no tenants."""
        if not self.names:
            return None
        return self.rng.choices(self.names, cum_weights=self.cum, k=1)[0]
