"""Overload a real `promptserve serve` at ~1.5x its measured capacity and print what held.

    python bench/overload.py                       # tiny llama on CPU, 60 s overload (about 3 min in all)
    python bench/overload.py --overload-s 20 --factor 2
    python bench/overload.py --phase-s 1 --overload-s 1.5 --warmup-s 0   # a smoke run (seconds)

Phases, each through the load harness (`promptserve loadtest`, JSON reports): capacity (closed loop at
2x the batch size: completed requests/s), baseline (open loop at 0.5x capacity), overload (open loop at
`--factor` x capacity for `--overload-s`), after (the baseline again); the others last --phase-s each.
Meanwhile a sampler polls the server process's RSS, /metrics (queue depth) and sends one probe request per
second to record 429s and their Retry-After header. Prints status counts, peak queue, RSS after warm-up,
baseline vs after latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import ServerProcess, free_port, promptserve_command


@dataclass
class Samples:
    """What the sampler saw during the overload phase."""

    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    queue: list[float] = field(default_factory=list)
    probe_status: dict[int, int] = field(default_factory=dict)
    retry_after: set[str] = field(default_factory=set)


def start_server(batch: int, queue: int, workdir: Path, model: Path | None = None) -> ServerProcess:
    """`promptserve serve` on CPU of `model`, by default the demo-sized tiny llama (built in `workdir`),
    ready; its log is workdir/server.log."""
    if model is None:
        from server.demo import build_model_folder

        model = build_model_folder(workdir / "model", family="llama")
    port = free_port()
    cmd = promptserve_command("--model", str(model), "--store", str(workdir / "prompts"), "--port", str(port),
                              "--device", "cpu", "--max-batch-size", str(batch), "--max-queue", str(queue),
                              "--log-level", "warning")
    server = ServerProcess("server", cmd, workdir / "server.log", port)
    try:
        server.wait_ready(120)
    except RuntimeError as exc:
        server.stop()
        raise SystemExit(str(exc)) from None
    return server


def loadtest(url: str, out: Path, *load: str, new_tokens: int, tasks: str) -> dict:
    cmd = [sys.executable, "-m", "loadtest", "--url", url, "--task-ids", tasks, "--no-stream", "--ignore-eos",
           "--max-new-tokens", str(new_tokens), "--prompt-tokens", "16", "--quiet", "--out", str(out),
           "--request-timeout", "60", *load]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["client"]


def sample(url: str, pid: int, stop: threading.Event, into: Samples, tasks: list[str]) -> None:
    proc, t0, last_probe = psutil.Process(pid), time.monotonic(), 0.0
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.wait(0.5):
            now = time.monotonic() - t0
            into.rss.append((now, proc.memory_info().rss))
            for line in c.get("/metrics").text.splitlines():
                if line.startswith("promptserve_queue_depth "):
                    into.queue.append(float(line.split()[1]))
            if now - last_probe >= 1.0:
                last_probe = now
                r = c.post("/generate", json={"task_id": tasks[0], "inputs": "probe", "parameters": {"max_new_tokens": 1}})
                into.probe_status[r.status_code] = into.probe_status.get(r.status_code, 0) + 1
                if r.status_code == 429:
                    into.retry_after.add(r.headers.get("retry-after", "MISSING"))


def wait_settled(url: str, timeout_s: float = 120) -> float:
    """Seconds until /metrics shows nothing queued or running (the overload's backlog is served)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        text = httpx.get(url + "/metrics", timeout=30).text
        values = [float(line.split()[1]) for line in text.splitlines()
                  if line.startswith(("promptserve_queue_depth ", "promptserve_running_batch_size "))]
        if values and not any(values):
            break
        time.sleep(0.2)
    return time.monotonic() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--queue", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--overload-s", type=float, default=60)
    p.add_argument("--warmup-s", type=float, default=15, help="RSS is judged after this much of the overload")
    p.add_argument("--phase-s", type=float, default=20, help="seconds of the capacity, baseline and after phases")
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: a tiny llama, built)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = start_server(args.batch, args.queue, work, args.model_dir)
        try:
            return run(args, work, server.proc, server.url)
        finally:
            print(f"server exit status after SIGTERM: {server.stop(grace_s=60)}")


def run(args, work: Path, proc: subprocess.Popen, url: str) -> int:
    tasks = [f"ov-{i}" for i in range(4)]
    for i, t in enumerate(tasks):
        httpx.put(f"{url}/v1/tasks/{t}", json={"init": "random", "num_virtual_tokens": 4 + 4 * i, "seed": i})
    common = {"new_tokens": args.new_tokens, "tasks": ",".join(tasks)}
    print(f"load average at start (other processes share these cores): {os.getloadavg()[0]:.1f}")
    cap = loadtest(url, work / "cap.json", "--concurrency", str(2 * args.batch), "--duration", f"{args.phase_s:g}",
                   **common)
    capacity = cap["num_ok"] / cap["wall_s"]
    print(f"capacity: {capacity:.2f} requests/s ({cap['tokens_per_s']:.1f} tokens/s), closed loop at "
          f"concurrency {2 * args.batch}, {args.new_tokens} new tokens each, statuses {cap['by_status']}")
    light = ("--rate", f"{0.5 * capacity:.3f}", "--duration", f"{args.phase_s:g}")
    before = loadtest(url, work / "before.json", *light, **common)
    samples, stop = Samples(), threading.Event()
    sampler = threading.Thread(target=sample, args=(url, proc.pid, stop, samples, tasks))
    sampler.start()
    rate = args.factor * capacity
    over = loadtest(url, work / "over.json", "--rate", f"{rate:.3f}", "--duration", str(args.overload_s),
                    "--max-inflight", "4096", **common)
    stop.set()
    sampler.join()
    drain_s = wait_settled(url)
    print(f"backlog drained {drain_s:.1f} s after the overload ended (queue and batch empty)")
    after = loadtest(url, work / "after.json", *light, **common)
    report(args, rate, over, samples, before, after)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    num_5xx = sum(n for s, n in over["by_status"].items() if s.startswith("5"))
    return 0 if num_5xx == 0 and proc.poll() is None else 1


def report(args, rate: float, over: dict, s: Samples, before: dict, after: dict) -> None:
    print(f"overload: open loop {rate:.2f} requests/s ({args.factor}x) for {args.overload_s:.0f} s: "
          f"{over['num_requests']} requests, statuses {over['by_status']}, errors {over['errors']}")
    print(f"  completed {over['requests_per_s']:.2f} requests/s, {over['tokens_per_s']:.1f} tokens/s; "
          f"probe statuses {s.probe_status}, Retry-After values {sorted(s.retry_after)}")
    print(f"  queue depth (max_queue {args.queue}): peak {max(s.queue):.0f}, mean {statistics.mean(s.queue):.1f}")
    warm = [b for t, b in s.rss if t >= args.warmup_s]
    mib = 1 << 20
    print(f"  server RSS after {args.warmup_s:.0f} s warm-up: min {min(warm) / mib:.1f} MiB, max {max(warm) / mib:.1f} "
          f"MiB, first {warm[0] / mib:.1f}, last {warm[-1] / mib:.1f} ({len(warm)} samples)")
    for name, r in (("before", before), ("after", after)):
        print(f"{name:>6}: open loop 0.5x capacity: statuses {r['by_status']}, latency p50 "
              f"{r['latency']['p50'] * 1000:.0f} ms p90 {r['latency']['p90'] * 1000:.0f} ms, "
              f"{r['tokens_per_s']:.1f} tokens/s")
    print(f" after/before p50 latency: {after['latency']['p50'] / before['latency']['p50']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
