"""bench_peer.py's `--suite memory` and `--suite grid` (peer_suites.py): both servers on one model folder
with the same KV budget, each load measured on one side while the other is paused, rounds alternating which
side goes first; medians and the median per-round ratio."""

from __future__ import annotations

import argparse
import asyncio
import random
from contextlib import ExitStack
from pathlib import Path

import peer_servers as ps
import peer_suites
from peer_load import clients_loop, figures, summary_row, wait_quiet


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, dict, dict]:
    """Model folder, tasks, and every round's requests (plus a warm-up set) of every cell."""
    from transformers import AutoTokenizer

    from server.demo import demo_corpus

    model_dir = args.model_dir or ps.build_model_dir(work / f"model-{args.max_positions}", args.max_positions)
    prompts = {}
    for i, (prefix, num_tasks, num_virtual) in enumerate(peer_suites.tasks_of(args.suite)):
        prompts.update(ps.write_tasks(work / "store", prefix, num_tasks, num_virtual, 200 + i,
                                      ps.hidden_size(model_dir)))
    texts = peer_suites.Texts(AutoTokenizer.from_pretrained(model_dir), demo_corpus().split(), random.Random(args.seed))
    requests = {(cell.name, key): peer_suites.requests(cell, texts, args.long_tokens)
                for key in ("warm", *range(args.rounds)) for cell in peer_suites.cells(args.suite)}
    return model_dir, prompts, requests


def start(args: argparse.Namespace, dtype: str, model_dir: Path, work: Path, prompts: dict) -> tuple[dict, dict]:
    """Both servers (the same KV budget in whole GiB), waited for; the servers and clients by side name."""
    kv_bytes = args.kv_gib << 30
    mine = (f"--kv-cache-memory {kv_bytes} --max-total-tokens {args.max_positions} --max-input-tokens "
            f"{args.max_positions} --max-batch-size 64 {args.promptserve_args}")
    servers = {"promptserve": ps.start_promptserve(model_dir, work / "store", dtype, args.device, mine,
                                                   work / f"promptserve-{args.suite}-{dtype}.log", args.tcmalloc)}
    if args.vllm_python:
        servers["vllm"] = ps.start_vllm(args.vllm_python, args.tcmalloc, model_dir, dtype, args.device,
                                        f"--max-num-seqs 64 {args.vllm_args}", work / f"vllm-{args.suite}-{dtype}.log",
                                        max_len=args.max_positions, kv_gib=args.kv_gib)
    for name, server in servers.items():
        print(f"{name} ready after {server.wait_ready(args.start_timeout_s):.0f} s (log {server.log})", flush=True)
    sides = {"promptserve": ps.PromptserveSide(servers["promptserve"].url)}
    if "vllm" in servers:
        sides["vllm"] = ps.VllmSide(servers["vllm"].url, prompts, ps.input_embeddings(model_dir))
    return servers, sides


def measure(servers: dict, side, cell: peer_suites.Cell, reqs: list[ps.Request],
            quiet_timeout_s: float) -> tuple[dict, list[ps.Reply]]:
    """One load on one side while the other servers are paused (P5-chat: its turns one after the other)."""
    wait_quiet(list(servers.values()), quiet_timeout_s)
    replies, wall = [], 0.0
    per_turn = len(reqs) // cell.turns
    with ExitStack() as others:
        for name, server in servers.items():
            if name != side.name:
                others.enter_context(server.paused())
        for turn in range(cell.turns):
            got, seconds = asyncio.run(clients_loop(side, reqs[turn * per_turn:(turn + 1) * per_turn],
                                                    cell.concurrency, cell.stream))
            replies, wall = replies + got, wall + seconds
    return figures(replies, wall), replies


def run_suite(args: argparse.Namespace, dtype: str, work: Path) -> dict:
    """Every cell of the suite on both sides, --rounds times; the summary."""
    model_dir, prompts, requests = prepare(args, work)
    servers, sides, rounds, outputs = {}, {}, {}, {}
    try:
        servers, sides = start(args, dtype, model_dir, work, prompts)
        cells = peer_suites.cells(args.suite)
        for side in sides.values():  # warm-up: first-call paths, compiled graphs
            for cell in cells:
                measure(servers, side, cell, requests[(cell.name, "warm")][:max(4, cell.turns)],
                        args.quiet_timeout_s)
        for round_no in range(args.rounds):
            for cell in cells:
                order = list(sides.values()) if round_no % 2 == 0 else list(sides.values())[::-1]
                for side in order:
                    fig, replies = measure(servers, side, cell, requests[(cell.name, round_no)],
                                           args.quiet_timeout_s)
                    rounds.setdefault((cell.name, side.name), []).append(fig)
                    outputs.setdefault((cell.name, side.name), [r.ids for r in replies])
                    ttft = f", TTFT p50 {fig['ttft_p50']:.0f} ms" if "ttft_p50" in fig else ""
                    errors = f", {fig['errors']} errors ({fig.get('first_error')})" if fig["errors"] else ""
                    print(f"  round {round_no + 1} {cell.name} {side.name}: {fig['tok_s']:.1f} tokens/s{ttft}{errors}",
                          flush=True)
        return {"dtype": dtype, "suite": args.suite, "model": str(model_dir), "kv_gib": args.kv_gib,
                "workloads": summarize(cells, sides, rounds, outputs)}
    finally:
        for server in servers.values():
            server.stop()


def summarize(cells: list, sides: dict, rounds: dict, outputs: dict) -> dict:
    """Per cell: each side's median figures, the median per-round tokens/s ratio, identical outputs."""
    return {cell.name: summary_row({n: rounds[(cell.name, n)] for n in sides},
                                   {n: outputs[(cell.name, n)] for n in sides}) for cell in cells}
