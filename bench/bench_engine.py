"""Side-by-side benchmark of the engine, in process (no HTTP). Two workloads:

--workload abcd (default): 16 concurrent greedy requests of --new-tokens new tokens
  (a) engine, 16 requests of 16 different tasks      (b) engine, 16 requests of one task
  (c) ceiling of old: HF generate at batch 16 on token inputs as long as text + virtual tokens
  (d) PeftModel.generate one request at a time, swapping adapters (--d-requests of them per round)
  (l) the legacy engine (the engine before v2: transformers cache, no compile), 16 tasks
  Prints tokens/s and the ratios a/b, a/c, a/d, a/l (medians over interleaved rounds).

--workload free ("soft prompts are free"): 16 concurrent requests of 16 tasks with 100 virtual tokens
  and 16-token inputs, against (e) the same inputs on the bare model, for 16 and 64 new tokens.
  Prints tokens/s a/e and time-to-first-token a/e. The engines stay up across rounds, as a server's
  does, so each task's virtual-token KV is computed once (in the warm-up round) and reused.

Run: python bench/bench_engine.py [--workload free] [--device cuda --dtype bf16] [--family bart --layers 6]
(encoder-decoders: --layers per stack; the prompt goes to the encoder, tokens are counted on the decoder)
"""

from __future__ import annotations

from server.preloads import reexec_with_preloads

reexec_with_preloads()  # before torch loads, as `promptserve serve` does (server/preloads.py)

import argparse
import statistics

import torch
from bench_common import (
    Rate,
    Stopwatch,
    Texts,
    add_model_args,
    interleaved_rounds,
    make_engine,
    make_store,
    median_ratio,
    prepare_model,
    run_closed,
)


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--workload", default="abcd", choices=["abcd", "free"])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64, help="abcd only (free runs 16 and 64)")
    p.add_argument("--virtual-tokens", type=int, default=None, help="default: 20 (abcd), 100 (free)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (the median is reported)")
    p.add_argument("--skip-d", action="store_true", help="skip the slow one-at-a-time PEFT baseline")
    p.add_argument("--skip-legacy", action="store_true", help="skip (l), the legacy engine")
    p.add_argument("--d-requests", type=int, default=4, help="requests timed for (d) in each round")
    return p.parse_args()


def run_hf_batch(loaded, texts: list[str], num_virtual: int, new_tokens: int) -> Rate:
    """Base-model generate at full batch on ids as long as virtual + text tokens, padded (left for a
    causal LM; right for an encoder, where absolute positions then stay right)."""
    tok = loaded.tokenizer
    filler = tok("a")["input_ids"][-1]
    rows = [[filler] * num_virtual + tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pads = [[0] * (width - len(r)) for r in rows]
    if loaded.is_encoder_decoder:
        ids = [r + [tok.pad_token_id] * len(p) for r, p in zip(rows, pads)]
        mask = [[1] * len(r) + p for r, p in zip(rows, pads)]
    else:
        ids = [[tok.pad_token_id] * len(p) + r for r, p in zip(rows, pads)]
        mask = [p + [1] * len(r) for r, p in zip(rows, pads)]
    watch = Stopwatch()
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=torch.tensor(ids, device=loaded.device),
                                    attention_mask=torch.tensor(mask, device=loaded.device), do_sample=False,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return watch.rate(_new_tokens(loaded, out, width))


def _new_tokens(loaded, out: torch.Tensor, input_width: int) -> int:
    """Generated tokens in a generate() output: after the inputs (causal) or the decoder start token."""
    return (out.shape[1] - (1 if loaded.is_encoder_decoder else input_width)) * out.shape[0]


def run_peft_sequential(loaded, peft, texts: list[str], tasks: list[str], new_tokens: int) -> Rate:
    """PeftModel.generate one request at a time, switching the active adapter each time."""
    tok, tokens = loaded.tokenizer, 0
    watch = Stopwatch()
    with torch.inference_mode():
        for text, task in zip(texts, tasks):
            peft.set_adapter(task)
            ids = tok(text, return_tensors="pt")["input_ids"].to(loaded.device)
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            tokens += _new_tokens(loaded, out, ids.shape[1])
    return watch.rate(tokens)


def load_peft(loaded, store, tasks: list[str]):
    """PEFT holding every task as an adapter (read from the store's folders)."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(loaded.model, f"{store.root}/{tasks[0]}", adapter_name=tasks[0])
    for task in tasks[1:]:
        peft.load_adapter(f"{store.root}/{task}", adapter_name=task)
    return peft.to(loaded.device).eval()


def workload_abcd(args: argparse.Namespace, loaded) -> None:
    """a, b, c, d and l in interleaved rounds."""
    num_virtual = args.virtual_tokens or 20
    store, tasks = make_store(loaded, args.requests, num_virtual)
    texts, new = Texts.load().take(args.requests), args.new_tokens
    engine = make_engine(loaded, store, args, max_batch_size=args.requests)
    runs = {"a": lambda: run_closed(engine, texts, tasks, new),
            "b": lambda: run_closed(engine, texts, [tasks[0]] * len(texts), new),
            "c": lambda: run_hf_batch(loaded, texts, num_virtual, new)}
    if not args.skip_legacy and not loaded.is_encoder_decoder:
        legacy = make_engine(loaded, store, args, legacy=True, max_batch_size=args.requests)
        runs["l"] = lambda: run_closed(legacy, texts, tasks, new)
    if not args.skip_d:
        peft = load_peft(loaded, store, tasks)
        runs["d"] = lambda: run_peft_sequential(loaded, peft, texts[:args.d_requests], tasks, new)
    runs["a"]()  # warm-up: allocator, first-call paths, the tasks' virtual-token KV
    rounds = interleaved_rounds(runs, args.repeats)
    labels = {"a": f"engine, {args.requests} tasks", "b": "engine, 1 task", "c": "HF generate batch",
              "d": "PEFT generate one at a time", "l": "legacy engine, same as (a)"}
    for key in rounds[0]:
        wall, cpu = (statistics.median(getattr(r[key], c) for r in rounds) for c in ("wall", "cpu"))
        print(f"({key}) {labels[key]:<30} {wall:8.1f} tokens/s  {cpu:8.1f} tokens/CPU-s  (medians)")
    for other in [k for k in ("b", "c", "d", "l") if k in rounds[0]]:
        for clock in ("wall", "cpu"):
            ratio, ratios = median_ratio(rounds, "a", other, clock)
            print(f"a/{other} ({clock:>4}) = {ratio:.2f}  (per round: {', '.join(f'{x:.2f}' for x in ratios)})")


def workload_free(args: argparse.Namespace, loaded) -> None:
    """Soft prompts are free: 16 tasks x 100 virtual tokens against the bare model, same inputs."""
    num_virtual = args.virtual_tokens or 100
    store, tasks = make_store(loaded, args.requests, num_virtual)
    corpus = loaded.tokenizer(" ".join(Texts.load().lines))["input_ids"]
    inputs = [corpus[16 * i:16 * (i + 1)] for i in range(args.requests)]  # exactly 16 tokens each
    engine = make_engine(loaded, store, args, max_batch_size=args.requests)
    for new in (16, 64):
        runs = {"a": lambda: run_closed(engine, inputs, tasks, new),
                "e": lambda: run_closed(engine, inputs, [None] * len(inputs), new)}
        runs["a"](), runs["e"]()  # warm-up round: the tasks' virtual-token KV is computed here, once
        rounds = interleaved_rounds(runs, args.repeats)
        tps, tps_rounds = median_ratio(rounds, "a", "e")
        ttft, ttft_rounds = median_ratio(rounds, "a", "e", "ttft_s")
        for key, label in (("a", f"{args.requests} tasks x {num_virtual} virtual"), ("e", "bare model")):
            print(f"  new={new} ({key}) {label:<26} {statistics.median(r[key].wall for r in rounds):8.1f} tokens/s"
                  f"  TTFT {1000 * statistics.median(r[key].ttft_s for r in rounds):7.1f} ms")
        print(f"new={new}: tokens/s a/e = {tps:.3f} (per round {', '.join(f'{x:.2f}' for x in tps_rounds)}); "
              f"TTFT a/e = {ttft:.2f} (per round {', '.join(f'{x:.2f}' for x in ttft_rounds)})")


def main() -> None:
    """Build, warm up, measure in interleaved rounds, print figures and ratios."""
    args = parse_args()
    loaded = prepare_model(args)
    params = sum(p.numel() for p in loaded.model.parameters())
    device_name = torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu"
    print(f"model {loaded.name}: {params / 1e6:.0f}M params, {loaded.dtype}, device {device_name}, "
          f"{torch.get_num_threads()} threads, {'eager' if args.eager else 'compiled'} step; "
          f"workload {args.workload}, {args.requests} requests")
    (workload_free if args.workload == "free" else workload_abcd)(args, loaded)


if __name__ == "__main__":
    main()
