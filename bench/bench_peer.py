"""Side-by-side benchmark: promptserve against vLLM's CPU build (`prompt_embeds`) serving one model folder.

  P1  32 concurrent requests over 32 tasks, 16 virtual tokens, 24-48-token inputs, 64 new tokens
  P2  32 concurrent requests over 4 tasks, 128 virtual tokens, 8-16-token inputs, 32 new tokens
  P3  open-loop Poisson arrivals at 70% of the slower side's capacity, 16 tasks, 16 virtual tokens,
      32-768-token prompts, 16-128 new tokens, streamed: time to first token, inter-token p50/p99

Both servers stay up; one is measured while the other is paused (before each measurement the script waits until
both servers and the machine are quiet, and warns if they are not; then it SIGSTOPs the other server's process
group until the measurement ends: idle vLLM wakes ~1,300 times a second, which stalls the other side's OpenMP
threads), in rounds that alternate which goes first;
medians are reported. Each round sends new texts (same tasks and length ranges), so that no side serves a text
it has seen. Greedy, ignore-EOS: both make exactly max_new tokens. "same" counts greedy outputs that
are token-identical. Inter-token gaps are taken per token at the client: tokens that arrive in one burst (< 1 ms
apart) give gaps near 0, so the JSON's tokens_per_burst says how bunched a side's stream was.
`--suite memory` (P4 memory-bound, P5 shared prefixes, P5-chat multi-turn) and `--suite grid` (concurrency x
new tokens) are described in peer_suites.py; both give the servers the same KV budget (--kv-gib) and run on a
copy of the model declaring --max-positions (16384 for memory), or on --model-dir (e.g. SmolLM2-135M's folder).
Run: python bench/bench_peer.py [--rounds 3] [--dtype float32|bfloat16|both] [--device cpu|cuda] [--scale 0.25]
     [--vllm-python /work/peer/vllm-venv/bin/python] [--tcmalloc .../libtcmalloc_minimal.so.4] [--json-out F]
     [--suite classic|memory|grid] [--kv-gib 1] [--max-positions 16384] [--long-tokens 9000]
     [--model-dir DIR] [--quiet-timeout-s 20]  (a smoke run: a tiny model's folder, --scale 0.05, 0)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import tempfile
from contextlib import ExitStack
from pathlib import Path


import peer_servers as ps  # bench/ is on sys.path when this script runs
from peer_load import arrivals_at, closed_loop, figures, open_loop, summary_row, wait_quiet
from peer_suite_run import run_suite

TCMALLOC_DEFAULT = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


@dataclasses.dataclass(frozen=True)
class Workload:
    """A request mix: counts, task set and length ranges (inclusive)."""

    name: str
    num_requests: int
    num_tasks: int
    num_virtual: int
    input_range: tuple[int, int]
    new_range: tuple[int, int]


WORKLOADS = (Workload("P1", 32, 32, 16, (24, 48), (64, 64)), Workload("P2", 32, 4, 128, (8, 16), (32, 32)),
             Workload("P3", 64, 16, 16, (32, 768), (16, 128)))


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "both"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every request count (0.25: a smoke run)")
    p.add_argument("--vllm-python", default=os.environ.get("PROMPTSERVE_VLLM_PYTHON"),
                   help="python of vLLM's venv (env PROMPTSERVE_VLLM_PYTHON); none: promptserve only")
    p.add_argument("--tcmalloc", default=TCMALLOC_DEFAULT if Path(TCMALLOC_DEFAULT).exists() else None,
                   help="libtcmalloc_minimal.so.4 to preload into both servers (CPU)")
    p.add_argument("--promptserve-args", default="", help="extra flags for `promptserve serve`")
    p.add_argument("--vllm-args", default="", help="extra flags for vLLM's api_server")
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (built there if missing)")
    p.add_argument("--work-dir", type=Path, default=None, help="store and logs (default: a temp folder)")
    p.add_argument("--p3-rate", type=float, default=None, help="P3 arrivals/s (default: 70%% of capacity)")
    p.add_argument("--p3-requests", type=int, default=64)
    p.add_argument("--p3-max-s", type=float, default=120.0, help="P3 stops sending after this many seconds")
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--quiet-timeout-s", type=float, default=20.0, help="before each measurement, wait up to this "
                   "long for idle servers and a quiet machine (0: measure at once, no idle-CPU sample; a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--suite", default="classic", choices=["classic", "memory", "grid"])
    p.add_argument("--kv-gib", type=int, default=1, help="memory and grid suites: KV memory of both sides, GiB")
    p.add_argument("--max-positions", type=int, default=None, help="memory/grid: the model's declared limit "
                   "(default 16384 for memory, 2048 for grid)")
    p.add_argument("--long-tokens", type=int, default=9000, help="P4: tokens of each long request")
    args = p.parse_args()
    if args.max_positions is None:
        args.max_positions = 16384 if args.suite == "memory" else ps.MAX_POSITIONS
    return args


def scaled(workloads: tuple[Workload, ...], args: argparse.Namespace) -> list[Workload]:
    """The workloads with request counts (and the task count, so every task is used) times --scale."""
    out = []
    for w in workloads:
        count = args.p3_requests if w.name == "P3" else w.num_requests
        count = max(2, round(count * args.scale))
        out.append(Workload(w.name, count, min(w.num_tasks, count), w.num_virtual, w.input_range, w.new_range))
    return out


def text_of_length(tokenizer, words: list[str], start: int, target: int) -> str:
    """The longest run of corpus words from `start` whose ids (BOS included) number at most `target`."""
    def num_ids(k: int) -> int:
        return len(tokenizer(" ".join(words[(start + i) % len(words)] for i in range(k)))["input_ids"])

    low, high = 1, target
    while low < high:  # largest k with num_ids(k) <= target
        mid = (low + high + 1) // 2
        low, high = (mid, high) if num_ids(mid) <= target else (low, mid - 1)
    return " ".join(words[(start + i) % len(words)] for i in range(low))


def make_requests(w: Workload, tokenizer, words: list[str], rng: random.Random) -> list[ps.Request]:
    """Requests of a workload; request i is for task i % num_tasks; ids are what promptserve tokenizes."""
    reqs = []
    for i in range(w.num_requests):
        text = text_of_length(tokenizer, words, rng.randrange(len(words)), rng.randint(*w.input_range))
        reqs.append(ps.Request(f"{w.name.lower()}-t{i % w.num_tasks:02d}", text, tokenizer(text)["input_ids"],
                               rng.randint(*w.new_range)))
    return reqs


@dataclasses.dataclass
class Bench:
    """One dtype's run: servers and clients by side name, the requests, and per-round results."""

    args: argparse.Namespace
    workloads: list[Workload]
    requests: dict[str, list[ps.Request]]
    servers: dict[str, ps.ServerProcess]
    sides: dict[str, object]
    rounds: dict[tuple[str, str], list[dict]]
    outputs: dict[tuple[str, str], list[list[int]]]
    notes: dict


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, dict, dict[str, list[ps.Request]], list[Workload]]:
    """Model folder, one store of all workloads' tasks, and the requests (same seed: same requests)."""
    from transformers import AutoTokenizer

    from server.demo import demo_corpus

    model_dir = ps.build_model_dir(args.model_dir or work / "model")
    workloads, prompts = scaled(WORKLOADS, args), {}
    for i, w in enumerate(workloads):
        prompts.update(ps.write_tasks(work / "store", f"{w.name.lower()}-t", w.num_tasks, w.num_virtual, 100 + i,
                                      ps.hidden_size(model_dir)))
    tokenizer, words = AutoTokenizer.from_pretrained(model_dir), demo_corpus().split()
    rng = random.Random(args.seed)
    # Fresh texts for every round (same tasks, same length ranges): sent again, a text would let vLLM's
    # prefix cache skip its prefill (TTFT 87 ms in round 1, 34 ms in rounds 2-3 when rounds repeated them),
    # which live traffic with new texts never gets. Warm-up and the P3 capacity probe get sets of their own.
    requests = {request_set(w.name, key): make_requests(w, tokenizer, words, rng)
                for key in ("warm", "capacity", *range(args.rounds)) for w in workloads}
    return model_dir, prompts, requests, workloads


def request_set(workload: str, key: str | int) -> str:
    """Name of one set of requests: a workload's for warm-up, the P3 capacity probe, or round k."""
    return f"{workload}#{key}"


def start_servers(args: argparse.Namespace, dtype: str, model_dir: Path, work: Path, prompts: dict,
                  servers: dict[str, ps.ServerProcess]) -> tuple[dict, dict]:
    """Both servers started together into `servers`, each waited for; vLLM is left out (with a line saying
    why) if it fails. The clients by side name, and notes."""
    sides, notes = {}, {"startup_s": {}}
    servers["promptserve"] = ps.start_promptserve(model_dir, work / "store", dtype, args.device,
                                                  args.promptserve_args, work / f"promptserve-{dtype}.log",
                                                  args.tcmalloc)
    if not args.vllm_python or not Path(args.vllm_python).exists():
        print(f"vLLM: no python at {args.vllm_python!r} (--vllm-python / PROMPTSERVE_VLLM_PYTHON): "
              "promptserve figures only", flush=True)
    else:
        servers["vllm"] = ps.start_vllm(args.vllm_python, args.tcmalloc, model_dir, dtype, args.device,
                                        args.vllm_args, work / f"vllm-{dtype}.log")
    for name in list(servers):
        try:
            notes["startup_s"][name] = round(servers[name].wait_ready(args.start_timeout_s), 1)
            print(f"{name} ready after {notes['startup_s'][name]} s (log {servers[name].log})", flush=True)
        except RuntimeError as exc:
            if name == "promptserve":
                raise
            print(f"vLLM: could not be started ({exc}); promptserve figures only", flush=True)
            servers.pop(name).stop()
    sides["promptserve"] = ps.PromptserveSide(servers["promptserve"].url)
    if "vllm" in servers:
        sides["vllm"] = ps.VllmSide(servers["vllm"].url, prompts, ps.input_embeddings(model_dir))
    return sides, notes


def measure(bench: Bench, w: Workload, name: str, arrivals: list[float] | None,
            key: str | int) -> tuple[dict, list[ps.Reply]]:
    """One workload's request set `key` on one side, the other servers quiet, then paused: figures and
    replies."""
    wait_quiet(list(bench.servers.values()), bench.args.quiet_timeout_s)
    reqs = bench.requests[request_set(w.name, key)]
    with ExitStack() as others:
        for other in (s for n, s in bench.servers.items() if n != name):
            others.enter_context(other.paused())
        if arrivals is None:
            replies, wall = asyncio.run(closed_loop(bench.sides[name], reqs))
        else:
            replies, wall = asyncio.run(open_loop(bench.sides[name], reqs, arrivals, bench.args.p3_max_s))
    return figures(replies, wall), replies


def warm_up(bench: Bench) -> None:
    """A few requests of every workload on every side (first-call paths); a failing vLLM is left out."""
    for name, side in list(bench.sides.items()):
        for w in bench.workloads:
            warm = bench.requests[request_set(w.name, "warm")][:4]
            errors = [r.error for r in asyncio.run(closed_loop(side, warm))[0] if r.error]
            if errors and name == "promptserve":
                raise RuntimeError(f"promptserve failed a warm-up request of {w.name}: {errors[0]}")
            if errors:
                print(f"vLLM: failed a warm-up request of {w.name} ({errors[0]}); promptserve figures only")
                bench.sides.pop(name), bench.servers.pop(name).stop()
                break


def p3_rate(bench: Bench) -> float:
    """--p3-rate, or 70% of the slower side's capacity: a closed loop of up to 32 P3 requests, in requests/s."""
    if bench.args.p3_rate:
        return bench.args.p3_rate
    p3 = next(w for w in bench.workloads if w.name == "P3")
    few = dataclasses.replace(p3, num_requests=min(32, p3.num_requests))
    probe = request_set("P3", "capacity")
    bench.requests[probe] = bench.requests[probe][:few.num_requests]
    capacity = {}
    for name in bench.sides:
        fig, _ = measure(bench, few, name, None, "capacity")
        capacity[name] = few.num_requests / fig["wall_s"]
        print(f"  P3 capacity ({name}): {capacity[name]:.2f} requests/s", flush=True)
    bench.notes["p3_capacity_rps"] = {k: round(v, 3) for k, v in capacity.items()}
    return 0.7 * min(capacity.values())


def run_rounds(bench: Bench, rate: float) -> None:
    """Rounds of every workload on every side, the side order alternating; keeps round 1's token ids."""
    arrivals = arrivals_at(rate, len(bench.requests[request_set("P3", 0)]), bench.args.seed + 1)
    names = list(bench.sides)
    for round_no in range(bench.args.rounds):
        order = names if round_no % 2 == 0 else names[::-1]
        for w in bench.workloads:
            for name in order:
                fig, replies = measure(bench, w, name, arrivals if w.name == "P3" else None, round_no)
                bench.rounds.setdefault((w.name, name), []).append(fig)
                bench.outputs.setdefault((w.name, name), [r.ids for r in replies])
                extra = f", TTFT p50 {fig['ttft_p50']:.0f} ms" if "ttft_p50" in fig else ""
                errors = f", {fig['errors']} errors ({fig.get('first_error')})" if fig["errors"] else ""
                print(f"  round {round_no + 1} {w.name} {name}: {fig['tok_s']:.1f} tokens/s{extra}{errors}",
                      flush=True)


def summarize(bench: Bench) -> dict:
    """Per workload: each side's median figures, the median per-round ratio, and identical greedy outputs."""
    return {w.name: summary_row({n: bench.rounds[(w.name, n)] for n in bench.sides},
                                {n: bench.outputs[(w.name, n)] for n in bench.sides}) for w in bench.workloads}


def print_table(results: list[dict]) -> None:
    """One line per dtype and workload: tokens/s of each side, the ratio, identical greedy outputs (and the
    mean share of a promptserve output that vLLM repeats from its start), P3's latencies (ms)."""
    print(f"{'dtype':<9}{'load':<9}{'promptserve tok/s':>18}{'vllm tok/s':>12}{'ps/vllm':>9}{'same (prefix)':>15}"
          f"   TTFT p50/p99 ms (ps | vllm)   ITL p50/p99 ms (ps | vllm)")
    for result in results:
        for load, row in result["workloads"].items():
            mine, peer = row["promptserve"], row.get("vllm", {})
            same = f"{row['same'][0]}/{row['same'][1]} ({row['common_prefix']:.0%})" if "same" in row else "-"
            line = (f"{result['dtype']:<9}{load:<9}{mine['tok_s']:>18.1f}{peer.get('tok_s', float('nan')):>12.1f}"
                    f"{row.get('ratio', float('nan')):>9.2f}{same:>15}")
            if "ttft_p50" in mine:
                lat = [f"{side.get(f'{k}_p50', float('nan')):.0f}/{side.get(f'{k}_p99', float('nan')):.0f}"
                       for k in ("ttft", "itl") for side in (mine, peer)]
                line += f"   {lat[0]:>12} | {lat[1]:<14} {lat[2]:>12} | {lat[3]}"
            print(line)


def run_dtype(args: argparse.Namespace, dtype: str, work: Path) -> dict:
    """Start both servers for one dtype, warm up, measure the rounds, stop them; the summary."""
    model_dir, prompts, requests, workloads = prepare(args, work)
    servers: dict[str, ps.ServerProcess] = {}
    try:
        sides, notes = start_servers(args, dtype, model_dir, work, prompts, servers)
        bench = Bench(args, workloads, requests, servers, sides, {}, {}, notes)
        warm_up(bench)
        if args.quiet_timeout_s > 0:
            shares, machine = ps.cpu_shares(list(servers.values()), 3.0)
            notes["idle_cores"] = {**dict(zip(servers, (round(x, 3) for x in shares))), "machine": round(machine, 3)}
            print(f"  idle CPU (cores busy): {notes['idle_cores']}", flush=True)
        rate = p3_rate(bench)
        notes["p3_rate_rps"] = round(rate, 3)
        print(f"  P3 arrivals: {rate:.2f} requests/s", flush=True)
        run_rounds(bench, rate)
        dump = [{"workload": w, "side": n, "requests": [vars(r) for r in requests[request_set(w, 0)]], "ids": ids}
                for (w, n), ids in bench.outputs.items()]
        (work / f"outputs-{dtype}.json").write_text(json.dumps(dump))  # round 1's token ids, for a look later
        return {"dtype": dtype, **notes, "workloads": summarize(bench)}
    finally:
        for server in servers.values():
            server.stop()


def machine() -> str:
    """The CPU model and core count, or the GPU's name."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    return f"{names[0] if names else 'cpu'}, {os.cpu_count()} cores"


def main() -> None:
    """Every dtype asked for; the table and one JSON line at the end."""
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # KeyboardInterrupt: `finally` stops servers
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model_dir or f"{ps.LAYERS}x{ps.HIDDEN} llama"
    print(f"device {args.device} ({machine()}); model {model}; suite {args.suite}; work dir {work}", flush=True)
    results = []
    for dtype in (["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]):
        print(f"== {dtype}", flush=True)
        results.append(run_dtype(args, dtype, work) if args.suite == "classic" else run_suite(args, dtype, work))
        print_table(results[-1:])  # this dtype's figures now, in case a later one fails
    print_table(results)
    record = {"device": args.device, "machine": machine(), "rounds": args.rounds, "scale": args.scale,
              "results": results}
    print("JSON " + json.dumps(record, separators=(",", ":")))
    if args.json_out:
        args.json_out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
