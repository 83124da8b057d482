"""The shipped demo tasks on the default model beat the bare model on held-back examples of their own.

The bare model is scored on the same input as the task, and on that input with the task written out as an
instruction through its chat template (demo_tasks/scoring.py); both figures are printed (`pytest -s`).
"""

from __future__ import annotations

import pytest

from demo_tasks import json_data, scoring, sentiment_data
from tests.models.conftest import generate_all

# task -> (held-back examples, the accuracy the task must reach)
HELD_BACK = {
    "demo-sentiment": (sentiment_data.held_back_examples(), 0.90),  # the threshold
    "demo-json": (json_data.held_back_examples(), 0.80),  # valid JSON with all three fields right
}


def _accuracy(task: str, examples: list[dict], answers: list) -> float:
    return sum(scoring.is_correct(task, a.text, e["completion"]) for a, e in zip(answers, examples)) / len(examples)


@pytest.mark.parametrize("task", sorted(HELD_BACK))
def test_demo_task_beats_the_bare_model(task, demo_engine, default_loaded):
    examples, threshold = HELD_BACK[task]
    n = scoring.MAX_NEW_TOKENS[task]
    tok = default_loaded.tokenizer
    requests = [(task, e["prompt"], n) for e in examples]
    requests += [(None, e["prompt"], n) for e in examples]
    requests += [(None, scoring.instructed(task, e["prompt"], tok), n) for e in examples]
    answers = generate_all(demo_engine, requests)
    k = len(examples)
    with_task = _accuracy(task, examples, answers[:k])
    bare = _accuracy(task, examples, answers[k:2 * k])
    instructed = _accuracy(task, examples, answers[2 * k:])
    print(f"\n{task}: {k} held-back examples; accuracy with the task {with_task:.0%}, bare model on the same "
          f"input {bare:.0%}, bare model with the instruction in its chat template {instructed:.0%}")
    assert with_task >= threshold, [a.text for a in answers[:k]]
    assert with_task > max(bare, instructed)
