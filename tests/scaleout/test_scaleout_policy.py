"""The task router's policy and the federated /metrics merge, on plain values (no Ray cluster)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pytest

pytest.importorskip("ray.serve", reason="the scale-out extra is not installed: pip install 'promptserve[ray]'")

from prometheus_client import CollectorRegistry, Histogram, generate_latest  # noqa: E402
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from server.scaleout.federation import merge_expositions  # noqa: E402
from server.scaleout.task_router import TARGET_PREFIX, home, rank  # noqa: E402


@dataclass(frozen=True)
class _Id:
    unique_id: str


@dataclass(frozen=True)
class _Replica:
    replica_id: _Id


def _replicas(*names: str) -> list[_Replica]:
    return [_Replica(_Id(n)) for n in names]


def _route(task: str, replicas, holders: set, loads: Counter, imbalance: int = 2) -> _Replica:
    """What Ray does with the ranks: the least loaded replica of the first non-empty rank."""
    first = next(r for r in rank(task, replicas, {h.replica_id for h in holders}, loads, imbalance) if r)
    chosen = min(first, key=lambda r: loads[r.replica_id])
    loads[chosen.replica_id] += 1
    return chosen


def test_new_tasks_spread_by_hash_and_agree_on_their_home():
    replicas = _replicas("a", "b", "c")
    homes = Counter(home(f"task{i}", replicas).replica_id.unique_id for i in range(3000))
    assert all(900 < n < 1100 for n in homes.values()), homes
    assert home("task7", replicas) == home("task7", list(reversed(replicas)))  # order does not matter


def test_adding_a_replica_moves_only_the_tasks_it_becomes_home_of():
    before, after = _replicas("a", "b", "c"), _replicas("a", "b", "c", "d")
    moved = [t for t in (f"task{i}" for i in range(2000)) if home(t, before) != home(t, after)]
    assert all(home(t, after).replica_id.unique_id == "d" for t in moved)
    assert 350 < len(moved) < 650  # about a quarter


def test_a_burst_of_new_tasks_is_split_evenly():
    replicas = _replicas("a", "b")
    loads: Counter = Counter()
    for i in range(16):
        _route(f"new{i}", replicas, set(), loads)
    assert abs(loads[replicas[0].replica_id] - loads[replicas[1].replica_id]) <= 3, loads


def test_a_holder_is_preferred_until_it_is_too_far_ahead():
    a, b = replicas = _replicas("a", "b")
    loads: Counter = Counter({a.replica_id: 5, b.replica_id: 3})
    assert _route("t", replicas, {a}, loads) == a  # 5 <= 3 + 2
    assert _route("t", replicas, {a}, loads) == b  # 6 > 3 + 2: the least loaded
    assert _route("t", replicas, {a}, loads, imbalance=10) == a


def test_no_task_goes_to_the_least_loaded_and_a_target_to_exactly_that_replica():
    a, b = replicas = _replicas("a", "b")
    loads: Counter = Counter({a.replica_id: 4, b.replica_id: 1})
    assert _route("", replicas, set(), loads) == b
    assert rank(TARGET_PREFIX + "a", replicas, set(), loads, 2) == [[a]]
    assert rank(TARGET_PREFIX + "gone", replicas, set(), loads, 2) == [[]]  # Ray waits; the caller times out


def _exposition(requests: int, latency: float) -> str:
    registry = CollectorRegistry()
    PromCounter("promptserve_http_requests", "HTTP requests", ["route"], registry=registry).labels("/generate").inc(
        requests)
    Histogram("promptserve_request_latency_seconds", "latency", registry=registry).observe(latency)
    return generate_latest(registry).decode()


def test_expositions_merge_into_one_labelled_by_replica():
    merged = merge_expositions({"r1": _exposition(3, 0.2), "r2": _exposition(5, 0.7)}).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert merged.count("# TYPE promptserve_http_requests_total counter") == 1  # one family, not one per replica
    totals = {s.labels["replica"]: s.value for s in families["promptserve_http_requests"].samples
              if s.name.endswith("_total")}
    assert totals == {"r1": 3.0, "r2": 5.0}
    sums = {s.labels["replica"]: s.value for s in families["promptserve_request_latency_seconds"].samples
            if s.name.endswith("_sum")}
    assert sums == {"r1": 0.2, "r2": 0.7}
    assert all("replica" in s.labels for f in families.values() for s in f.samples)


def test_a_task_held_by_two_replicas_sticks_to_the_one_it_was_last_sent_to():
    # Ray reports both as holders (the task moved once); Ray would take the less busy of a rank. The rank
    # holds only the replica last sent the task while it is within the imbalance, then the other holders.
    a, b = _replicas("a", "b")
    loads = Counter({a.replica_id: 2, b.replica_id: 0})
    ranks = rank("t", [a, b], {a.replica_id, b.replica_id}, loads, 2, last=a.replica_id)
    assert ranks[0] == [a]
    loads[a.replica_id] = 3  # over the imbalance: the other holder
    assert rank("t", [a, b], {a.replica_id, b.replica_id}, loads, 2, last=a.replica_id)[0] == [b]
    assert rank("t", [a, b], set(), Counter({a.replica_id: 0, b.replica_id: 0}), 2, last=b.replica_id)[0] == [b]


def test_only_a_valid_task_the_key_may_use_steers_routing():
    """Issue 23: a client named a replica with `@replica:<id>` (an unknown one left the request pending), and
    any string it sent, authenticated or not, became router state; nested JSON raised RecursionError (500)."""
    from server.scaleout.ingress_guard import routing_task
    from server.tenancy.tenant import OPEN_TENANT, Tenant

    acme = Tenant("acme", ("acme-*",), is_admin=False, may_use_base_model=True)

    def body(task_id) -> bytes:
        return json.dumps({"inputs": "x", "task_id": task_id}).encode()
    assert routing_task(acme, "POST", "/generate", body("acme-a")) == "acme-a"
    assert routing_task(OPEN_TENANT, "POST", "/v1/completions", json.dumps({"model": "other"}).encode()) == "other"
    for task_id in (TARGET_PREFIX + "abc", "x" * 129, "../etc", "acme-a/b", "globex-a", "a" * 100_000):
        assert routing_task(acme, "POST", "/generate", body(task_id)) == "", task_id
    assert routing_task(acme, "PUT", "/v1/tasks/" + TARGET_PREFIX + "abc", b"") == ""
    deep = b'{"task_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert routing_task(acme, "POST", "/generate", deep) == ""
