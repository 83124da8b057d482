"""Tenants: both file shapes (and their errors), popularity spread, noisy-neighbour arrivals, per-tenant stats."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from loadtest.client import RequestRecord
from loadtest.config import ConfigError, LoadConfig
from loadtest.runner import arrivals
from loadtest.tenant_mix import closed_workers, tenant_shares
from loadtest.tenant_stats import tenant_summaries
from loadtest.tenants import TenantsFileError, TenantSpec, load_tenants, tenants_from_data
from loadtest.workload import Workload

URL = "http://127.0.0.1:1"
THREE = (TenantSpec("a", "sk-a-000000", 1), TenantSpec("b", "sk-b-000000", 2), TenantSpec("c", "sk-c-000000", 7))


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loadtest_shape_yaml_and_json(tmp_path):
    yaml_file = write(tmp_path, "t.yaml", "tenants:\n  - {name: acme, key: sk-acme-1, popularity: 3}\n"
                                          "  - name: beta\n    key: sk-beta-1\n")
    expected = (TenantSpec("acme", "sk-acme-1", 3.0), TenantSpec("beta", "sk-beta-1", 1.0))  # default 1
    assert load_tenants(yaml_file) == expected
    entries = [{"name": "acme", "key": "sk-acme-1", "popularity": 3}, {"name": "beta", "key": "sk-beta-1"}]
    json_file = write(tmp_path, "t.json", json.dumps({"tenants": entries}))
    assert load_tenants(json_file) == expected


SERVER_ENTRIES = [
    {"key": "sk-ops-00000", "tenant": "ops", "tasks": ["*"], "admin": True},
    {"key": "sk-acme-0001", "tenant": "acme", "tasks": ["acme-*"], "base_model": False, "weight": 2,
     "limits": {"requests_per_s": 5}},
    {"key": "sk-acme-0002", "tenant": "acme", "tasks": ["acme-*"]},  # a second key: not used
]


@pytest.mark.parametrize("raw", [
    SERVER_ENTRIES,
    {"keys": SERVER_ENTRIES},
    {e["key"]: {k: v for k, v in e.items() if k != "key"} for e in SERVER_ENTRIES},
], ids=["list", "keys", "mapping"])
def test_server_keys_file_shapes(raw, tmp_path):
    expected = (TenantSpec("ops", "sk-ops-00000"), TenantSpec("acme", "sk-acme-0001"))
    assert tenants_from_data(raw) == expected  # first key per tenant, popularity 1, server fields ignored
    assert load_tenants(write(tmp_path, "keys.json", json.dumps(raw))) == expected


def test_the_servers_readme_example_parses(tmp_path):
    text = ('keys:\n  - key: "sk-ops-change-me"\n    tenant: ops\n    tasks: ["*"]\n    admin: true\n'
            '  - key: "sk-acme-change-me"\n    tenant: acme\n    tasks: ["acme-*"]\n    base_model: false\n')
    assert [t.name for t in load_tenants(write(tmp_path, "keys.yaml", text))] == ["ops", "acme"]


@pytest.mark.parametrize("text, message", [
    ("tenants: [\n", "not valid YAML or JSON"),
    ("", "expected 'tenants:"),
    ("just words", "expected 'tenants:"),
    ("tenants: []", "no tenants"),
    ("tenants: {acme: sk-secret-1}", "must be a list"),
    ("tenants:\n  - {name: acme}", "'key' must be a non-empty string"),
    ("tenants:\n  - {key: sk-secret-1}", "'name' must be a non-empty string"),
    ("tenants:\n  - {name: acme, key: sk-secret-1, popularity: 0}", "popularity must be a number > 0"),
    ("tenants:\n  - {name: acme, key: sk-secret-1, popularity: -2}", "popularity must be a number > 0"),
    ("tenants:\n  - {name: acme, key: sk-secret-1, popularity: lots}", "popularity must be a number > 0"),
    ("tenants:\n  - {name: acme, key: sk-secret-1, popularity: true}", "popularity must be a number > 0"),
    ("tenants:\n  - {name: acme, key: sk-secret-1, popularty: 2}", "unknown field(s) popularty"),
    ("tenants:\n  - {name: a, key: sk-secret-1}\n  - {name: a, key: sk-secret-2}", "repeated: a"),
    ("tenants:\n  - {name: a, key: sk-secret-1}\n  - {name: b, key: sk-secret-1}", "share one key"),
    ("- {name: acme, key: sk-secret-1}", "a loadtest tenants list goes under 'tenants:'"),
    ("- {key: sk-secret-1, tasks: ['*']}", "'tenant' must be a non-empty string"),
    ("- {tenant: acme}", "'key' must be a non-empty string"),
    ("keys: [sk-secret-1]", "expected 'tenants:"),
    ("sk-secret-1: just-a-string", "each key must map to an object"),
    ("- {key: sk-secret-1, tenant: a}\n- {key: sk-secret-1, tenant: b}", "share one key"),
])
def test_malformed_files_are_refused_clearly(text, message, tmp_path):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(TenantsFileError) as info:
        load_tenants(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "sk-secret" not in str(info.value)  # a key never lands in a message


def test_missing_file_and_key_free_repr(tmp_path):
    with pytest.raises(TenantsFileError, match="cannot read tenants file"):
        load_tenants(tmp_path / "nope.yaml")
    assert "sk-a" not in repr(THREE[0]) and "sk-a" not in repr(LoadConfig(url=URL, tenants=THREE))


def test_popularity_spreads_requests_and_is_seeded():
    config = LoadConfig(url=URL, num_requests=1, tenants=THREE, seed=7)
    n = 30_000
    workload = Workload(config, ["t"])
    picks = [workload.spec(i).tenant for i in range(n)]
    counts = Counter(picks)
    for tenant, share in tenant_shares(config).items():
        assert counts[tenant] / n == pytest.approx(share, abs=0.01)
    assert tenant_shares(config) == {"a": 0.1, "b": 0.2, "c": 0.7}
    again = Workload(config, ["t"])
    assert [again.spec(i).tenant for i in range(200)] == picks[:200]
    other = Workload(LoadConfig(url=URL, num_requests=1, tenants=THREE, seed=8), ["t"])
    assert [other.spec(i).tenant for i in range(200)] != picks[:200]


def test_tenants_leave_the_prompts_of_a_seed_unchanged():
    plain, tenanted = LoadConfig(url=URL, num_requests=1), LoadConfig(url=URL, num_requests=1, tenants=THREE)
    one, two = Workload(plain, ["x", "y"]), Workload(tenanted, ["x", "y"])
    for i in range(50):
        a, b = one.spec(i), two.spec(i)
        assert (a.prompt, a.task_id, a.max_new_tokens, a.tenant) == (b.prompt, b.task_id, b.max_new_tokens, None)


def noisy(**kwargs) -> LoadConfig:
    defaults = {"url": URL, "mode": "open", "rate": 5.0, "duration_s": 10.0, "tenants": THREE,
                "noisy_tenant": "c", "noisy_factor": 10.0}
    return LoadConfig(**{**defaults, **kwargs}).validate()


def take_until(schedule, horizon_s: float) -> list[tuple[float, str]]:
    return list(itertools.takewhile(lambda arrival: arrival[0] < horizon_s, schedule))


def test_noisy_neighbour_arrival_rates():
    horizon = 400.0
    got = take_until(arrivals(noisy()), horizon)
    assert [t for t, _ in got] == sorted(t for t, _ in got)  # one merged, ordered schedule
    rates = {name: n / horizon for name, n in Counter(name for _, name in got).items()}
    assert rates["a"] == pytest.approx(5.0, rel=0.07) and rates["b"] == pytest.approx(5.0, rel=0.07)
    assert rates["c"] == pytest.approx(50.0, rel=0.03)  # factor x a steady tenant's rate
    assert got == take_until(arrivals(noisy()), horizon)  # reproducible for a seed ...
    assert got != take_until(arrivals(noisy(seed=1)), horizon)  # ... and a new seed, new arrivals
    # each tenant has its own stream: a louder neighbour leaves the steady tenants' arrivals as they were
    louder = take_until(arrivals(noisy(noisy_factor=30.0)), horizon)
    assert [a for a in louder if a[1] != "c"] == [a for a in got if a[1] != "c"]
    assert tenant_shares(noisy()) == pytest.approx({"a": 1 / 12, "b": 1 / 12, "c": 10 / 12})


def test_without_a_noisy_tenant_arrivals_are_one_stream_as_before():
    config = LoadConfig(url=URL, mode="open", rate=5.0, duration_s=10.0, tenants=THREE)
    assert {tenant for _, tenant in take_until(arrivals(config), 100)} == {None}  # tenant picked per request


def test_noisy_neighbour_closed_loop_workers():
    config = noisy(mode="closed", rate=0.0, concurrency=2, noisy_factor=2.5)
    assert Counter(closed_workers(config)) == {"a": 2, "b": 2, "c": 5}  # 2 x 2.5
    assert tenant_shares(config) == pytest.approx({"a": 2 / 9, "b": 2 / 9, "c": 5 / 9})
    assert closed_workers(LoadConfig(url=URL, concurrency=3, num_requests=1, tenants=THREE)) == [None] * 3


@pytest.mark.parametrize("kwargs, message", [
    ({"tenants": ()}, "at least two tenants"),
    ({"tenants": THREE[:1], "noisy_tenant": "a"}, "at least two tenants"),
    ({"noisy_tenant": "zed"}, "not in the tenants file"),
    ({"noisy_factor": 0.5}, "--noisy-factor must be"),
    ({"mode": "closed", "concurrency": 1000, "noisy_factor": 5}, "at most 4096"),
])
def test_noisy_config_is_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        noisy(**kwargs)


def record(index, tenant, status="200", latency=1.0, ttft=None, tokens=4):
    return RequestRecord(index, None, start_s=0.0, end_s=latency, status=status, first_token_s=ttft,
                         generated_tokens=tokens if status == "200" else 0, tenant=tenant)


def test_tenant_summaries_count_429_apart_and_keep_every_tenant():
    records = [record(i, "a", latency=0.1 * (i + 1), ttft=0.01 * (i + 1)) for i in range(10)]
    records += [record(10, "b", status="429"), record(11, "b", status="429"), record(12, "b", status="timeout"),
                record(13, "b", latency=2.0)]
    shares = {"a": 0.5, "b": 0.25, "c": 0.25}
    summary = tenant_summaries(records, wall_s=2.0, shares=shares, noisy_tenant="b")
    assert list(summary) == ["a", "b", "c"]
    a, b, c = summary["a"], summary["b"], summary["c"]
    assert (a.num_requests, a.num_ok, a.num_rate_limited, a.num_failed, a.generated_tokens) == (10, 10, 0, 0, 40)
    assert a.latency.p50 == pytest.approx(0.55) and a.latency.p90 == pytest.approx(0.91)
    assert a.latency.p99 == pytest.approx(0.991) and a.first_token.p50 == pytest.approx(0.055)
    assert a.requests_per_s == 5.0 and a.tokens_per_s == 20.0 and a.share == 0.5 and not a.is_noisy
    assert (b.num_requests, b.num_ok, b.num_rate_limited, b.num_failed) == (4, 1, 2, 1) and b.is_noisy
    assert b.by_status == {"200": 1, "429": 2, "timeout": 1} and b.latency.count == 1
    assert c.num_requests == 0 and c.latency.p50 is None  # a tenant that sent nothing still shows up
    assert tenant_summaries(records, 2.0, shares={}) == {}
