"""The fault injector's holds, alone (no model): a step containing the held request waits before its forward
until released; `after` and `phase` choose which step; release, clear and release_all never leave one held."""

from __future__ import annotations

import threading

import pytest

from server.engine.faults import DECODE, PREFILL, FaultInjector, InjectedFault


def _step(faults: FaultInjector, phase: str, request_ids: list[str]) -> threading.Thread:
    """One step's check on its own thread (the engine's worker), started."""
    thread = threading.Thread(target=faults.check, args=(phase, request_ids), daemon=True)
    thread.start()
    return thread


def test_a_held_step_waits_until_released():
    faults = FaultInjector()
    faults.hold("a")
    faults.check(PREFILL, ["b"])  # other requests pass
    step = _step(faults, PREFILL, ["b", "a"])
    assert faults.wait_held("a", 10)
    step.join(0.2)
    assert step.is_alive()  # still inside the step
    faults.release("a")
    step.join(10)
    assert not step.is_alive()
    faults.check(PREFILL, ["a"])  # released: gone


def test_after_and_phase_pick_the_step():
    faults = FaultInjector()
    faults.hold("a", phase=DECODE, after=2)
    faults.check(PREFILL, ["a"])
    faults.check(DECODE, ["a"])
    faults.check(DECODE, ["a"])  # two decode steps let pass
    step = _step(faults, DECODE, ["a"])
    assert faults.wait_held("a", 10)
    faults.release_all()
    step.join(10)
    assert not step.is_alive()


def test_wait_any_held_names_the_held_one_or_none():
    faults = FaultInjector()
    faults.hold("a")
    faults.hold("b")
    assert faults.wait_any_held(["a", "b"], 0.05) is None
    step = _step(faults, DECODE, ["b"])
    assert faults.wait_any_held(["a", "b"], 10) == "b"
    faults.clear()  # releases every hold too
    step.join(10)
    assert not step.is_alive()
    with pytest.raises(KeyError):
        faults.wait_held("a", 0.05)  # disarmed


def test_a_hold_released_before_it_is_reached_is_gone():
    faults = FaultInjector()
    faults.hold("a")
    faults.release("a")
    faults.check(PREFILL, ["a"])  # does not wait


def test_a_held_step_then_raises_a_rule_armed_meanwhile():
    faults = FaultInjector()
    faults.hold("a")
    errors = []
    step = threading.Thread(target=lambda: errors.append(_raised(faults)), daemon=True)
    step.start()
    assert faults.wait_held("a", 10)
    faults.fail_request("a")  # armed while the step waits: the step fails once released
    faults.release("a")
    step.join(10)
    assert errors == [True]


def _raised(faults: FaultInjector) -> bool:
    try:
        faults.check(DECODE, ["a"])
    except InjectedFault:
        return True
    return False
