"""TaskAffinityRouter: Ray Serve's request router for the engine replicas. A task's requests go to a
replica that already holds the task, while load stays even.

Ray's default router sends a task that no replica holds to "the replica holding the fewest tasks". It
learns what a replica holds only from the replica's reports, a moment later. So a burst of new tasks all
lands on one replica. Taking up a soft prompt is cheap: one store read, and one prefill of its virtual
tokens. A replica with twice the rows of its neighbour costs every one of its requests. So:

1. Replicas that hold the task (Ray's reports, and where this router last sent it, which it knows at
   once) are preferred. Failing those, its home replica is, by
   rendezvous hashing of (task, replica), so a burst of new tasks spreads evenly and each task's requests
   agree on one replica before any report arrives.
2. A preferred replica is taken only while its ongoing requests exceed the least loaded replica's by at
   most `imbalance`; otherwise the least loaded replicas are.
3. `TARGET_PREFIX + replica id` as the model id reaches exactly that replica (the ingress's federated
   /metrics asks every replica this way).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, OrderedDict

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

TARGET_PREFIX = "@replica:"
DEFAULT_IMBALANCE = 2
MAX_REMEMBERED_TASKS = 100_000


class TaskAffinityRouter(MultiplexMixin, RequestRouter):
    """Chosen in the engine deployment's `request_router_config` (application.py)."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **_) -> None:
        self._imbalance = imbalance
        # Requests this router has sent to each replica and not seen end. Ray's own queue-length cache
        # forgets an entry after a few seconds, which a long generation outlives.
        self._num_ongoing: Counter[ReplicaID] = Counter()
        # Task -> the replica this router last sent it to: known at once, while Ray's reports of what a
        # replica holds arrive a moment later (a replica set that changed in between moves homes).
        self._last_sent: OrderedDict[str, ReplicaID] = OrderedDict()

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        task_id = pending_request.metadata.multiplexed_model_id
        if task_id and not task_id.startswith(TARGET_PREFIX):
            self._last_sent[task_id] = replica_id
            self._last_sent.move_to_end(task_id)
            if len(self._last_sent) > MAX_REMEMBERED_TASKS:
                self._last_sent.popitem(last=False)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self._num_ongoing[replica_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        if self._num_ongoing[replica_id] > 0:
            self._num_ongoing[replica_id] -= 1

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas, best first; Ray takes the least loaded replica of the first rank that has room."""
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every replica was a candidate
        task_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        holders = set(self._multiplexed_model_id_to_replica_ids.get(task_id, ())) if task_id else set()
        loads = {r.replica_id: self._num_ongoing[r.replica_id] for r in candidate_replicas}
        return rank(task_id, candidate_replicas, holders, loads, self._imbalance, self._last_sent.get(task_id))


def rank(task_id: str, replicas: list, holders: set, loads: dict, imbalance: int,
         last: ReplicaID | None = None) -> list[list]:
    """The policy above, on plain values: `replicas` have `.replica_id` (with `.unique_id`); `holders` are
    the ids that hold the task, `last` the one this router last sent it to, `loads` map ids to requests in
    flight. The replica last sent the task comes before other holders: a task held by several (it moved
    once) sticks to one of them rather than to whichever Ray finds less busy."""
    if task_id.startswith(TARGET_PREFIX):
        return [[r for r in replicas if r.replica_id.unique_id == task_id[len(TARGET_PREFIX):]]]
    least = min(loads[r.replica_id] for r in replicas)
    by_load = sorted(replicas, key=lambda r: loads[r.replica_id])
    least_loaded = [r for r in by_load if loads[r.replica_id] == least]
    random.shuffle(least_loaded)  # Ray takes the first of equals: ties go anywhere, not always to one replica
    if not task_id:
        return [least_loaded, by_load]
    holding = [r for r in replicas if r.replica_id in holders or r.replica_id == last]
    # Holders over the imbalance send the task to the least loaded, not to its home.
    choices = ([r for r in holding if r.replica_id == last], holding) if holding else ([home(task_id, replicas)],)
    for preferred in choices:
        within = [r for r in preferred if loads[r.replica_id] <= least + imbalance]
        if within:
            return [within, by_load]
    return [least_loaded, by_load]


def home(task_id: str, replicas: list[RunningReplica]) -> RunningReplica:
    """The replica a task new to all of them goes to: highest hash of (task, replica). When a replica is
    added or removed, only the tasks whose home it is (or becomes) move."""
    return max(replicas, key=lambda r: _score(task_id, r.replica_id.unique_id))


def _score(task_id: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{task_id}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
