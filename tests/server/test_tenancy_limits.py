"""Rate limits and quotas with a fake clock: each limit exceeded once, its 429 headers, its reset; the keys
file's weights and limits; usage files appended, read back by another process's log, rotated by day."""

from __future__ import annotations

import pytest

from server.auth import KeyRing, KeysFileError
from server.tenancy.limits import Limits
from server.tenancy.rate_limiter import RateLimited, RateLimiter, duration
from server.tenancy.tenant import Tenant
from server.tenancy.usage_log import Counts, UsageLog

DAY = 86_400


class FakeClock:
    def __init__(self, now: float = 10 * DAY + 3600):
        self.now = now

    def __call__(self) -> float:
        return self.now


def tenant(**limits) -> Tenant:
    return Tenant("acme", ("*",), False, True, limits=Limits(**limits))


def refused(limiter: RateLimiter, who: Tenant, num_tokens: int = 1) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        limiter.admit(who, num_tokens)
    assert caught.value.status == 429
    return caught.value


def test_requests_per_minute():
    clock = FakeClock()
    limiter, acme = RateLimiter(clock), tenant(requests_per_minute=3)
    grants = [limiter.admit(acme, 1) for _ in range(3)]
    assert grants[-1].headers["x-ratelimit-limit-requests"] == "3"
    assert grants[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert grants[-1].headers["x-ratelimit-reset-requests"] == "1m0s"
    error = refused(limiter, acme)
    assert error.headers["Retry-After"] == "20"  # one request refills in 60 / 3 s
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert "3 requests per minute" in str(error)
    clock.now += 20
    limiter.admit(acme, 1)  # refilled: one more
    refused(limiter, acme)
    clock.now += 60
    assert limiter.headers(acme)["x-ratelimit-remaining-requests"] == "3"  # a whole window: full again


def test_tokens_per_minute_reserve_then_settle_to_what_was_used():
    clock = FakeClock()
    limiter, acme = RateLimiter(clock), tenant(tokens_per_minute=100)
    grant = limiter.admit(acme, 80)  # input + max_new_tokens
    assert grant.headers["x-ratelimit-remaining-tokens"] == "20"
    error = refused(limiter, acme, 30)
    assert error.headers["Retry-After"] == "6"  # 10 tokens missing at 100 per minute
    assert error.headers["x-ratelimit-reset-tokens"] == "48s"
    limiter.settle(grant, 25)  # it used only 25: 55 come back
    assert limiter.headers(acme)["x-ratelimit-remaining-tokens"] == "75"
    limiter.admit(acme, 30)
    clock.now += 60
    big = limiter.admit(acme, 500)  # bigger than the limit: runs when the bucket is full, alone
    refused(limiter, acme, 1)
    limiter.settle(big, 500)
    assert limiter.headers(acme)["x-ratelimit-remaining-tokens"] == "0"
    clock.now += 60 * 5  # 400 tokens of debt plus the refill to one token: five minutes
    limiter.admit(acme, 1)


def test_virtual_tokens_count_once_the_task_is_known():
    limiter, acme = RateLimiter(FakeClock()), tenant(tokens_per_minute=100)
    grant = limiter.admit(acme, 50)
    limiter.add_tokens(grant, 30)
    assert limiter.headers(acme)["x-ratelimit-remaining-tokens"] == "20"
    limiter.settle(grant, 80)
    assert limiter.headers(acme)["x-ratelimit-remaining-tokens"] == "20"


def test_max_concurrent():
    limiter, acme = RateLimiter(FakeClock()), tenant(max_concurrent=2)
    first, second = limiter.admit(acme, 1), limiter.admit(acme, 1)
    error = refused(limiter, acme)
    assert error.headers["Retry-After"] == "1" and "max_concurrent" in str(error)
    limiter.settle(first, 1)
    limiter.settle(first, 1)  # settling twice frees one place only
    limiter.admit(acme, 1)
    refused(limiter, acme)
    limiter.settle(second, 1)


def test_daily_quota_resets_at_midnight_utc():
    clock = FakeClock(10 * DAY + 23 * 3600)  # 23:00 UTC
    limiter, acme = RateLimiter(clock, tokens_on_day=lambda name, day: 900), tenant(tokens_per_day=1000)
    grant = limiter.admit(acme, 150)  # 900 used earlier today (the usage log): this one crosses the quota
    limiter.settle(grant, 150)
    error = refused(limiter, acme)
    assert error.error_type == "quota_exceeded" and error.headers["Retry-After"] == "3600"
    clock.now += 3600
    limiter.admit(acme, 1)  # a new UTC day


def test_a_refused_request_is_given_back_whole():
    limiter, acme = RateLimiter(FakeClock()), tenant(requests_per_minute=1, tokens_per_minute=10)
    grant = limiter.admit(acme, 10)
    limiter.settle(grant, 0, refund_request=True)  # the engine refused it (queue full): nothing used
    limiter.admit(acme, 10)


def test_unlimited_tenants_get_no_headers():
    limiter = RateLimiter(FakeClock())
    assert limiter.admit(tenant(), 10_000).headers == {}


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1, "1s"), (59.5, "1m0s"), (360, "6m0s"),
                                               (3723, "1h2m3s")])
def test_durations_read_like_openai(seconds, text):
    assert duration(seconds) == text


def test_keys_file_weights_and_limits_belong_to_the_tenant():
    ring = KeyRing.from_data({"keys": [
        {"key": "acme-key-0001", "tenant": "acme", "weight": 3, "limits": {"requests_per_minute": 60}},
        {"key": "acme-key-0002", "tenant": "acme"},
        {"key": "globex-key-01", "tenant": "globex", "operator": True}]})
    second = ring.authenticate("Bearer acme-key-0002")
    assert second.weight == 3 and second.limits.requests_per_minute == 60  # set on the other key
    globex = ring.authenticate("Bearer globex-key-01")
    assert globex.weight == 1 and globex.limits.is_unlimited and globex.may_read_usage_of("acme")
    assert not second.may_read_usage_of("globex")
    with pytest.raises(KeysFileError, match="different weights or limits"):
        KeyRing.from_data([{"key": "acme-key-0001", "tenant": "acme", "weight": 3},
                           {"key": "acme-key-0002", "tenant": "acme", "weight": 2}])
    with pytest.raises(KeysFileError, match="limits"):
        KeyRing.from_data([{"key": "acme-key-0001", "tenant": "acme", "limits": {"requests_per_hour": 3}}])
    with pytest.raises(KeysFileError, match="weight"):
        KeyRing.from_data([{"key": "acme-key-0001", "tenant": "acme", "weight": 0}])


def test_usage_is_appended_read_by_another_process_and_rotated(tmp_path):
    clock = FakeClock()
    mine = UsageLog(tmp_path, clock=clock, writer="a", retention_days=2)
    other = UsageLog(tmp_path, clock=clock, writer="b", retention_days=2)
    mine.append("acme", "t1", Counts(requests=1, input_tokens=5, virtual_tokens=3, generated_tokens=7))
    other.append("acme", "t1", Counts(requests=1, input_tokens=1, generated_tokens=2))
    other.append("acme", None, Counts(rate_limited=1))
    other.append("globex", "g", Counts(requests=1, input_tokens=9))
    (rows,) = [r for r in mine.rows({"acme"}, 0, clock.now + 1) if r.task == "t1"]
    assert (rows.counts.requests, rows.counts.input_tokens, rows.counts.generated_tokens) == (2, 6, 9)
    assert sum(r.counts.rate_limited for r in mine.rows({"acme"}, 0, clock.now + 1)) == 1
    assert mine.tokens_on_day("acme", 10) == 18
    with (tmp_path / "usage-1970-01-11.b.jsonl").open("a") as f:
        f.write('{"ts": 1, "tenant": "acme", "requ')  # a line still being written: skipped until complete
    assert len(mine.rows(None, 0, clock.now + 1)) == 3
    clock.now += DAY  # the next day's lines go to the next day's file
    mine.append("acme", "t1", Counts(requests=1))
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "usage-1970-01-12.a.jsonl"
    clock.now += 3 * DAY
    mine.append("acme", "t1", Counts(requests=1))  # rotation deletes files older than the retention
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usage-1970-01-15.a.jsonl"]
    # Issue 23: the totals of deleted days leave memory with their files (they grew without bound).
    assert [r.hour // DAY for r in mine.rows(None, 0, clock.now + 1)] == [14]
    restarted = UsageLog(tmp_path, clock=clock, writer="c")
    assert [r.counts.requests for r in restarted.rows({"acme"}, 0, clock.now + 1)] == [1]


def test_tenant_labels_are_capped_like_task_labels():
    from prometheus_client import CollectorRegistry, generate_latest

    from server.tenancy.tenant_metrics import OTHER_TENANTS, TenantMetrics

    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, max_labels=2)
    for name in ("a", "b", "c", "d", "a"):
        metrics.observe(name, Counts(requests=1, input_tokens=2))
    text = generate_latest(registry).decode()
    assert 'promptserve_tenant_requests_total{tenant="a"} 2.0' in text
    assert f'promptserve_tenant_requests_total{{tenant="{OTHER_TENANTS}"}} 2.0' in text
    assert 'tenant="c"' not in text


def test_an_unwritable_usage_folder_turns_metering_off_not_the_server(tmp_path):
    from prometheus_client import CollectorRegistry

    from server.config import Settings
    from server.tenancy.gate import tenant_gate
    from server.tenancy.tenant_metrics import TenantMetrics

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    gate = tenant_gate(Settings(usage_dir=blocker / "usage"), TenantMetrics(CollectorRegistry(), 5))
    assert gate.usage is None
    grant = gate.admit(tenant(requests_per_minute=1), None, 3, 4)  # limits still hold
    gate.not_queued(grant)
    gate.refused("acme", None, "rate_limited")  # counted in metrics, nothing written
