"""What the engine benchmarks share: the model from config, tasks in a store, engines kept warm across
rounds, one closed-loop run, interleaved rounds and medians."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Rate:
    """Tokens per wall-clock second and per CPU second of this process (all its threads). On shared
    cores the CPU-time figure is the steadier one: waiting for a core does not count."""

    wall: float
    cpu: float
    ttft_s: float = 0.0  # median time to first token of the run's requests


class Stopwatch:
    """Wall and process CPU time since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rate(self, tokens: int, ttft_s: float = 0.0) -> Rate:
        """Tokens per second since construction, both clocks."""
        return Rate(tokens / (time.perf_counter() - self.wall), tokens / (time.process_time() - self.cpu), ttft_s)


def add_model_args(p: argparse.ArgumentParser, *, hidden: int = 768, layers: int = 12, heads: int = 12) -> None:
    """Flags of the model, device and engine."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    p.add_argument("--family", default="llama", choices=["llama", "gpt2", "t5", "bart"])
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--eager", action="store_true", help="the slot engine without torch.compile")


def prepare_model(args: argparse.Namespace):
    """Inference only, --threads applied, then the model."""
    torch.set_grad_enabled(False)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return build_model(args)


def build_model(args: argparse.Namespace):
    """A model from config (random weights) and the demo tokenizer, frozen: server/demo.py's config of
    --family at these sizes, with 4x-wide feed-forward layers, full key/value heads, and 2048 positions (1024
    for BART)."""
    import transformers as tf

    from server.demo import demo_corpus, model_config, train_tokenizer
    from server.engine.model_loader import describe, resolve_device, resolve_dtype

    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    h, n, heads = args.hidden, args.layers, args.heads
    config = model_config(args.family, tokenizer, hidden_size=h, num_layers=n, num_heads=heads,
                          max_positions=1024 if args.family == "bart" else 2048)
    if args.family == "llama":
        config.intermediate_size, config.num_key_value_heads = 4 * h, heads
    elif args.family == "t5":
        config.d_ff = 4 * h
    elif args.family == "bart":
        config.encoder_ffn_dim = config.decoder_ffn_dim = 4 * h
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    auto = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    model = auto.from_config(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # every run makes exactly the tokens asked for
    model.generation_config.forced_eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return describe(model, tokenizer, name=f"{args.family}-{h}x{n}")


def make_store(loaded, num_tasks: int, num_virtual: int):
    """A PromptStore in a temporary folder with `num_tasks` random prompts; returns (store, task ids)."""
    from prompt_store.store import PromptStore

    store = PromptStore(tempfile.mkdtemp(prefix="bench-store-"), token_dim=loaded.hidden_size,
                        device=loaded.device, dtype=loaded.dtype)
    tasks = [f"task{i:02d}" for i in range(num_tasks)]
    gen = torch.Generator().manual_seed(1)
    for task in tasks:
        store.put(task, torch.randn(num_virtual, loaded.hidden_size, generator=gen), task_type=loaded.task_type)
    return store, tasks


def make_engine(loaded, store, args: argparse.Namespace, *, legacy: bool = False, **config):
    """A started engine; the slot engine is compiled (and warmed up) unless --eager."""
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine

    engine = Engine(loaded, store, EngineConfig(use_paged=not legacy, compile=not args.eager, **config))
    seconds = engine.warm_up()
    if seconds > 1:
        print(f"  warm-up (compile) {seconds:.0f} s", flush=True)
    engine.start()
    return engine


async def _submit_all(engine, texts: list[str], tasks: list[str | None], new_tokens: int) -> tuple[int, float]:
    from server.engine.types import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    streams = await asyncio.gather(*(engine.submit(text, task_id=task, params=params)
                                     for text, task in zip(texts, tasks)))
    results = [await s.result() for s in streams]
    ttft = statistics.median(r.timings.first_token_s for r in results)
    return sum(r.generated_tokens for r in results), ttft


def run_closed(engine, texts: list[str], tasks: list[str | None], new_tokens: int) -> Rate:
    """All requests at once; tokens/s from the first submit to the last result; median TTFT."""
    watch = Stopwatch()
    tokens, ttft = asyncio.run(_submit_all(engine, texts, tasks, new_tokens))
    return watch.rate(tokens, ttft)


def interleaved_rounds(runs: dict[str, Callable[[], Rate]], repeats: int) -> list[dict[str, Rate]]:
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


def median_ratio(rounds: list[dict[str, Rate]], a: str, b: str, clock: str = "wall") -> tuple[float, list[float]]:
    """Median over rounds of a's figure over b's (per-round ratios too)."""
    ratios = [getattr(r[a], clock) / getattr(r[b], clock) for r in rounds]
    return statistics.median(ratios), ratios


@dataclass
class Texts:
    """Benchmark inputs from the demo corpus."""

    lines: list[str] = field(default_factory=list)

    @classmethod
    def load(cls) -> Texts:
        from server.demo import demo_corpus

        return cls([line for line in demo_corpus().splitlines() if line.strip()])

    def take(self, count: int, start: int = 0) -> list[str]:
        """`count` lines, cycling."""
        return [self.lines[(start + i) % len(self.lines)] for i in range(count)]
