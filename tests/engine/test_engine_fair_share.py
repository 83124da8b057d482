"""Fair share between tenants: the scheduler's admission order and its maths, stepped by hand (no torch)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from server.engine.config import EngineConfig
from server.engine.errors import QueueFull
from server.engine.request.sequence import Sequence
from server.engine.scheduling.fair_share import FairShare
from server.engine.scheduling.scheduler import ADMIT, Scheduler
from server.engine.types import SamplingParams


def _seq(name: str, tenant: str, *, weight: float = 1.0, num_ids: int = 4, max_new: int = 8) -> Sequence:
    return Sequence(request_id=name, task_id=None, prompt=None, prompt_ids=[5] * num_ids,
                    params=SamplingParams(max_new_tokens=max_new), seed=None, eos_token_ids=frozenset(),
                    tokenizer=None, sink=None, tenant=tenant, weight=weight)


class Sim:
    """The slot worker's loop without a model: admit into free slots, one token per running row per step."""

    def __init__(self, num_slots: int, max_queue: int = 10_000, preempt_after_steps: int = 0):
        self.sched = Scheduler(EngineConfig(max_batch_size=num_slots, max_queue=max_queue,
                                            preempt_after_steps=preempt_after_steps))
        self.preempted: list[str] = []
        self.admissions: list[str] = []  # every admission, a preempted request's second one too
        self.num_running_after_admission: list[int] = []
        self.num_slots = num_slots
        self.num_steps = 0
        self.admitted_at: dict[str, int] = {}
        self.tokens: dict[str, int] = {}

    def step(self) -> list[Sequence]:
        victim = self.sched.preempt_for_waiting(self.num_slots - self.sched.num_running)
        if victim is not None:
            self.preempted.append(victim.request_id)
        admitted = self.sched.admit_slots(self.num_slots - self.sched.num_running, lambda s: ADMIT)
        self.num_running_after_admission.append(self.sched.num_running)
        for seq in admitted:
            self.admitted_at.setdefault(seq.request_id, self.num_steps)
            self.admissions.append(seq.request_id)
        for seq in self.sched.running():
            seq.generated.append(7)
            self.tokens[seq.tenant] = self.tokens.get(seq.tenant, 0) + 1
        self.sched.finish([s for s in self.sched.running() if len(s.generated) >= s.params.max_new_tokens])
        self.num_steps += 1
        return admitted


def test_the_scheduler_imports_no_torch():
    code = ("import sys, server.engine.scheduling.scheduler, server.engine.scheduling.fair_share; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_tenant_alone_is_first_in_first_out():
    sim = Sim(num_slots=2)
    seqs = [_seq(f"a{i}", "a") for i in range(5)]
    for s in seqs:
        sim.sched.add(s)
    order = []
    while sim.sched.has_work():
        order += [s.request_id for s in sim.step()]
    assert order == [s.request_id for s in seqs]


def test_a_flood_does_not_hold_back_another_tenant():
    # A queues 200; B sends one request at a time. Each of B's requests is admitted in the very step a
    # slot frees, however long A's queue.
    sim = Sim(num_slots=4)
    for i in range(200):
        sim.sched.add(_seq(f"a{i}", "a", max_new=8))
    sim.step()
    waits = []
    for k in range(10):
        b = _seq(f"b{k}", "b", max_new=3)
        sim.sched.add(b)
        submitted = sim.num_steps
        slots_were_full = sim.sched.num_running == sim.num_slots
        while b.request_id not in sim.admitted_at:
            full_before = sim.sched.num_running == sim.num_slots
            admitted = sim.step()
            if not full_before or len(admitted) > 0:
                # a slot was free (or freed) at this step's admission: B must have been the one to take it
                assert b.request_id in sim.admitted_at, (k, [s.request_id for s in admitted])
        while b.status.value != "finished":
            sim.step()
        waits.append(sim.admitted_at[b.request_id] - submitted)
        assert slots_were_full or waits[-1] == 0
    assert max(waits) <= 8  # a slot frees at least every max_new_tokens steps
    assert sim.sched.num_waiting > 150  # A's flood was still there the whole time


def test_an_idle_tenant_share_goes_to_the_others():
    sim = Sim(num_slots=4)
    for i in range(20):
        sim.sched.add(_seq(f"a{i}", "a"))
    for _ in range(30):
        sim.step()
    assert sim.num_running_after_admission == [4] * 30  # no slot left empty while A waits


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 1.0), (5.0, 2.0)])
def test_token_shares_follow_the_weights(weights):
    w_a, w_b = weights
    sim = Sim(num_slots=8)
    rng = random.Random(3)
    seqs = []
    for i in range(600):  # both saturate, with mixed lengths
        seqs.append(_seq(f"a{i}", "a", weight=w_a, num_ids=rng.randint(1, 30), max_new=rng.randint(2, 20)))
        seqs.append(_seq(f"b{i}", "b", weight=w_b, num_ids=rng.randint(1, 30), max_new=rng.randint(2, 20)))
        sim.sched.add(seqs[-2])
        sim.sched.add(seqs[-1])
    for _ in range(400):
        sim.step()
    assert sim.sched.num_waiting > 0  # still saturated at the end
    served = {"a": 0, "b": 0}  # context tokens (input + generated) of the admitted requests
    for seq in seqs:
        if seq.request_id in sim.admitted_at:
            served[seq.tenant] += seq.num_context_tokens
    served_a, served_b = served["a"], served["b"]
    assert served_a / served_b == pytest.approx(w_a / w_b, rel=0.10)


def test_idle_time_banks_no_credit():
    # B was idle while A ran for a long time; when B returns it is lifted to A's counter, so it gets its
    # share from then on, not everything until it has "caught up".
    sim = Sim(num_slots=4)
    for i in range(300):
        sim.sched.add(_seq(f"a{i}", "a"))
    for _ in range(100):
        sim.step()
    for i in range(300):
        sim.sched.add(_seq(f"b{i}", "b"))
    tokens_before = dict(sim.tokens)
    for _ in range(100):
        sim.step()
    share_a = (sim.tokens["a"] - tokens_before["a"]) / (sim.tokens["b"] - tokens_before.get("b", 0))
    assert 0.8 <= share_a <= 1.25


def test_counters_of_backlogged_tenants_stay_within_one_request():
    # The fair-share maths itself: serving the least counter first keeps two backlogged tenants' counters
    # within one request's tokens (divided by weight) of each other: the bound on how long one can wait.
    fair = FairShare()
    rng = random.Random(5)
    weights = {"a": 1.0, "b": 4.0, "c": 0.5}
    max_cost = 50 / min(weights.values())
    for name, w in weights.items():
        fair.add(_seq(f"{name}-first", name, weight=w, num_ids=rng.randint(1, 50)))
    admitted = {name: 0 for name in weights}
    served = {name: 0.0 for name in weights}  # each tenant's counter: its admitted tokens / its weight
    for i in range(2000):
        seq = next(fair.candidates())
        fair.admit(seq)
        fair.add(_seq(f"{seq.tenant}{i}", seq.tenant, weight=seq.weight, num_ids=rng.randint(1, 50)))  # backlogged
        fair.leave(seq)
        admitted[seq.tenant] += 1
        served[seq.tenant] += seq.num_context_tokens / seq.weight
        counters = [served[n] for n in weights]
        assert max(counters) - min(counters) <= max_cost
    assert admitted["b"] > 4 * admitted["a"] > 0 and admitted["a"] > admitted["c"] > 0


def test_a_full_queue_still_takes_a_tenant_below_its_share():
    sched = Scheduler(EngineConfig(max_batch_size=1, max_queue=10))
    for i in range(10):
        sched.add(_seq(f"a{i}", "a"))
    with pytest.raises(QueueFull):
        sched.add(_seq("a-more", "a"))  # A holds the whole queue already
    for i in range(5):
        sched.add(_seq(f"b{i}", "b"))  # B's share of the full queue is 10 * 1/2
    with pytest.raises(QueueFull, match="tenant"):
        sched.add(_seq("b-more", "b"))
    assert sched.num_waiting == 15


def test_cancel_and_finish_count_a_request_once():
    sched = Scheduler(EngineConfig(max_batch_size=2))
    a, b = _seq("a0", "a"), _seq("b0", "b")
    sched.add(a)
    sched.add(b)
    sched.admit_slots(2, lambda s: ADMIT)
    a.is_cancel_requested = True
    assert sched.take_cancelled() == [a]
    sched.finish([a])  # the worker finishes what it cancelled: no second leave
    c = _seq("a1", "a")
    sched.add(c)
    assert sched.admit_slots(1, lambda s: ADMIT) == [c]


@pytest.mark.parametrize("after", [0, 8])
def test_a_long_running_flood_is_preempted_for_a_waiting_tenant(after):
    # A's requests run 200 tokens and hold every slot; B's request waits for a free slot (about 50 steps
    # here) unless, after `after` steps, one of A's rows is given to it. The preempted request goes back to
    # the head of A's queue with its tokens, and still ends with all 200.
    sim = Sim(num_slots=4, preempt_after_steps=after)
    flood = [_seq(f"a{i}", "a", max_new=200) for i in range(12)]
    for seq in flood:
        sim.sched.add(seq)
    for _ in range(150):  # staggered: A's rows are at different lengths
        sim.step()
    b = _seq("b0", "b", max_new=5)
    sim.sched.add(b)
    submitted = sim.num_steps
    while b.request_id not in sim.admitted_at:
        sim.step()
    wait = sim.admitted_at[b.request_id] - submitted
    if after:
        assert wait <= after + 1 and len(sim.preempted) == 1
        victim = next(s for s in flood if s.request_id == sim.preempted[0])
        assert victim.status.value == "waiting" and victim.generated  # kept its tokens
    else:
        assert wait > 20 and sim.preempted == []
    num_before = len(sim.admissions)
    while sim.sched.has_work():
        sim.step()
    assert all(len(s.generated) == 200 for s in flood)
    assert len(sim.preempted) <= 1  # no thrashing once B is served
    if after:  # admitted again before any request of A's that was still waiting
        later_a = [r for r in sim.admissions[num_before:] if r.startswith("a")]
        assert later_a[0] == sim.preempted[0], later_a[:3]
