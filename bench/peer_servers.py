"""The two servers of bench_peer.py: the shared model folder and tasks, the processes, and one client per side.

promptserve takes text and a task id on /generate; vLLM takes `prompt_embeds` = cat(task prompt, E(ids)) built
here from the same tokenizer call promptserve makes (`tokenizer(text)["input_ids"]`, BOS included).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from servers import ServerProcess, free_port, group_cpu_seconds, promptserve_command

HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_POSITIONS = 512, 8, 8, 1376, 2048
INIT_STD = 0.2  # wide enough that greedy choices are not ties (as tests/engine/conftest.py)


@dataclass
class Request:
    """One request, ready for both sides: the text, its ids and the task."""

    task_id: str
    text: str
    ids: list[int]
    max_new: int


@dataclass
class Reply:
    """What one request gave back: token ids and, when streamed, one arrival time per token."""

    ids: list[int]
    sent: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None


def build_model_dir(path: Path, max_positions: int = MAX_POSITIONS) -> Path:
    """An 8-layer, hidden 512 Llama with the demo tokenizer, saved with save_pretrained (once). RoPE has no
    position table: `max_positions` only sets the limit the config declares (long-context suites)."""
    import transformers as tf

    from server.demo import demo_corpus, model_config, train_tokenizer

    if (path / "config.json").exists():
        return path
    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    config = model_config("llama", tokenizer, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                          max_positions=max_positions)
    config.intermediate_size, config.num_key_value_heads, config.initializer_range = INTERMEDIATE, HEADS, INIT_STD
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tasks(store: Path, prefix: str, num_tasks: int, num_virtual: int, seed: int,
                hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    """PEFT prompt-tuning adapter folders `{prefix}{i}` of N(0, 1) rows; returns task -> [num_virtual, hidden]."""
    from prompt_store.peft_format import CONFIG_NAME, SAFETENSORS_NAME, build_config, build_weights, version_of

    gen, prompts = torch.Generator().manual_seed(seed), {}
    for i in range(num_tasks):
        task_id, rows = f"{prefix}{i:02d}", torch.randn(num_virtual, hidden, generator=gen)  # [n, D]
        folder = store / task_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_bytes(build_config("CAUSAL_LM", num_virtual, hidden, None))
        (folder / SAFETENSORS_NAME).write_bytes(build_weights(rows, version_of(rows), time.time()))
        prompts[task_id] = rows
    return prompts


def hidden_size(model_dir: Path) -> int:
    """The hidden size a model folder's config declares (its tasks' rows must match it)."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("hidden_size") or config["n_embd"])


def input_embeddings(model_dir: Path) -> torch.Tensor:
    """The model's input embedding matrix [vocab, HIDDEN], float32, read from its safetensors file."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight").to(torch.float32)


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (every core, from /proc/stat)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0]  # cpu user nice system idle iowait irq softirq steal
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first.split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_shares(servers: list[ServerProcess], seconds: float) -> tuple[list[float], float]:
    """Cores each server's process group, and the whole machine, kept busy over the next `seconds`."""
    before, machine = [group_cpu_seconds(s.proc.pid) for s in servers], machine_cpu_seconds()
    time.sleep(seconds)
    after = [group_cpu_seconds(s.proc.pid) for s in servers]
    return [(b - a) / seconds for a, b in zip(before, after)], (machine_cpu_seconds() - machine) / seconds


def start_promptserve(model_dir: Path, store: Path, dtype: str, device: str, extra: str, log: Path,
                      tcmalloc: str | None = None) -> ServerProcess:
    """`promptserve serve` on a free port (same interpreter as this script), preloading `tcmalloc` when
    given (as vLLM's side does; without it the server still takes the system's, if any)."""
    port = free_port()
    cmd = promptserve_command("--model", str(model_dir), "--store", str(store), "--port", str(port), "--dtype",
                              dtype, "--device", device, "--log-level", "warning", *shlex.split(extra))
    env = {**os.environ, **({"PROMPTSERVE_TCMALLOC": tcmalloc} if tcmalloc else {})}
    return ServerProcess("promptserve", cmd, log, port, env=env)


def vllm_env(python: str, tcmalloc: str | None, device: str, kv_gib: int | None = None) -> dict[str, str]:
    """Environment of vLLM's CPU build (ENVIRONMENT.md): tcmalloc + libiomp5 preloaded, both cores bound;
    `kv_gib`: its KV cache (VLLM_CPU_KVCACHE_SPACE, whole GiB; default 2)."""
    space = str(kv_gib) if kv_gib else os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=space)
    if device != "cpu":
        return env
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"  # the venv's lib/, not the resolved interpreter's
    preload = [p for p in (tcmalloc, str(iomp) if iomp.exists() else None) if p]
    env["LD_PRELOAD"] = ":".join(preload + [p for p in [os.environ.get("LD_PRELOAD")] if p])
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 2) - 1}")
    return env


def start_vllm(python: str, tcmalloc: str | None, model_dir: Path, dtype: str, device: str, extra: str,
               log: Path, max_len: int = MAX_POSITIONS, kv_gib: int | None = None) -> ServerProcess:
    """vLLM's OpenAI server with prompt embeddings and prefix caching on a free port."""
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name",
           "peer", "--port", str(port), "--host", "127.0.0.1", "--enable-prompt-embeds", "--enable-prefix-caching",
           "--block-size", "32", "--dtype", dtype, "--max-model-len", str(max_len), *shlex.split(extra)]
    return ServerProcess("vllm", cmd, log, port, ready="/health", env=vllm_env(python, tcmalloc, device, kv_gib))


async def sse_events(client: httpx.AsyncClient, url: str, body: dict, reply: Reply) -> AsyncIterator[dict]:
    """The JSON of each `data:` event of a streamed POST (until `[DONE]`); a non-200 answer or a broken
    connection sets reply.error (counted as a failed request, not a crash of the benchmark)."""
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                reply.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                payload = line[5:].strip() if line.startswith("data:") else ""
                if payload and payload != "[DONE]":
                    yield json.loads(payload)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:  # seen from vLLM under load: a cut-off event
        reply.error = f"{type(exc).__name__}: {exc}"[:200]


class PromptserveSide:
    """Client of promptserve's TGI routes: /generate (ids from details.tokens) and /generate_stream (SSE)."""

    name = "promptserve"

    def __init__(self, url: str) -> None:
        self.url = url

    def body(self, req: Request) -> dict:
        """The TGI request body of `req` (greedy, exactly max_new tokens, with details)."""
        params = {"max_new_tokens": req.max_new, "ignore_eos_token": True, "details": True}
        return {"task_id": req.task_id, "inputs": req.text, "parameters": params}

    async def generate(self, client: httpx.AsyncClient, req: Request) -> Reply:
        """One whole completion."""
        sent = time.perf_counter()
        r = await client.post(f"{self.url}/generate", json=self.body(req))
        if r.status_code != 200:
            return Reply([], sent, error=f"HTTP {r.status_code}: {r.text[:200]}")
        details = r.json()["details"]
        if details["prompt_tokens"] != len(req.ids):
            return Reply([], sent, error=f"prompt_tokens {details['prompt_tokens']} != {len(req.ids)} (tokenizer)")
        return Reply([t["id"] for t in details["tokens"]], sent)

    async def stream(self, client: httpx.AsyncClient, req: Request) -> Reply:
        """One streamed completion: an arrival time per token event."""
        reply = Reply([], time.perf_counter())
        async for event in sse_events(client, f"{self.url}/generate_stream", self.body(req), reply):
            if "error" in event:
                reply.error = str(event["error"])[:200]
                break
            reply.ids.append(event["token"]["id"])
            reply.token_times.append(time.perf_counter())
        return reply


class VllmSide:
    """Client of vLLM's /v1/completions with prompt_embeds = cat(task prompt, E(ids)) (payloads cached)."""

    name = "vllm"

    def __init__(self, url: str, prompts: dict[str, torch.Tensor], embeddings: torch.Tensor) -> None:
        self.url, self.prompts, self.embeddings = url, prompts, embeddings
        self._payloads: dict[int, str] = {}

    def payload(self, req: Request) -> str:
        """base64 of torch.save([num_virtual + len(ids), HIDDEN] float32), built once per request."""
        if id(req) not in self._payloads:
            embeds = torch.cat([self.prompts[req.task_id], self.embeddings[req.ids]]).contiguous()
            buf = io.BytesIO()
            torch.save(embeds, buf)
            self._payloads[id(req)] = base64.b64encode(buf.getvalue()).decode()
        return self._payloads[id(req)]

    def _body(self, req: Request, stream: bool) -> dict:
        return {"model": "peer", "prompt_embeds": self.payload(req), "max_tokens": req.max_new, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "stream": stream}

    async def generate(self, client: httpx.AsyncClient, req: Request) -> Reply:
        """One whole completion."""
        sent = time.perf_counter()
        r = await client.post(f"{self.url}/v1/completions", json=self._body(req, False))
        if r.status_code != 200:
            return Reply([], sent, error=f"HTTP {r.status_code}: {r.text[:200]}")
        return Reply(list(r.json()["choices"][0]["token_ids"]), sent)

    async def stream(self, client: httpx.AsyncClient, req: Request) -> Reply:
        """One streamed completion: tokens of one chunk share its arrival time."""
        reply = Reply([], time.perf_counter())
        async for chunk in sse_events(client, f"{self.url}/v1/completions", self._body(req, True), reply):
            new = ((chunk.get("choices") or [{}])[0].get("token_ids")) or []
            reply.ids.extend(new)
            reply.token_times.extend([time.perf_counter()] * len(new))
        return reply
