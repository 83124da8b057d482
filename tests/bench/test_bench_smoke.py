"""Every benchmark script runs in a seconds-long mode and prints its table (issue 24: benchmarks are code
too), so that a rename or a changed API breaks CI, not the next measurement.

Each case runs `python bench/<script>.py` as a subprocess (bench/ on sys.path, as when run by hand) with
tiny flags, and checks only that it exits 0 and prints words of its table. The libraries (bench_common,
servers, peer_servers, peer_load, peer_suites, peer_suite_run, flood_client) are covered through the
scripts that use them. The scripts and the servers they start run without compiling: the model step
eagerly (--eager, and PROMPTSERVE_COMPILE=false), decode attention through SDPA (PROMPTSERVE_NATIVE_DECODE=0:
building the native kernel takes 2-3 s in every process; it has tests of its own in tests/engine/).

Most of a smoke run is waiting (servers starting and stopping, phases of fixed length), so the selected
scripts start together, PARALLEL at a time, longest first, when the first case runs; each case then waits
for its own script.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.demo import build_model_folder

BENCH = Path(__file__).resolve().parents[2] / "bench"
TINY = ("--hidden", "64", "--layers", "2", "--heads", "2", "--eager")  # bench_common's model flags
TIMEOUT_S = 300  # per script; a case takes seconds (minutes would mean a hang)
PARALLEL = 3
ENV = {"PROMPTSERVE_COMPILE": "false", "PROMPTSERVE_NATIVE_DECODE": "0"}


@dataclass(frozen=True)
class Case:
    """One script: its smoke flags, words its output must hold, and what it needs."""

    script: str
    flags: tuple[str, ...]
    expect: tuple[str, ...]
    uses_model_dir: bool = False  # gets --model-dir: a tiny model folder built once
    uses_work_dir: bool = False  # gets --work-dir: a folder of its own (kept by pytest for a look after)
    needs: str | None = None  # a module that must import (else the case is skipped, saying so)
    is_slow: bool = False  # marked slow (deselect with -m "not slow"): a minute or more on 2 cores


# Longest first: they start first.
CASES = [
    Case("bench_scaleout", ("--rounds", "1", "--concurrency", "2", "--tasks", "4", "--new-tokens", "2",
                            "--overhead-requests", "1", "--affinity-tasks", "4", "--affinity-requests", "8"),
         ("2 replicas / 1 replica =", "Ray's added time per one-token request"), uses_model_dir=True,
         uses_work_dir=True, needs="ray", is_slow=True),  # three servers, two of them Ray clusters
    Case("overload", ("--phase-s", "1", "--overload-s", "1.5", "--warmup-s", "0", "--new-tokens", "2", "--batch",
                      "2", "--queue", "4"), ("after/before p50 latency",), uses_model_dir=True),
    Case("bench_fairness", ("--phase-s", "0.5", "--batch", "2", "--queue", "8", "--new-tokens", "2", "--flood", "2"),
         ("B's p99 while A floods", "fair over fifo"), uses_model_dir=True),
    Case("bench_http", ("--eager", "--rounds", "1", "--requests", "2", "--new-tokens", "2"),
         ("HTTP / in-process =",), uses_model_dir=True, uses_work_dir=True),
    Case("bench_peer", ("--vllm-python", "none", "--scale", "0.05", "--rounds", "1", "--quiet-timeout-s", "0"),
         ("promptserve tok/s", "JSON "), uses_model_dir=True, uses_work_dir=True),
    Case("bench_churn", (*TINY, "--requests", "2", "--interval", "0.05", "--rounds", "1"),
         ("tokens/s slots r=0/legacy", "% of wall time in cache copies")),
    Case("bench_training", (*TINY, "--rounds", "1", "--steps", "1", "--batch-size", "2", "--streams", "2",
                            "--new-tokens", "4", "--serving-seconds", "0.5"),
         ("training speed, ours / PEFT's loop", "serving while training")),
    Case("profile_step", ("--eager", "--rounds", "1", "--workload", "P2", "--profile"),
         ("decode-only", "-row decode step:"), uses_model_dir=True),
    Case("unknown_ids", ("--num-ids", "40", "--concurrency", "4"), ("statuses {404: 40}",), uses_model_dir=True),
    Case("bench_memory", (*TINY, "--requests", "32", "--concurrency", "8", "--every", "16", "--tasks", "4"),
         ("peak tokens in flight",)),
    Case("bench_engine", (*TINY, "--requests", "4", "--new-tokens", "4", "--repeats", "1", "--d-requests", "1"),
         ("(a) engine, 4 tasks", "a/l (wall)", "a/d (wall)")),
    Case("bench_concurrency", (*TINY, "--kv-mib", "1", "--requests", "48", "--prompt-tokens", "40", "80",
                               "--new-tokens", "4"), ("peak/ideal",)),
    Case("bench_store", ("--tasks", "200", "--cached-tasks", "10"), ("hot hit:", "list() at 200 tasks")),
]


@dataclass
class Run:
    """A finished script: exit status (None: killed after TIMEOUT_S), output, wall seconds."""

    status: int | None
    out: str
    seconds: float


def run_script(script: str, flags: list[str], cwd: Path) -> Run:
    """`python bench/<script>.py FLAGS`. Past TIMEOUT_S it gets SIGINT first, so that its `finally` blocks
    stop the servers it started (each in a process group of its own), then SIGKILL."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(BENCH / f"{script}.py"), *flags], cwd=cwd,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        return Run(proc.returncode, out, time.monotonic() - started)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        return Run(None, out, time.monotonic() - started)


def skip_reason(case: Case) -> str | None:
    if case.needs and importlib.util.find_spec(case.needs) is None:
        return f"{case.script} needs {case.needs}, which is not installed"
    return None


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """script -> Future[Run] of every selected case that can run, started PARALLEL at a time."""
    selected = {item.callspec.params["case"].script for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    cases = [c for c in CASES if c.script in selected and skip_reason(c) is None]
    model_dir = None
    if any(c.uses_model_dir for c in cases):  # 2048 positions: bench_peer's P3 prompts
        model_dir = build_model_folder(tmp_path_factory.mktemp("smoke-model"), family="llama", hidden_size=64,
                                       num_layers=2, num_heads=2, max_positions=2048)
    pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="bench-smoke")
    futures: dict[str, Future] = {}
    for case in cases:
        folder = tmp_path_factory.mktemp(case.script)
        flags = [*case.flags, *(["--model-dir", str(model_dir)] if case.uses_model_dir else []),
                 *(["--work-dir", str(folder / "work")] if case.uses_work_dir else [])]
        futures[case.script] = pool.submit(run_script, case.script, flags, folder)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.script, marks=[pytest.mark.slow] if c.is_slow else [])
                                  for c in CASES])
def test_benchmark_runs_and_prints_its_table(case: Case, runs):
    if (reason := skip_reason(case)) is not None:
        pytest.skip(reason)
    run = runs[case.script].result()
    print(f"{case.script}: {run.seconds:.1f} s")
    assert run.status is not None, f"{case.script} still running after {TIMEOUT_S} s:\n{run.out[-4000:]}"
    assert run.status == 0, f"{case.script} exited with {run.status}:\n{run.out[-4000:]}"
    for word in case.expect:
        assert word in run.out, f"{case.script} did not print {word!r}:\n{run.out[-4000:]}"
