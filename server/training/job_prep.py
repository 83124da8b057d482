"""A job's start, off the engine's thread: its files read and tokenized, checked against the model's
position table, its prompt initialised and its checkpoint loaded (runner.py runs this on its own thread, so
serving never waits for a 50 MiB file's tokenization)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from prompt_store.init import random_init, sample_vocab_init, text_init
from server.training.examples import Example, positions_needed, read_jsonl
from server.training.prompt_trainer import Hyperparameters, PromptTrainer
from server.training.state import TrainingState


@dataclass
class Prepared:
    """A job ready to train; the runner's slices advance it."""

    job: dict
    trainer: PromptTrainer
    train: list[Example]
    validation: list[Example]
    hyper: Hyperparameters
    total_steps: int
    num_done_in_batch: int = 0  # examples of the current step's batch already accumulated
    batch_loss: float = 0.0
    eval_next: int | None = None  # while evaluating (after an epoch's last step): the next validation example
    eval_loss_sum: float = 0.0
    eval_num_counted: int = 0


@dataclass(frozen=True)
class ModelFacts:
    """What preparing needs of the served model."""

    model: Any
    tokenizer: Any
    task_type: str
    max_positions: int | None  # None: no position table (relative positions)


def prepare(state: TrainingState, job: dict, facts: ModelFacts) -> Prepared:
    """Read, check and set up `job`; raises ValueError (or OSError, KeyError) saying why it cannot start."""
    is_seq2seq = facts.task_type == "SEQ_2_SEQ_LM"
    n = job["prompt_tuning"]["num_virtual_tokens"]

    def read(file_id: str) -> list[Example]:
        if state.file(file_id) is None:
            raise ValueError(f"file {file_id} was deleted or has expired")
        try:
            data = state.file_data(file_id)
        except OSError as exc:  # the message without the server's path: the job's owner reads it
            raise ValueError(f"file {file_id} cannot be read ({exc.strerror})") from None
        examples = read_jsonl(data, facts.tokenizer, is_encoder_decoder=is_seq2seq)
        _check_positions(file_id, examples, n, facts.max_positions, is_seq2seq)
        return examples

    train = read(job["training_file"])
    validation = read(job["validation_file"]) if job.get("validation_file") else []
    hyper = Hyperparameters(**job["hyperparameters"])
    trainer = PromptTrainer(facts.model, _init(job, facts), hyper, pad_token_id=_pad_id(facts.tokenizer))
    checkpoint = state.checkpoint(job["id"])
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        # The record may have been saved at later steps than the checkpoint: they are trained again.
        job["trained_tokens"] = checkpoint.get("trained_tokens", job["trained_tokens"])
    job["status"] = "running"
    job.setdefault("started_at", int(time.time()))  # the wall-clock limit counts from here, over restarts
    state.save_job(job)
    state.add_event(job["id"], f"training from step {trainer.num_steps}: {len(train)} examples, "
                               f"{hyper.n_epochs} epochs of batches of {hyper.batch_size}")
    total = hyper.n_epochs * math.ceil(len(train) / hyper.batch_size)
    return Prepared(job, trainer, train, validation, hyper, total)


def _check_positions(file_id: str, examples: list[Example], n: int, max_positions: int | None,
                     is_seq2seq: bool) -> None:
    """An index past the position table is a device-side assert on a GPU (the whole process's CUDA context
    breaks): refused here, before any example reaches the model."""
    if max_positions is None:
        return
    for i, example in enumerate(examples):
        needed = positions_needed(example, n, is_encoder_decoder=is_seq2seq)
        if needed > max_positions:
            raise ValueError(f"{file_id}: example {i + 1} needs {needed} positions with {n} virtual tokens; the "
                             f"model has {max_positions}")


def _init(job: dict, facts: ModelFacts):
    spec = job["prompt_tuning"]
    n, embeddings = spec["num_virtual_tokens"], facts.model.get_input_embeddings()
    if spec["init"] == "text":
        return text_init(spec["init_text"], n, facts.tokenizer, embeddings)
    if spec["init"] == "sample_vocab":
        return sample_vocab_init(n, embeddings, seed=job["seed"])
    return random_init(n, embeddings.weight.shape[1], seed=job["seed"])


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
