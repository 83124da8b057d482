"""Training benchmarks (issue 13), on bench_engine's model (a 768x12 Llama from config, ~85M parameters).

  speed    our PromptTrainer against PEFT's own loop (get_peft_model + the same AdamW) on the same batches,
           each on its own copy of the model, --rounds rounds alternated: training tokens/s (input tokens,
           virtual ones included) and the ratio ours / PEFT's (target >= 0.9)
  serving  a steady inference load (--streams closed-loop requests at a time, --new-tokens each) on the
           engine, with and without a training job running between its steps (the server's TrainingRunner):
           inter-token p50/p99; the ratio of p99s (target <= 1.5)

Run: python bench/bench_training.py [--rounds 3] [--steps 8] [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import add_model_args, build_model, make_engine, make_store

from prompt_store.init import random_init
from server.training.examples import encode
from server.training.prompt_trainer import Hyperparameters, PromptTrainer, epoch_order, right_padded

TEXT = "The river runs past the old mill and the bridge"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="training steps per measured run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--serving-seconds", type=float, default=20.0)
    p.add_argument("--share-under-load", type=float, default=None, help="the runner's (default: the server's)")
    p.add_argument("--skip-speed", action="store_true")
    return p.parse_args()


def examples(tokenizer, num: int):
    words = TEXT.split()
    return [encode(" ".join(words[i % 5:i % 5 + 4 + i % 4]), f" answer {i % 7}", tokenizer, is_encoder_decoder=False)
            for i in range(num)]


def batches(data, batch_size: int, steps: int):
    order = epoch_order(len(data), 0, seed=0)
    return [[data[order[(s * batch_size + j) % len(data)]] for j in range(batch_size)] for s in range(steps)]


def tokens_in(batch_list, num_virtual: int) -> int:
    return sum(len(e.input_ids) + num_virtual for batch in batch_list for e in batch)


def ours(model, init, hyper, batch_list, pad) -> float:
    trainer = PromptTrainer(model, init, hyper, pad_token_id=pad)
    trainer.step(batch_list[0])  # warm-up
    start = time.perf_counter()
    for batch in batch_list:
        trainer.step(batch)
    return time.perf_counter() - start


def peft_setup(model, num_virtual: int):
    """PEFT's prompt-tuning model around `model` (once: PEFT wraps it in place)."""
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual))
    peft_model.eval()
    return peft_model


def peft_loop(peft_model, init, hyper, batch_list, pad) -> float:
    weight = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(init)
    optimizer = torch.optim.AdamW([weight], lr=hyper.learning_rate, weight_decay=hyper.weight_decay)

    def step(batch):
        ids, mask = right_padded([e.input_ids for e in batch], pad, "cpu")
        labels, _ = right_padded([e.labels for e in batch], -100, "cpu")
        optimizer.zero_grad()
        peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()

    step(batch_list[0])  # warm-up
    start = time.perf_counter()
    for batch in batch_list:
        step(batch)
    return time.perf_counter() - start


def speed(args, loaded) -> None:
    data = examples(loaded.tokenizer, 64)
    batch_list = batches(data, args.batch_size, args.steps)
    num_tokens = tokens_in(batch_list, args.virtual_tokens)
    hyper = Hyperparameters(batch_size=args.batch_size)
    init = random_init(args.virtual_tokens, loaded.hidden_size, seed=0)
    pad = loaded.tokenizer.pad_token_id
    mine, theirs = copy.deepcopy(loaded.model), peft_setup(copy.deepcopy(loaded.model), args.virtual_tokens)
    ratios = []
    for r in range(args.rounds):
        with torch.enable_grad():
            t_ours = ours(mine, init, hyper, batch_list, pad)
            t_peft = peft_loop(theirs, init, hyper, batch_list, pad)
        ratios.append(t_peft / t_ours)
        print(f"  round {r + 1}: ours {num_tokens / t_ours:.0f} training tokens/s, PEFT {num_tokens / t_peft:.0f}"
              f" -> {t_peft / t_ours:.2f}", flush=True)
    print(f"training speed, ours / PEFT's loop: {statistics.median(ratios):.2f} (median of {args.rounds} rounds; "
          f"{args.steps} steps of {args.batch_size} examples, {args.virtual_tokens} virtual tokens)", flush=True)


async def steady_load(engine, task: str, seconds: float, streams: int, new_tokens: int) -> list[float]:
    """Closed loop: `streams` requests at a time for `seconds`; every inter-token gap (s)."""
    from server.engine.types import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    gaps: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one_stream():
        while time.perf_counter() < deadline:
            stream = await engine.submit(TEXT, task_id=task, params=params)
            last = None
            async for _ in stream:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

    await asyncio.gather(*(one_stream() for _ in range(streams)))
    return gaps


def serving(args, loaded) -> None:
    from server.training.examples import longest, read_jsonl
    from server.training.job_prep import ModelFacts
    from server.training.runner import TrainingRunner
    from server.training.state import TrainingState, new_job

    store, tasks = make_store(loaded, 1, args.virtual_tokens)
    engine = make_engine(loaded, store, args)
    state = TrainingState(Path(tempfile.mkdtemp(prefix="bench-training-")))
    share = {} if args.share_under_load is None else {"share_under_load": args.share_under_load}
    facts = ModelFacts(loaded.model, loaded.tokenizer, loaded.task_type, loaded.max_positions)
    runner = TrainingRunner(state, facts=facts, store=store, engine=engine, **share)
    engine.set_side_work(runner)
    runner.take_ownership()  # the only server on its folder (the server's JobWatcher does this)
    lines = "\n".join(json.dumps({"prompt": " ".join(TEXT.split()[i % 5:i % 5 + 5]), "completion": f" answer {i}"})
                      for i in range(64)).encode()
    counts = longest(read_jsonl(lines, loaded.tokenizer, is_encoder_decoder=False))  # as the upload route counts
    file_id = state.add_file(lines, filename="train.jsonl", purpose="fine-tune", tenant="bench", counts=counts,
                             ttl_s=86400)["id"]
    p99s = {"without": [], "with": []}
    p50s = {"without": [], "with": []}
    try:
        for r in range(args.rounds):
            for name in ("without", "with"):
                job = None
                if name == "with":
                    job = new_job(model="bench", task_id="trained", training_file=file_id, validation_file=None,
                                  hyperparameters={"n_epochs": 100, "batch_size": args.batch_size,
                                                   "learning_rate": 0.03},
                                  prompt_tuning={"num_virtual_tokens": args.virtual_tokens, "init": "random",
                                                 "init_text": None}, seed=0, tenant="bench")
                    state.save_job(job)
                    runner.submit(job["id"])
                gaps = asyncio.run(steady_load(engine, tasks[0], args.serving_seconds, args.streams, args.new_tokens))
                if job is not None:
                    active = runner._active  # the examples done since the last update count too
                    steps = (runner.live_view(job["id"]) or state.job(job["id"]))["progress"]["step"]
                    examples_done = steps * args.batch_size + (active.num_done_in_batch if active else 0)
                    runner.cancel(job["id"])
                    while runner.has_work():
                        time.sleep(0.05)
                    print(f"    (training did {examples_done} examples, {steps} steps, meanwhile)", flush=True)
                q = statistics.quantiles(gaps, n=100)
                p50s[name].append(q[49] * 1000)
                p99s[name].append(q[98] * 1000)
                print(f"  round {r + 1}, {name} training: inter-token p50 {q[49] * 1000:.1f} ms, "
                      f"p99 {q[98] * 1000:.1f} ms", flush=True)
    finally:
        engine.stop()
    without, with_ = statistics.median(p99s["without"]), statistics.median(p99s["with"])
    print(f"serving while training: inter-token p99 {with_:.1f} ms against {without:.1f} ms without -> "
          f"{with_ / without:.2f} (p50 {statistics.median(p50s['with']):.1f} against "
          f"{statistics.median(p50s['without']):.1f} ms)", flush=True)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = build_model(args)
    print(f"model {args.family}-{args.hidden}x{args.layers}: "
          f"{sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f}M parameters", flush=True)
    if not args.skip_speed:
        speed(args, loaded)
    serving(args, loaded)


if __name__ == "__main__":
    main()
