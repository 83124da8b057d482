"""ReplicaDirectory: which engine replicas are alive, for the ingress's federated /metrics. Ray Serve has
no public call that lists a deployment's replicas, so each replica reports itself here when it starts and
at every health check, and withdraws when it stops. One that died without withdrawing drops out after
a few missed health checks."""

from __future__ import annotations

import time

STALE_AFTER_S = 20.0  # four missed health checks (application.py checks every 5 s)


class ReplicaDirectory:
    """Deployed by application.py (one replica, no CPU); replicas and the ingress get its handle."""

    def __init__(self) -> None:
        self._last_seen: dict[str, float] = {}

    def report(self, replica_id: str) -> None:
        """`replica_id` is alive."""
        self._last_seen[replica_id] = time.monotonic()

    def withdraw(self, replica_id: str) -> None:
        """`replica_id` is stopping."""
        self._last_seen.pop(replica_id, None)

    def live(self) -> list[str]:
        """The replicas seen lately, sorted."""
        cutoff = time.monotonic() - STALE_AFTER_S
        return sorted(r for r, seen in self._last_seen.items() if seen >= cutoff)
