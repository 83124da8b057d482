"""How a demo task's answer is scored, and the bare model's best chance at the same question.

The task gets the bare input (the soft prompt is the whole instruction). The bare model is scored twice:
on that same input, and on the input wrapped in a written instruction through its chat template (what a
user of the bare model would do), so the task is compared with the bare model at its best.
"""

from __future__ import annotations

import json

INSTRUCTIONS = {
    "demo-sentiment": "Is this review positive or negative? Answer with one word, positive or negative.\n\n{input}",
    "demo-json": 'Answer only with a JSON object with the keys "name", "age" (a number) and "city" of the '
                 "person in this sentence.\n\n{input}",
}
MAX_NEW_TOKENS = {"demo-sentiment": 8, "demo-json": 32}  # room for a bare model's longer answers


def is_correct(task: str, answer: str, expected: str) -> bool:
    """Sentiment: the answer names the expected label and not the other one (lenient, so that the bare
    model's "This review is positive." counts). JSON: the answer parses to the expected object."""
    if task == "demo-sentiment":
        words = {w.strip(".,:;!?\"'*") for w in answer.lower().split()}
        return words & {"positive", "negative"} == {expected}
    try:
        return json.loads(answer.strip()) == json.loads(expected)
    except ValueError:
        return False


def instructed(task: str, text: str, tokenizer) -> str:
    """The input as a user would ask the bare model: the instruction, through the chat template."""
    messages = [{"role": "user", "content": INSTRUCTIONS[task].format(input=text)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
