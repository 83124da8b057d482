"""Scheduler: FIFO admission under batch-size and padded prefill-token limits, cancel, free slots."""

from __future__ import annotations

import pytest

from server.engine.config import EngineConfig
from server.engine.errors import QueueFull
from server.engine.request.sequence import Sequence, Status
from server.engine.scheduling.scheduler import Scheduler
from server.engine.types import SamplingParams


class _Prompt:
    def __init__(self, n: int):
        self.num_virtual_tokens = n
        self.version = "v"


def _seq(name: str, num_ids: int, n: int = 0) -> Sequence:
    return Sequence(request_id=name, task_id=None, prompt=_Prompt(n) if n else None, prompt_ids=[5] * num_ids,
                    params=SamplingParams(), seed=None, eos_token_ids=frozenset(), tokenizer=None, sink=None)


def test_admits_in_order_up_to_batch_size():
    sched = Scheduler(EngineConfig(max_batch_size=3))
    seqs = [_seq(f"s{i}", 4) for i in range(5)]
    for s in seqs:
        sched.add(s)
    assert sched.admit() == seqs[:3]
    assert all(s.status is Status.RUNNING for s in seqs[:3])
    assert sched.admit() == []  # batch full: nobody else gets in
    sched.finish([seqs[1]])  # a finished request frees its slot at once
    assert sched.admit() == [seqs[3]]
    assert sched.num_running == 3 and sched.num_waiting == 1


def test_prefill_budget_counts_padded_tokens_and_keeps_fifo():
    sched = Scheduler(EngineConfig(max_prefill_tokens=30))
    long_one, short, short2 = _seq("long", 10, n=10), _seq("short", 2), _seq("short2", 2)
    for s in (short, long_one, short2):
        sched.add(s)
    # short (2) + long (20): padded cost 2 rows x 20 = 40 > 30, so only `short` goes; FIFO: short2 waits too.
    assert sched.admit() == [short]
    assert sched.admit() == [long_one]
    assert sched.admit() == [short2]


def test_first_request_is_admitted_even_alone_over_budget():
    sched = Scheduler(EngineConfig(max_prefill_tokens=8))
    big = _seq("big", 20)
    sched.add(big)
    assert sched.admit() == [big]


def test_queue_full_raises():
    sched = Scheduler(EngineConfig(max_queue=2))
    sched.add(_seq("a", 1))
    sched.add(_seq("b", 1))
    with pytest.raises(QueueFull):
        sched.add(_seq("c", 1))


def test_take_cancelled_from_waiting_and_running():
    sched = Scheduler(EngineConfig(max_batch_size=1))
    running, waiting, other = _seq("r", 1), _seq("w", 1), _seq("o", 1)
    for s in (running, waiting, other):
        sched.add(s)
    assert sched.admit() == [running]
    running.is_cancel_requested = waiting.is_cancel_requested = True
    assert {s.request_id for s in sched.take_cancelled()} == {"r", "w"}
    assert sched.num_running == 0 and sched.num_waiting == 1
    assert sched.admit() == [other]


def test_scheduler_and_sequence_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, server.engine.scheduling.scheduler, server.engine.request.sequence; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
