"""Admission in the scheduler (the paged worker's verdicts: ADMIT, DEFER keeps a request's place while
later ones pass, STOP ends the step's admissions) and preemption for memory, with no model."""

from __future__ import annotations

from server.engine.config import EngineConfig
from server.engine.request.sequence import Sequence, Status
from server.engine.scheduling.scheduler import ADMIT, DEFER, STOP, Scheduler
from server.engine.types import SamplingParams


# -- Scheduler.admit_slots -----------------------------------------------------------------------
def _seq(name: str) -> Sequence:
    return Sequence(request_id=name, task_id=None, prompt=None, prompt_ids=[5, 6], params=SamplingParams(),
                    seed=None, eos_token_ids=frozenset(), tokenizer=None, sink=None)


def _queued(num: int, max_batch_size: int = 16) -> tuple[Scheduler, list[Sequence]]:
    sched = Scheduler(EngineConfig(max_batch_size=max_batch_size))
    seqs = [_seq(f"s{i}") for i in range(num)]
    for seq in seqs:
        sched.add(seq)
    return sched, seqs


def _always(seq: Sequence) -> str:
    return ADMIT


def test_admit_slots_takes_at_most_the_free_slots():
    sched, seqs = _queued(5)
    assert sched.admit_slots(2, _always) == seqs[:2]
    assert all(s.status is Status.RUNNING for s in seqs[:2]) and seqs[2].status is Status.WAITING
    assert sched.admit_slots(0, _always) == []
    assert sched.num_running == 2 and sched.num_waiting == 3


def test_admit_slots_takes_at_most_the_batch_room():
    sched, seqs = _queued(5, max_batch_size=3)
    assert sched.admit_slots(2, _always) == seqs[:2]
    assert sched.admit_slots(10, _always) == [seqs[2]]  # 3 - 2 running, though 10 slots are free
    assert sched.admit_slots(10, _always) == []
    sched.finish([seqs[0]])
    assert sched.admit_slots(10, _always) == [seqs[3]]


def test_deferred_request_keeps_its_place_while_later_ones_pass():
    sched, seqs = _queued(5)
    deferred = {"s1"}
    assert sched.admit_slots(2, lambda s: DEFER if s.request_id in deferred else ADMIT) == [seqs[0], seqs[2]]
    assert seqs[1].status is Status.WAITING
    deferred.clear()
    assert sched.admit_slots(1, _always) == [seqs[1]]  # still first in the queue
    assert sched.admit_slots(5, _always) == seqs[3:]


def test_several_deferred_keep_their_order():
    sched, seqs = _queued(6)
    assert sched.admit_slots(2, lambda s: ADMIT if s.request_id in {"s2", "s5"} else DEFER) == [seqs[2], seqs[5]]
    assert sched.admit_slots(10, _always) == [seqs[0], seqs[1], seqs[3], seqs[4]]


def test_is_ready_is_asked_only_of_requests_that_would_be_admitted():
    sched, seqs = _queued(6)
    asked: list[tuple[str, bool]] = []

    def is_ready(seq: Sequence) -> str:
        answer = seq.request_id != "s1"
        asked.append((seq.request_id, answer))
        return ADMIT if answer else DEFER

    admitted = sched.admit_slots(2, is_ready)
    assert asked == [("s0", True), ("s1", False), ("s2", True)]  # s3.. are not asked: no room left
    assert {name for name, answer in asked if answer} == {s.request_id for s in admitted}
    asked.clear()
    sched.admit_slots(0, is_ready)  # no free slot: nobody is asked
    sched2, _ = _queued(3, max_batch_size=1)
    sched2.admit_slots(5, _always)
    sched2.admit_slots(5, is_ready)  # batch full: nobody is asked
    assert asked == []




def test_stop_ends_the_steps_admissions_without_overtaking():
    sched, seqs = _queued(4)
    assert sched.admit_slots(4, lambda s: STOP if s.request_id == "s1" else ADMIT) == [seqs[0]]
    assert sched.num_waiting == 3  # s2 and s3 did not pass s1, which waits for memory
    assert sched.admit_slots(4, _always) == seqs[1:]


def test_preempt_for_memory_takes_the_latest_admitted_and_requeues_it_first():
    sched, seqs = _queued(3)
    sched.admit_slots(3, _always)
    victim = sched.preempt_for_memory()
    assert victim is seqs[2] and victim.status is Status.WAITING and sched.num_running == 2
    sched.add(_seq("late"))
    assert sched.admit_slots(1, _always) == [seqs[2]]  # back at the head of the queue
    assert Scheduler(EngineConfig()).preempt_for_memory() is None
