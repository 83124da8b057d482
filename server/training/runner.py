"""TrainingRunner: runs fine-tuning jobs one at a time, on the engine's thread, between inference steps.

The engine calls `run_slice(is_serving)` after each inference step, and over and over while it has no
requests. A server idle for IDLE_AFTER_S takes a whole training step per call. Otherwise a slice is
one example's forward and backward (the step's gradient is accumulated example by example, which gives
the same update), and a slice is taken only when training has had less than `share_under_load` of the
time since its last one (a request that arrives in a short gap between requests then waits for one
example at most, not a whole step). On a CPU, one example of a 100M-parameter model takes longer than a
decode step, so every slice stalls the running rows once; the default (1 %) keeps those stalls out of
the inter-token p99. Serving comes first: under sustained load a job advances slowly, and at full speed
whenever the server is idle.

Only the server that owns the training folder runs its jobs (job_watcher.py: one server, or one of the
replicas sharing a store). Every `checkpoint_every` steps the prompt and the optimizer state are saved,
and the job's record at most every PROGRESS_SAVE_S (what the other servers show); a job found running
when a server takes ownership (its own restart, or another server stopped) resumes from its checkpoint.
The batch schedule is a function of (seed, epoch), so a resumed job takes the same batches it would
have. On success the prompt is written to the store as a new version of the task (atomically; running
requests finish on the old one) and the task's cached virtual-token KV is dropped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from prompt_store.init import random_init, sample_vocab_init, text_init
from server.training.examples import Example, read_jsonl
from server.training.prompt_trainer import Hyperparameters, PromptTrainer, epoch_order, num_counted
from server.training.state import ACTIVE_STATUSES, TrainingState

log = logging.getLogger(__name__)
DEFAULT_SHARE_UNDER_LOAD = 0.01
IDLE_AFTER_S = 0.5  # no request for this long: the server is idle (a gap between requests is not)
PROGRESS_SAVE_S = 1.0


@dataclass
class _Active:
    job: dict
    trainer: PromptTrainer
    train: list[Example]
    validation: list[Example]
    hyper: Hyperparameters
    total_steps: int
    num_done_in_batch: int = 0  # examples of the current step's batch already accumulated
    batch_loss: float = 0.0


class TrainingRunner:
    """Side work of the engine (Engine.set_side_work)."""

    def __init__(self, state: TrainingState, *, model: Any, tokenizer: Any, store: Any, engine: Any,
                 task_type: str, checkpoint_every: int = 10, share_under_load: float = DEFAULT_SHARE_UNDER_LOAD):
        self._state, self._model, self._tokenizer = state, model, tokenizer
        self._store, self._engine, self._task_type = store, engine, task_type
        self._checkpoint_every = checkpoint_every
        self._share_under_load = share_under_load
        self.is_owner = False  # set by take_ownership(): this server runs the folder's jobs
        self._queue: deque[str] = deque()
        self._seen: set[str] = set()  # jobs read from disk (or submitted here): queued once, never again
        self._seen_lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._active: _Active | None = None
        self._next_step_at = 0.0
        self._last_busy = 0.0
        self._last_saved = 0.0

    # ---- the job watcher's side (its thread) ----
    def take_ownership(self) -> None:
        """This server now runs the folder's jobs. A job left running (this server restarted, or the
        server that ran it stopped) goes on from its last checkpoint; queued ones follow, oldest first."""
        for job in reversed(self._state.jobs()):
            if job["status"] == "running":
                self._state.add_event(job["id"], "training restarted after its server stopped: the job goes "
                                                 "on from its last checkpoint")
        self.is_owner = True
        self.adopt_from_disk()

    def adopt_from_disk(self) -> None:
        """Queue the jobs other servers wrote (oldest first), and take up the cancels asked for."""
        fresh = []
        with self._seen_lock:
            for job_id in self._state.job_ids() - self._seen:
                self._seen.add(job_id)
                job = self._state.job(job_id)
                if job is not None and job["status"] in ACTIVE_STATUSES:
                    fresh.append(job)
            self._queue.extend(j["id"] for j in sorted(fresh, key=lambda j: (j["created_at"], j["id"])))
        self._cancelled |= self._state.cancel_requests()
        self._engine.notify()

    # ---- the API's side (event loop) ----
    def submit(self, job_id: str) -> None:
        """A job just saved. Another server owning the folder finds it on disk (job_watcher.py)."""
        if self.is_owner:
            with self._seen_lock:
                if job_id in self._seen:  # the watcher found it on disk first
                    return
                self._seen.add(job_id)
                self._queue.append(job_id)
            self._engine.notify()

    def cancel(self, job_id: str) -> None:
        self._state.request_cancel(job_id)  # for the owner, whichever server it is; it holds over a restart
        if self.is_owner:
            self._cancelled.add(job_id)
            self._engine.notify()

    def live_view(self, job_id: str) -> dict | None:
        """The running job as it is now, on the server that runs it (its record on disk is up to
        PROGRESS_SAVE_S older)."""
        active = self._active
        return dict(active.job) if active is not None and active.job["id"] == job_id else None

    # ---- the engine's side ----
    def has_work(self) -> bool:
        return self.is_owner and (self._active is not None or bool(self._queue))

    def run_slice(self, is_serving: bool) -> None:
        if self._active is None and not self._start_next():
            return
        active = self._active
        if active.job["id"] in self._cancelled:
            self._end(active, "cancelled", "the job was cancelled")
            return
        started = time.monotonic()
        if is_serving:
            self._last_busy = started
        is_idle = started - self._last_busy > IDLE_AFTER_S
        if not is_idle and started < self._next_step_at:
            if not is_serving:
                time.sleep(0.002)  # a gap between requests: wait for them, without spinning the engine's loop
            return
        try:
            self._slice(active, is_whole_step=is_idle)
        except Exception as exc:  # noqa: BLE001 - the job fails with its reason; serving goes on
            log.exception("training job %s failed", active.job["id"])
            self._end(active, "failed", f"training failed: {exc}", error={"code": "training_error",
                                                                         "message": str(exc), "param": None})
            return
        took = time.monotonic() - started
        self._next_step_at = time.monotonic() + took * (1 - self._share_under_load) / self._share_under_load

    def _start_next(self) -> bool:
        while self._queue:
            job = self._state.job(self._queue.popleft())
            if job is None or job["status"] not in ACTIVE_STATUSES:
                continue
            if job["id"] in self._cancelled:
                self._finish(job, "cancelled", "the job was cancelled")
                continue
            try:
                self._active = self._prepare(job)
            except Exception as exc:  # noqa: BLE001 - e.g. the file was deleted: the job fails, said why
                self._finish(job, "failed", f"the job could not start: {exc}",
                             error={"code": "invalid_training_file", "message": str(exc), "param": "training_file"})
                continue
            return True
        return False

    def _prepare(self, job: dict) -> _Active:
        is_seq2seq = self._task_type == "SEQ_2_SEQ_LM"
        read = lambda file_id: read_jsonl(self._state.file_data(file_id), self._tokenizer,  # noqa: E731
                                          is_encoder_decoder=is_seq2seq)
        train = read(job["training_file"])
        validation = read(job["validation_file"]) if job.get("validation_file") else []
        hyper = Hyperparameters(**job["hyperparameters"])
        trainer = PromptTrainer(self._model, self._init(job), hyper, pad_token_id=_pad_id(self._tokenizer))
        checkpoint = self._state.checkpoint(job["id"])
        if checkpoint is not None:
            trainer.load_state_dict(checkpoint)
            # The record may have been saved at later steps than the checkpoint: they are trained again.
            job["trained_tokens"] = checkpoint.get("trained_tokens", job["trained_tokens"])
        job["status"] = "running"
        self._state.save_job(job)
        self._state.add_event(job["id"], f"training from step {trainer.num_steps}: {len(train)} examples, "
                                         f"{hyper.n_epochs} epochs of batches of {hyper.batch_size}")
        total = hyper.n_epochs * math.ceil(len(train) / hyper.batch_size)
        return _Active(job, trainer, train, validation, hyper, total)

    def _init(self, job: dict):
        spec = job["prompt_tuning"]
        n, embeddings = spec["num_virtual_tokens"], self._model.get_input_embeddings()
        if spec["init"] == "text":
            return text_init(spec["init_text"], n, self._tokenizer, embeddings)
        if spec["init"] == "sample_vocab":
            return sample_vocab_init(n, embeddings, seed=job["seed"])
        return random_init(n, embeddings.weight.shape[1], seed=job["seed"])

    def _slice(self, active: _Active, *, is_whole_step: bool) -> None:
        """The rest of the current step's batch, or its next example; the update once the batch is done."""
        steps_per_epoch = math.ceil(len(active.train) / active.hyper.batch_size)
        epoch, index = divmod(active.trainer.num_steps, steps_per_epoch)
        order = epoch_order(len(active.train), epoch, active.job["seed"])
        size = active.hyper.batch_size
        batch = [active.train[i] for i in order[index * size:(index + 1) * size]]
        start = active.num_done_in_batch
        part = batch[start:] if is_whole_step else batch[start:start + 1]
        active.batch_loss += active.trainer.accumulate(part, num_counted(batch))
        active.num_done_in_batch += len(part)
        if active.num_done_in_batch == len(batch):
            active.trainer.apply()
            self._after_step(active, batch, is_epoch_end=index == steps_per_epoch - 1)
            active.num_done_in_batch, active.batch_loss = 0, 0.0

    def _after_step(self, active: _Active, batch: list[Example], *, is_epoch_end: bool) -> None:
        job, step, loss = active.job, active.trainer.num_steps, active.batch_loss
        job["trained_tokens"] += sum(len(e.input_ids) + job["prompt_tuning"]["num_virtual_tokens"] for e in batch)
        job["train_loss"], job["progress"] = loss, {"step": step, "total_steps": active.total_steps}
        if is_epoch_end and active.validation:
            job["valid_loss"] = active.trainer.evaluate(active.validation, active.hyper.batch_size)
        if is_epoch_end or step % self._checkpoint_every == 0:
            self._state.save_checkpoint(job["id"], {**active.trainer.state_dict(),
                                                    "trained_tokens": job["trained_tokens"]})
            self._save_progress(job)
            self._state.add_event(job["id"], f"step {step}/{active.total_steps}: training loss {loss:.4f}"
                                  + (f", validation loss {job['valid_loss']:.4f}" if job.get("valid_loss") else ""),
                                  data={"step": step, "train_loss": loss, "valid_loss": job.get("valid_loss")})
        elif time.monotonic() - self._last_saved >= PROGRESS_SAVE_S:
            self._save_progress(job)
        if step >= active.total_steps:
            self._publish(active)

    def _save_progress(self, job: dict) -> None:
        self._state.save_job(job)
        self._last_saved = time.monotonic()

    def _publish(self, active: _Active) -> None:
        job = active.job
        prompt = self._store.put(job["task_id"], active.trainer.prompt.detach(), task_type=self._task_type)
        self._engine.forget_task(job["task_id"])
        job["fine_tuned_model"] = job["task_id"]
        self._end(active, "succeeded", f"published task {job['task_id']!r} version {prompt.version}")

    def _end(self, active: _Active, status: str, message: str, error: dict | None = None) -> None:
        self._active = None
        self._finish(active.job, status, message, error)

    def _finish(self, job: dict, status: str, message: str, error: dict | None = None) -> None:
        job.update(status=status, finished_at=int(time.time()), error=error)
        # The event first: whoever sees the job ended has every event of it (the SSE stream relies on it).
        self._state.add_event(job["id"], message, level="error" if status == "failed" else "info")
        self._state.save_job(job)
        self._state.clear_cancel(job["id"])
        self._cancelled.discard(job["id"])


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
