"""The start-up probe: a causal model is served on the engine's own KV path only if that path gives the
logits of the model's stock attention, on requests that look like serving.

The reference is computed by the attention implementation the model was loaded with (transformers' `sdpa`,
or the modelling file's own `eager` matmul and softmax), switched back for it when the glue is installed
already: the probe never compares the engine's attention with itself. The requests are teacher-forced
(their next tokens are fixed, not sampled), so every logit is comparable: three requests of different
lengths, two with a soft prompt, prefilled in chunks of four next to each other's decodes (from position 8
on in the split form long prompts take), one in a run of blocks and two in interleaved ones, then decoded
three steps. A missing or misplaced position moves logits by far more than the tolerances below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch

from server.engine.paged import prefill_attention, step_plan
from server.engine.paged.attention import stock_attention
from server.engine.paged.step_plan import Chunk

log = logging.getLogger(__name__)

# Largest relative logit error accepted (against the largest reference logit). float32 and float64: a few
# roundings (measured: about 1e-6 and 1e-15). Half precision: the rounding of the model's own dtype.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
CHUNK_TOKENS = 4
NUM_DECODE_STEPS = 3
_REQUESTS = (  # (virtual tokens, prompt tokens): different lengths
    (3, 9),
    (0, 14),
    (5, 2),
)
BLOCK_TOKENS = 4  # small blocks: every request spans several
# Chunks of 4 from position 8 on attend in pieces (prefill_attention's split, which long prompts take),
# earlier ones in one masked call.
SPLIT_PAIRS = 2 * BLOCK_TOKENS * CHUNK_TOKENS


@dataclass
class ProbeRequest:
    """A stand-in for a Sequence: what the step builder reads."""

    request_id: str
    prompt: Any  # None, or an object with `.embeddings [n, D]`
    num_virtual_tokens: int
    prompt_ids: list[int]
    block_table: list[int]
    future: list[int]  # the tokens it will be fed after its prompt (teacher forcing)
    generated: list[int] = field(default_factory=list)
    shared_prefix: Any = None

    @property
    def num_context_tokens(self) -> int:
        return self.num_virtual_tokens + len(self.prompt_ids) + len(self.generated)


@dataclass
class Probe:
    """The probe's requests and their reference logits, one row per context position."""

    requests: list[ProbeRequest]
    references: list[torch.Tensor]  # per request: [n + L + G, V] float64
    dtype: torch.dtype  # the model's

    @property
    def num_blocks(self) -> int:
        """Blocks of BLOCK_TOKENS the requests' tables name."""
        return 1 + max(max(r.block_table) for r in self.requests)


def prepare(model: Any) -> Probe:
    """Requests and their references, from the attention the model was loaded with (never the glue)."""
    embed = model.get_input_embeddings()
    vocab, hidden = embed.weight.shape
    gen = torch.Generator().manual_seed(0)
    requests = []
    num_blocks = -(-(max(v + p for v, p in _REQUESTS) + NUM_DECODE_STEPS) // BLOCK_TOKENS)  # per request
    for i, (num_virtual, num_prompt) in enumerate(_REQUESTS):
        ids = torch.randint(0, vocab, (num_prompt + NUM_DECODE_STEPS,), generator=gen).tolist()
        prompt = None
        if num_virtual:
            prompt = SimpleNamespace(embeddings=torch.randn(num_virtual, hidden, generator=gen).to(embed.weight))
        # The first request's blocks are one run (read as a view), the others' interleave (gathered).
        table = list(range(num_blocks)) if i == 0 else [num_blocks + (i - 1) + 2 * b for b in range(num_blocks)]
        requests.append(ProbeRequest(f"probe-{i}", prompt, num_virtual, ids[:num_prompt], table, ids[num_prompt:]))
    return Probe(requests, [_reference(model, r) for r in requests], embed.weight.dtype)


def _reference(model: Any, request: ProbeRequest) -> torch.Tensor:
    """PEFT's computation for the request alone: `cat(P, E(ids))`, positions from 0, stock attention."""
    embed = model.get_input_embeddings()
    ids = torch.tensor(request.prompt_ids + request.future, device=embed.weight.device)
    with torch.inference_mode(), stock_attention(model):
        embeds = embed(ids)
        if request.prompt is not None:
            embeds = torch.cat([request.prompt.embeddings, embeds])
        positions = torch.arange(embeds.shape[0], device=ids.device)[None]
        logits = model(inputs_embeds=embeds[None], position_ids=positions, use_cache=False).logits[0]
    return logits.double()


def run(probe: Probe, forward: Callable[[list[Chunk]], torch.Tensor]) -> str | None:
    """Drive the requests through `forward` (the engine's step on a fresh KV place per request); None when
    every sampled logit is within tolerance of its reference, else the reason."""
    requests = probe.requests
    for request in requests:
        request.generated = []
    done = {r.request_id: 0 for r in requests}  # context positions already computed
    worst, where = 0.0, ""
    while True:
        chunks = []
        for r in requests:
            known = r.num_virtual_tokens + len(r.prompt_ids)
            if done[r.request_id] < known:  # prefill, in chunks
                chunks.append(Chunk(r, done[r.request_id], min(CHUNK_TOKENS, known - done[r.request_id])))
            elif len(r.generated) < NUM_DECODE_STEPS:
                r.generated = r.future[:len(r.generated) + 1]
                chunks.append(Chunk(r, done[r.request_id], 1))
        if not chunks:
            break
        chunks = step_plan.order(chunks)
        with prefill_attention.split_from(SPLIT_PAIRS, SPLIT_PAIRS):
            logits = forward(chunks)  # [num_sampling, V], in chunk order
        sampling = [c for c in chunks if c.is_sampling]
        for chunk, row in zip(sampling, logits):
            want = probe.references[requests.index(chunk.seq)][chunk.end - 1]
            error = float((row.double() - want).abs().max() / want.abs().max().clamp_min(1e-6))
            if not error <= worst:  # a NaN is kept as the worst
                worst, where = error, f"{chunk.seq.request_id} position {chunk.end - 1}"
        for chunk in chunks:
            done[chunk.seq.request_id] = chunk.end
    limit = TOLERANCE.get(probe.dtype, 1e-4)
    log.info("exactness probe: largest relative logit error %.2e (limit %g)", worst, limit)
    if not worst <= limit:  # NaN fails too
        return f"logits differ from the model's own attention by {worst:.2e} (relative, at {where}; limit {limit:g})"
    return None
