"""Per-tenant rate limits, checked before a request is queued and settled when it ends.

Requests and tokens per minute are token buckets that refill continuously (a full minute's allowance at
most), as OpenAI's limits behave. A request reserves its input tokens plus `max_new_tokens` (its virtual
tokens are added once the task is known); when it ends the reservation becomes what it really used, so a
bucket may go below zero and the next requests wait for it. A request is admitted while its tenant's
bucket holds its reservation, or a whole minute's worth (a request bigger than the limit still runs, alone).
The daily quota admits requests while the UTC day's tokens are below it. All on the event loop: no locks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.api_error import ApiError
from server.tenancy.limits import Limits
from server.tenancy.tenant import Tenant

SECONDS_PER_DAY = 86_400
CONCURRENCY_RETRY_S = 1  # nothing says when a request in flight ends: ask for a retry in a second


class RateLimited(ApiError):
    """HTTP 429 with Retry-After and the x-ratelimit-* headers."""

    def __init__(self, message: str, retry_after_s: float, headers: dict[str, str], error_type: str = "rate_limited"):
        super().__init__(429, error_type, message)
        self.headers = {**headers, "Retry-After": str(max(1, math.ceil(retry_after_s)))}


class TokenBucket:
    """Holds up to `capacity`, refilled at `capacity` per minute; below zero after an overdrawn settle."""

    def __init__(self, capacity: int, now: float):
        self.capacity = capacity
        self._level = float(capacity)
        self._at = now

    def level(self, now: float) -> float:
        """What the bucket holds now."""
        self._level = min(self.capacity, self._level + (now - self._at) * self.capacity / 60)
        self._at = now
        return self._level

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until the bucket holds `amount` (capped at its capacity)."""
        missing = min(amount, self.capacity) - self.level(now)
        return max(0.0, missing * 60 / self.capacity)

    def add(self, amount: float, now: float) -> None:
        """Take (negative) or give back (positive) `amount`."""
        self._level = min(self.capacity, self.level(now) + amount)

    def headers(self, kind: str, now: float) -> dict[str, str]:
        """x-ratelimit-{limit,remaining,reset}-`kind`."""
        level = self.level(now)
        return {f"x-ratelimit-limit-{kind}": str(self.capacity),
                f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(level))),
                f"x-ratelimit-reset-{kind}": duration((self.capacity - level) * 60 / self.capacity)}


@dataclass
class _TenantState:
    limits: Limits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    num_in_flight: int = 0
    day: int = -1  # days since the epoch (UTC) that `day_tokens` counts
    day_tokens: int = 0


@dataclass
class Reservation:
    """What one admitted request holds until it is settled."""

    tenant: str
    num_tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    is_settled: bool = False


class RateLimiter:
    """The limits of every tenant seen; `clock` is wall-clock seconds (a fake in tests)."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 tokens_on_day: Callable[[str, int], int] = lambda tenant, day: 0):
        self._clock = clock
        self._tokens_on_day = tokens_on_day  # (tenant, day) -> tokens already used (from the usage log)
        self._tenants: dict[str, _TenantState] = {}

    def admit(self, tenant: Tenant, num_tokens: int) -> Reservation:
        """Reserve one request of `num_tokens` (estimated) for `tenant`, or raise RateLimited."""
        if tenant.limits.is_unlimited:
            return Reservation(tenant.name, num_tokens)
        now = self._clock()
        state = self._state(tenant, now)
        self._check(tenant.name, state, num_tokens, now)
        self._take_tokens(state, num_tokens, now)
        if state.requests is not None:
            state.requests.add(-1, now)
        state.num_in_flight += 1  # last: whatever raised above left the count as it was
        return Reservation(tenant.name, num_tokens, self._headers(state, now))

    def add_tokens(self, reservation: Reservation, num_tokens: int) -> None:
        """The request turned out to need `num_tokens` more (its task's virtual tokens)."""
        state = self._tenants.get(reservation.tenant)
        if state is not None and not reservation.is_settled:
            reservation.num_tokens += num_tokens
            self._take_tokens(state, num_tokens, self._clock())

    def settle(self, reservation: Reservation, num_tokens_used: int, *, refund_request: bool = False) -> None:
        """The request ended having used `num_tokens_used`; `refund_request`: it never ran (refused)."""
        state = self._tenants.get(reservation.tenant)
        if state is None or reservation.is_settled:
            return
        reservation.is_settled = True
        now = self._clock()
        state.num_in_flight -= 1
        if refund_request and state.requests is not None:
            state.requests.add(1, now)
        self._take_tokens(state, num_tokens_used - reservation.num_tokens, now)

    def headers(self, tenant: Tenant) -> dict[str, str]:
        """The x-ratelimit-* headers of `tenant` now."""
        if tenant.limits.is_unlimited:
            return {}
        now = self._clock()
        return self._headers(self._state(tenant, now), now)

    # -- internals ------------------------------------------------------------------------------
    def _state(self, tenant: Tenant, now: float) -> _TenantState:
        state = self._tenants.get(tenant.name)
        if state is None or state.limits != tenant.limits:
            lim = tenant.limits
            state = _TenantState(lim, None if lim.requests_per_minute is None else TokenBucket(lim.requests_per_minute, now),
                                 None if lim.tokens_per_minute is None else TokenBucket(lim.tokens_per_minute, now))
            self._tenants[tenant.name] = state
        day = int(now // SECONDS_PER_DAY)
        if state.day != day:
            state.day, state.day_tokens = day, self._tokens_on_day(tenant.name, day)
        return state

    def _check(self, name: str, state: _TenantState, num_tokens: int, now: float) -> None:
        lim = state.limits
        if lim.max_concurrent is not None and state.num_in_flight >= lim.max_concurrent:
            self._refuse(state, now, CONCURRENCY_RETRY_S,
                         f"{name!r} has {state.num_in_flight} requests in flight, its limit (max_concurrent)")
        if state.requests is not None and (wait := state.requests.wait_s(1, now)) > 0:
            self._refuse(state, now, wait, f"{name!r} reached its limit of {lim.requests_per_minute} requests per minute")
        if state.tokens is not None and (wait := state.tokens.wait_s(num_tokens, now)) > 0:
            self._refuse(state, now, wait, f"{name!r} reached its limit of {lim.tokens_per_minute} tokens per minute "
                         f"(this request reserves {num_tokens}: its input tokens plus max_new_tokens)")
        if lim.tokens_per_day is not None and state.day_tokens >= lim.tokens_per_day:
            self._refuse(state, now, (state.day + 1) * SECONDS_PER_DAY - now,
                         f"{name!r} used its daily quota of {lim.tokens_per_day} tokens; it resets at 00:00 UTC",
                         error_type="quota_exceeded")

    def _refuse(self, state: _TenantState, now: float, wait_s: float, message: str,
                error_type: str = "rate_limited") -> None:
        raise RateLimited(f"rate limit: tenant {message}; retry in {duration(wait_s)}", wait_s,
                          self._headers(state, now), error_type)

    @staticmethod
    def _take_tokens(state: _TenantState, num_tokens: int, now: float) -> None:
        if state.tokens is not None:
            state.tokens.add(-num_tokens, now)
        state.day_tokens += num_tokens

    @staticmethod
    def _headers(state: _TenantState, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, bucket in (("requests", state.requests), ("tokens", state.tokens)):
            if bucket is not None:
                out.update(bucket.headers(kind, now))
        return out


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
