"""The training service of one app: its state on disk, its runner attached to the engine, and the
watcher that makes this server the one that runs the folder's jobs (with a shared store, one of several)."""

from __future__ import annotations

from dataclasses import dataclass

from server.training.job_watcher import JobWatcher
from server.training.runner import TrainingRunner
from server.training.state import TrainingState


@dataclass
class Training:
    state: TrainingState
    runner: TrainingRunner
    watcher: JobWatcher

    def close(self) -> None:
        """Once the engine has stopped: another server sharing the folder may take the jobs."""
        self.watcher.close()


def start_training(runtime) -> Training:
    """Open the training folder, attach the runner to the engine, and own the jobs if no other server
    does (jobs a restart interrupted then go on)."""
    root = runtime.settings.training_dir or runtime.settings.store / ".training"
    state = TrainingState(root)
    runner = TrainingRunner(state, model=runtime.loaded.model, tokenizer=runtime.tokenizer, store=runtime.store,
                            engine=runtime.engine, task_type=runtime.loaded.task_type,
                            share_under_load=runtime.settings.training_share_under_load)
    runtime.engine.set_side_work(runner)
    watcher = JobWatcher(state, runner)
    watcher.start()
    return Training(state, runner, watcher)
