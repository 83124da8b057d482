"""Sampler: greedy, top-k / top-p limits, repetition penalty (HF semantics), per-row generators."""

from __future__ import annotations

import torch

from server.engine.sampler import apply_repetition_penalty, make_generator, sample, warp
from server.engine.types import SamplingParams


def _logits(rows: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_and_degenerate_sampling_pick_the_argmax():
    logits = _logits()
    greedy = SamplingParams()
    top1 = SamplingParams(do_sample=True, top_k=1)
    tiny_p = SamplingParams(do_sample=True, top_p=1e-6)
    gens = [None, make_generator(1, logits.device), make_generator(2, logits.device), None]
    out = sample(logits, [greedy, top1, tiny_p, greedy], [[], [], [], []], gens)
    assert out.token_ids == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(out.logprobs), expected)


def test_top_k_and_top_p_keep_only_the_head():
    row = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = warp(row, SamplingParams(do_sample=True, top_k=2)).isfinite().tolist()
    assert kept == [True, True, False, False, False]
    probs = row.softmax(-1)  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    kept = warp(row, SamplingParams(do_sample=True, top_p=0.8)).isfinite().tolist()
    assert kept == [True, True, False, False, False] and probs[:1].sum() < 0.8 <= probs[:2].sum()


def test_repetition_penalty_follows_hf():
    row = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(row, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    params = SamplingParams(repetition_penalty=10.0)
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    assert sample(logits, [params], [[0]], [None]).token_ids == [1]  # the seen best token is pushed down


def test_row_generator_makes_draws_independent_of_other_rows():
    logits = _logits(rows=3)
    params = SamplingParams(do_sample=True, temperature=1.5, seed=5)

    def draws(other_rows_sampled: bool) -> list[int]:
        gens = [make_generator(5, logits.device), make_generator(9, logits.device), None]
        mates = params if other_rows_sampled else SamplingParams()
        tokens = []
        for _ in range(20):
            tokens.append(sample(logits, [params, mates, SamplingParams()], [[]] * 3, gens).token_ids[0])
        return tokens

    assert draws(True) == draws(False)
    assert len(set(draws(True))) > 1  # it really samples
