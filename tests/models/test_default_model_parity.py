"""The engine on the default model gives each demo task's requests PEFT's greedy tokens: the same folder
and the shipped adapter, `PeftModel.generate` one request at a time as the referee (float32)."""

from __future__ import annotations

import pytest

from demo_tasks import json_data, sentiment_data
from server.tasks_seed import TRAINED_TASKS, trained_task_folder
from tests.engine.test_engine_parity import PeftReferee
from tests.models.conftest import generate_all

REQUESTS = [  # (task, input, new tokens): each task's own kind of input, and one of the other's
    ("demo-sentiment", sentiment_data.HELD_BACK[0][0], 6),
    ("demo-sentiment", "Great value for the price, I am very happy with it.", 6),
    ("demo-sentiment", json_data.held_back_examples(1)[0]["prompt"], 6),
    ("demo-json", json_data.held_back_examples(2)[1]["prompt"], 24),
    ("demo-json", "Ingrid Berg, 41, sails out of Uppsala every summer.", 24),
    ("demo-json", sentiment_data.HELD_BACK[1][0], 12),
    (None, "The food was cold and the waiter was rude.", 12),
]


@pytest.fixture(scope="module")
def peft_referee(default_model_dir):
    """PEFT alone, one request at a time, the shipped adapters loaded by `PeftModel.from_pretrained`."""
    return PeftReferee(default_model_dir, {task: trained_task_folder(task) for task in TRAINED_TASKS})


def test_engine_greedy_tokens_equal_peft_on_the_default_model(demo_engine, default_loaded, peft_referee):
    results = generate_all(demo_engine, REQUESTS)  # one mixed batch: both tasks and the bare model
    for (task, text, n), result in zip(REQUESTS, results):
        expected, _ = peft_referee.run(task, text, n)
        assert result.token_ids == expected, (task, text, default_loaded.tokenizer.decode(result.token_ids),
                                              default_loaded.tokenizer.decode(expected))
        assert result.virtual_tokens == (20 if task else 0)
