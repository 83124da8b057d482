"""Side-by-side benchmark of the engine (issue 3): 16 concurrent greedy requests of 64 new tokens.

  (a) engine, 16 requests of 16 different tasks      (b) engine, 16 requests of one task
  (c) ceiling: HF generate at batch 16 on token inputs as long as text + virtual tokens (no soft prompt)
  (d) today: PeftModel.generate one request at a time, swapping adapters (--d-requests of them per round)

Prints tokens/s and the ratios a/b, a/c, a/d (medians over interleaved rounds).
Run: python bench/bench_engine.py [--device cuda --dtype bf16] [--family bart --layers 6]
(encoder-decoders: --layers per stack; the prompt goes to the encoder, tokens are counted on the decoder)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch


@dataclass
class Setup:
    """Everything the four measurements share."""

    loaded: object  # LoadedModel
    store: object  # PromptStore
    peft: object  # PeftModel with every task loaded as an adapter
    tasks: list[str]
    texts: list[str]
    args: argparse.Namespace


@dataclass
class Rate:
    """Tokens per wall-clock second and per CPU second of this process (all its threads). On shared
    cores the CPU-time figure is the steadier one: waiting for a core does not count."""

    wall: float
    cpu: float


class Stopwatch:
    """Wall and process CPU time since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rate(self, tokens: int) -> Rate:
        """Tokens per second since construction, both clocks."""
        return Rate(tokens / (time.perf_counter() - self.wall), tokens / (time.process_time() - self.cpu))


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    p.add_argument("--family", default="llama", choices=["llama", "gpt2", "t5", "bart"])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="runs of a, b, c (the median is reported)")
    p.add_argument("--skip-d", action="store_true", help="skip the slow one-at-a-time PEFT baseline")
    p.add_argument("--d-requests", type=int, default=4, help="requests timed for (d) in each round")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    return p.parse_args()


def build_model(args: argparse.Namespace):
    """A ~100M-parameter model from config (random weights) and the demo tokenizer, frozen."""
    import transformers as tf

    from server.demo import demo_corpus, train_tokenizer
    from server.engine.model_loader import describe, resolve_device, resolve_dtype

    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if args.family == "llama":
        config = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                max_position_embeddings=1024, **ids)
    elif args.family == "gpt2":
        config = tf.GPT2Config(n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, n_positions=1024, **ids)
    elif args.family == "t5":
        config = tf.T5Config(d_model=args.hidden, d_kv=args.hidden // args.heads, d_ff=4 * args.hidden,
                             num_layers=args.layers, num_heads=args.heads,
                             decoder_start_token_id=tokenizer.pad_token_id, **ids)
    else:
        config = tf.BartConfig(d_model=args.hidden, encoder_layers=args.layers, decoder_layers=args.layers,
                               encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                               encoder_ffn_dim=4 * args.hidden, decoder_ffn_dim=4 * args.hidden,
                               max_position_embeddings=1024, decoder_start_token_id=tokenizer.eos_token_id, **ids)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    auto = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    model = auto.from_config(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # every run makes exactly --new-tokens tokens
    model.generation_config.forced_eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return describe(model, tokenizer, name=f"{args.family}-{args.hidden}x{args.layers}")


def make_setup(args: argparse.Namespace) -> Setup:
    """Model, one adapter per task in a PromptStore folder, and PEFT holding the same adapters."""
    from peft import PeftModel

    from prompt_store.store import PromptStore
    from server.demo import demo_corpus

    loaded = build_model(args)
    root = tempfile.mkdtemp(prefix="bench-store-")
    store = PromptStore(root, token_dim=loaded.hidden_size, device=loaded.device, dtype=loaded.dtype)
    tasks = [f"task{i:02d}" for i in range(args.requests)]
    gen = torch.Generator().manual_seed(1)
    for task in tasks:
        store.put(task, torch.randn(args.virtual_tokens, loaded.hidden_size, generator=gen),
                  task_type=loaded.task_type)
    peft = PeftModel.from_pretrained(loaded.model, f"{root}/{tasks[0]}", adapter_name=tasks[0])
    for task in tasks[1:]:
        peft.load_adapter(f"{root}/{task}", adapter_name=task)
    peft.to(loaded.device).eval()
    lines = [line for line in demo_corpus().splitlines() if line.strip()]
    texts = [lines[i % len(lines)] for i in range(args.requests)]
    return Setup(loaded, store, peft, tasks, texts, args)


async def _engine_run(engine, setup: Setup, tasks: list[str]) -> int:
    from server.engine.types import SamplingParams

    params = SamplingParams(max_new_tokens=setup.args.new_tokens, ignore_eos=True)
    streams = await asyncio.gather(*(engine.submit(text, task_id=task, params=params)
                                     for text, task in zip(setup.texts, tasks)))
    results = [await s.result() for s in streams]
    return sum(r.generated_tokens for r in results)


def run_engine(setup: Setup, tasks: list[str]) -> Rate:
    """Tokens/s of one engine run over all requests (submit of the first to result of the last)."""
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine

    engine = Engine(setup.loaded, setup.store, EngineConfig(max_batch_size=setup.args.requests))
    engine.start()
    try:
        watch = Stopwatch()
        return watch.rate(asyncio.run(_engine_run(engine, setup, tasks)))
    finally:
        engine.stop(grace_s=1)


def run_hf_batch(setup: Setup) -> Rate:
    """Ceiling: base-model generate at full batch on ids as long as virtual + text tokens, padded (left for
    a causal LM; right for an encoder, where absolute positions then stay right)."""
    tok = setup.loaded.tokenizer
    filler = tok("a")["input_ids"][-1]
    rows = [[filler] * setup.args.virtual_tokens + tok(t)["input_ids"] for t in setup.texts]
    width = max(len(r) for r in rows)
    pads = [[0] * (width - len(r)) for r in rows]
    if setup.loaded.is_encoder_decoder:
        ids = [r + [tok.pad_token_id] * len(p) for r, p in zip(rows, pads)]
        mask = [[1] * len(r) + p for r, p in zip(rows, pads)]
    else:
        ids = [[tok.pad_token_id] * len(p) + r for r, p in zip(rows, pads)]
        mask = [p + [1] * len(r) for r, p in zip(rows, pads)]
    device = setup.loaded.device
    watch = Stopwatch()
    with torch.inference_mode():
        out = setup.loaded.model.generate(input_ids=torch.tensor(ids, device=device),
                                          attention_mask=torch.tensor(mask, device=device), do_sample=False,
                                          max_new_tokens=setup.args.new_tokens, min_new_tokens=setup.args.new_tokens)
    return watch.rate(_new_tokens(setup, out, width))


def _new_tokens(setup: Setup, out: torch.Tensor, input_width: int) -> int:
    """Generated tokens in a generate() output: after the inputs (causal) or the decoder start token."""
    return (out.shape[1] - (1 if setup.loaded.is_encoder_decoder else input_width)) * out.shape[0]


def run_peft_sequential(setup: Setup, num_requests: int) -> Rate:
    """Today: PeftModel.generate one request at a time, switching the active adapter each time.
    Its tokens/s does not depend on how many requests are timed, so a round times only a few."""
    tok, tokens = setup.loaded.tokenizer, 0
    watch = Stopwatch()
    with torch.inference_mode():
        for text, task in list(zip(setup.texts, setup.tasks))[:num_requests]:
            setup.peft.set_adapter(task)
            ids = tok(text, return_tensors="pt")["input_ids"].to(setup.loaded.device)
            out = setup.peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=setup.args.new_tokens, min_new_tokens=setup.args.new_tokens)
            tokens += _new_tokens(setup, out, ids.shape[1])
    return watch.rate(tokens)


def interleaved_rounds(runs: dict, repeats: int) -> list[dict[str, Rate]]:
    """Rounds of every measurement, the order rotated each round: load from other processes (shared
    cores) then hits all of them alike, and ratios are taken within a round."""
    rounds = []
    keys = list(runs)
    for round_no in range(repeats):
        figures = {}
        for key in keys[round_no % len(keys):] + keys[:round_no % len(keys)]:
            figures[key] = runs[key]()
            print(f"  round {round_no + 1} ({key}): {figures[key].wall:.1f} tokens/s, "
                  f"{figures[key].cpu:.1f} tokens/CPU-s", flush=True)
        rounds.append(figures)
    return rounds


def report(rounds: list[dict[str, Rate]], num_requests: int) -> None:
    """Median tokens/s of each measurement and the median of the per-round ratios, both clocks."""
    labels = {"a": f"engine, {num_requests} tasks", "b": "engine, 1 task", "c": "HF generate batch (ceiling)",
              "d": "PEFT generate one at a time"}
    for key in rounds[0]:
        wall = statistics.median(r[key].wall for r in rounds)
        cpu = statistics.median(r[key].cpu for r in rounds)
        print(f"({key}) {labels[key]:<30} {wall:8.1f} tokens/s  {cpu:8.1f} tokens/CPU-s  (medians)")
    for other in ("b", "c", "d"):
        if other not in rounds[0]:
            continue
        for clock in ("wall", "cpu"):
            ratios = [getattr(r["a"], clock) / getattr(r[other], clock) for r in rounds]
            print(f"a/{other} ({clock:>4}) = {statistics.median(ratios):.2f}  (per round: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)})")


def main() -> None:
    """Build, warm up, measure a, b, c, d in interleaved rounds, print figures and ratios."""
    args = parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = make_setup(args)
    params = sum(p.numel() for p in setup.loaded.model.parameters())
    device_name = torch.cuda.get_device_name() if setup.loaded.device.type == "cuda" else "cpu"
    print(f"model {setup.loaded.name}: {params / 1e6:.0f}M params, {setup.loaded.dtype}, device {device_name}, "
          f"{torch.get_num_threads()} threads; {args.requests} requests x {args.new_tokens} new tokens, "
          f"{args.virtual_tokens} virtual tokens")
    one_task = [setup.tasks[0]] * args.requests
    run_engine(setup, setup.tasks)  # warm-up (allocator, first-call paths)
    runs = {"a": lambda: run_engine(setup, setup.tasks), "b": lambda: run_engine(setup, one_task),
            "c": lambda: run_hf_batch(setup)}
    if not args.skip_d:
        runs["d"] = lambda: run_peft_sequential(setup, args.d_requests)
    report(interleaved_rounds(runs, args.repeats), args.requests)


if __name__ == "__main__":
    main()
