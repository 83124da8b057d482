"""FaultInjector: make chosen model steps fail, or wait until released, to test that one request's failure
stays its own and to let tests keep requests in flight (or queued) without racing the engine's thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

PREFILL = "prefill"
DECODE = "decode"
HOLD_LIMIT_S = 300.0  # a hold nobody releases fails its step instead of hanging the engine for ever


class InjectedFault(RuntimeError):
    """The error an armed injector raises inside a model step."""


@dataclass
class _Rule:
    request_id: str
    phase: str | None  # None: any phase
    remaining: int | None  # None: every time


@dataclass
class _Hold:
    phase: str | None  # None: any phase
    num_skip: int  # matching steps to let pass before holding one
    is_held: threading.Event = field(default_factory=threading.Event)
    is_released: threading.Event = field(default_factory=threading.Event)


class FaultInjector:
    """Armed by tests: any model step whose rows include `request_id` raises InjectedFault, or waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._is_changed = threading.Condition(self._lock)  # notified when a step is held
        self._rules: list[_Rule] = []
        self._holds: dict[str, _Hold] = {}
        self.num_raised = 0

    def fail_request(self, request_id: str, phase: str | None = None, times: int | None = None) -> None:
        """Fail steps containing this request (optionally only `phase`, only `times` times)."""
        with self._lock:
            self._rules.append(_Rule(request_id, phase, times))

    def hold(self, request_id: str, phase: str | None = None, after: int = 0) -> None:
        """Make one step containing this request (optionally only in `phase`; after `after` such steps ran)
        wait, before its forward, until `release(request_id)`: its rows stay in flight, and requests
        submitted meanwhile stay queued. Once released the hold is gone."""
        with self._lock:
            self._holds[request_id] = _Hold(phase, after)

    def wait_held(self, request_id: str, timeout_s: float = 60.0) -> bool:
        """Block until a step is held for this request (armed with `hold`); False after `timeout_s`."""
        return self.wait_any_held([request_id], timeout_s) == request_id

    def wait_any_held(self, request_ids: list[str], timeout_s: float = 60.0) -> str | None:
        """Block until a step is held for one of these requests (each armed with `hold`); which one, or None
        after `timeout_s`."""
        with self._lock:
            holds = {r: self._holds[r] for r in request_ids if r in self._holds}
            missing = set(request_ids) - set(holds)
            if missing:
                raise KeyError(f"no hold armed for requests {sorted(missing)}")
            self._is_changed.wait_for(lambda: any(h.is_held.is_set() for h in holds.values()), timeout_s)
        return next((r for r, h in holds.items() if h.is_held.is_set()), None)

    def release(self, request_id: str) -> None:
        """Let the step held for this request go on (or disarm a hold not reached yet)."""
        with self._lock:
            hold = self._holds.pop(request_id, None)
        if hold is not None:
            hold.is_released.set()

    def release_all(self) -> None:
        """Release every hold (the engine stops, or a test ends)."""
        with self._lock:
            holds, self._holds = list(self._holds.values()), {}
        for hold in holds:
            hold.is_released.set()

    def clear(self) -> None:
        """Disarm every rule and release every hold."""
        with self._lock:
            self._rules.clear()
        self.release_all()

    def check(self, phase: str, request_ids: list[str]) -> None:
        """Called by the runner before each forward: waits while a hold matches, raises when a rule does."""
        if self._holds:
            self._wait_for_holds(phase, request_ids)
        if not self._rules:
            return
        with self._lock:
            for rule in self._rules:
                if rule.request_id in request_ids and rule.phase in (None, phase) and rule.remaining != 0:
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    self.num_raised += 1
                    raise InjectedFault(f"injected {phase} failure for request {rule.request_id}")

    def _wait_for_holds(self, phase: str, request_ids: list[str]) -> None:
        with self._lock:
            matched = []
            for request_id in request_ids:
                hold = self._holds.get(request_id)
                if hold is None or hold.phase not in (None, phase) or hold.is_held.is_set():
                    continue
                if hold.num_skip > 0:
                    hold.num_skip -= 1
                else:
                    matched.append((request_id, hold))
        for request_id, hold in matched:
            with self._lock:
                hold.is_held.set()
                self._is_changed.notify_all()
            if not hold.is_released.wait(HOLD_LIMIT_S):
                self.release(request_id)
                raise InjectedFault(f"the hold on request {request_id} was never released")
