"""The training service of one app: its state on disk and its runner, attached to the engine."""

from __future__ import annotations

from server.training.runner import TrainingRunner
from server.training.state import TrainingState


def start_training(runtime) -> tuple[TrainingState, TrainingRunner] | None:
    """Open the training folder and attach the runner to the engine (jobs a restart interrupted go on).
    None with a shared store (replicas): each server would pick up the others' jobs."""
    if runtime.settings.shared_store:
        return None
    root = runtime.settings.training_dir or runtime.settings.store / ".training"
    state = TrainingState(root)
    runner = TrainingRunner(state, model=runtime.loaded.model, tokenizer=runtime.tokenizer, store=runtime.store,
                            engine=runtime.engine, task_type=runtime.loaded.task_type,
                            share_under_load=runtime.settings.training_share_under_load)
    runtime.engine.set_side_work(runner)
    return state, runner
