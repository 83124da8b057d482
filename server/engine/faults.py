"""FaultInjector: make chosen model steps fail, to test that one request's failure stays its own."""

from __future__ import annotations

import threading
from dataclasses import dataclass

PREFILL = "prefill"
DECODE = "decode"


class InjectedFault(RuntimeError):
    """The error an armed injector raises inside a model step."""


@dataclass
class _Rule:
    request_id: str
    phase: str | None  # None: any phase
    remaining: int | None  # None: every time


class FaultInjector:
    """Armed by tests: any model step whose rows include `request_id` raises InjectedFault."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self.num_raised = 0

    def fail_request(self, request_id: str, phase: str | None = None, times: int | None = None) -> None:
        """Fail steps containing this request (optionally only `phase`, only `times` times)."""
        with self._lock:
            self._rules.append(_Rule(request_id, phase, times))

    def clear(self) -> None:
        """Disarm every rule."""
        with self._lock:
            self._rules.clear()

    def check(self, phase: str, request_ids: list[str]) -> None:
        """Called by the runner before each forward; raises when a rule matches."""
        if not self._rules:
            return
        with self._lock:
            for rule in self._rules:
                if rule.request_id in request_ids and rule.phase in (None, phase) and rule.remaining != 0:
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    self.num_raised += 1
                    raise InjectedFault(f"injected {phase} failure for request {rule.request_id}")
