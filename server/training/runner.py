"""TrainingRunner: runs fine-tuning jobs one at a time, on the engine's thread, between inference steps.

The engine calls `run_slice(is_serving)` after each inference step, and over and over while it has no
requests. Every slice is bounded: at most MAX_EXAMPLES_PER_SLICE examples' forward and backward when the
server has been idle for IDLE_AFTER_S, one example otherwise, whatever the job's batch size (the step's
gradient is accumulated part by part, which gives the same update). Validation runs the same way, in
slices, after an epoch's last step. Under load a slice is taken only when training has had less than
`share_under_load` of the time since its last one, so a request that arrives waits for one example at
most. Serving comes first: under sustained load a job advances slowly, at full speed when idle.

A job's start (reading and tokenizing its files, checking them against the model's positions, loading its
checkpoint) runs on a thread of its own (job_prep.py), never on the engine's.

Only the server that owns the training folder runs its jobs (job_watcher.py). Every `checkpoint_every`
steps the prompt and the optimizer state are saved, and the job's record at most every PROGRESS_SAVE_S; a
job found running when a server takes ownership resumes from its checkpoint, unless its servers stopped
without shutting down MAX_CRASHES times while it ran (it may be what kills them): then it fails. A job
also fails after `max_job_s` of wall-clock time. An ending that cannot be written (disk full) is shown
from memory and written again by the watcher, so the job never stays `running`. On success the prompt
is written to the store as a new version of the task and the task's cached virtual-token KV is dropped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from server.training.examples import Example
from server.training.job_prep import ModelFacts, Prepared, prepare
from server.training.prompt_trainer import epoch_order, num_counted
from server.training.state import ACTIVE_STATUSES, TrainingState

log = logging.getLogger(__name__)
DEFAULT_SHARE_UNDER_LOAD = 0.01
IDLE_AFTER_S = 0.5  # no request for this long: the server is idle (a gap between requests is not)
PROGRESS_SAVE_S = 1.0
MAX_EXAMPLES_PER_SLICE = 8  # the longest the engine's thread is away from serving: 8 examples' step
MAX_CRASHES = 3


class TrainingRunner:
    """Side work of the engine (Engine.set_side_work)."""

    def __init__(self, state: TrainingState, *, facts: ModelFacts, store: Any, engine: Any,
                 checkpoint_every: int = 10, share_under_load: float = DEFAULT_SHARE_UNDER_LOAD,
                 max_job_s: float = math.inf):
        self._state, self._facts, self._store, self._engine = state, facts, store, engine
        self._checkpoint_every, self._share_under_load, self._max_job_s = checkpoint_every, share_under_load, max_job_s
        self.is_owner = False  # set by take_ownership(): this server runs the folder's jobs
        self._queue: deque[str] = deque()
        self._seen: set[str] = set()  # jobs read from disk (or submitted here): queued once, never again
        self._seen_lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._active: Prepared | None = None
        self._preparing: tuple[dict, Future] | None = None
        self._prep_pool = ThreadPoolExecutor(1, thread_name_prefix="promptserve-training-prep")
        self._unsaved: dict[str, dict] = {}  # ended jobs whose record could not be written yet
        self._next_step_at = self._last_busy = self._last_saved = 0.0

    # ---- the job watcher's side (its thread) ----
    def take_ownership(self) -> None:
        """This server now runs the folder's jobs. A job left running goes on from its last checkpoint (or
        fails, after MAX_CRASHES servers died under it); queued ones follow, oldest first."""
        for job in reversed(self._state.jobs()):
            if job["status"] == "running":
                self._resume_or_fail(job)
        self.is_owner = True
        self.adopt_from_disk()

    def _resume_or_fail(self, job: dict) -> None:
        if job.pop("was_paused", False):
            self._state.add_event(job["id"], "training restarted after its server stopped: the job goes on from "
                                             "its last checkpoint")
        else:
            job["num_crashes"] = job.get("num_crashes", 0) + 1
            if job["num_crashes"] >= MAX_CRASHES:
                self._finish(job, "failed", f"its server stopped without shutting down {job['num_crashes']} times "
                             "while the job ran (it may be what kills it); the job is not resumed again",
                             error={"code": "server_crashed", "message": "the job's server crashed repeatedly",
                                    "param": None})
                return
            self._state.add_event(job["id"], "training restarted after its server stopped: the job goes on from "
                                             f"its last checkpoint (crash {job['num_crashes']} of {MAX_CRASHES})")
        self._state.save_job(job)

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

    def save_unsaved(self) -> None:
        """Write the endings a full or read-only disk refused (the watcher calls this every poll)."""
        for job_id, job in list(self._unsaved.items()):
            try:
                self._state.save_job(job)
            except OSError:
                return
            self._unsaved.pop(job_id, None)

    def pause(self) -> None:
        """The server stops (the engine has): the running job is marked to go on, not counted as a crash."""
        self._prep_pool.shutdown(wait=True, cancel_futures=True)
        job = self._active.job if self._active is not None else self._preparing[0] if self._preparing else None
        if job is not None and job["status"] == "running":
            try:
                self._state.save_job({**job, "was_paused": True})
            except OSError as exc:
                log.error("cannot save training job %s at shutdown: %s", job["id"], exc)

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
        """The job as it is now on the server that runs it: its record on disk may be up to PROGRESS_SAVE_S
        older, or not written at all (an ending the disk refused)."""
        active = self._active
        if active is not None and active.job["id"] == job_id:
            return dict(active.job)
        unsaved = self._unsaved.get(job_id)
        return dict(unsaved) if unsaved is not None else None

    # ---- the engine's side ----
    def has_work(self) -> bool:
        if not self.is_owner:
            return False
        if self._preparing is not None:
            return self._preparing[1].done()  # the engine is notified when it is
        return self._active is not None or bool(self._queue)

    def run_slice(self, is_serving: bool) -> None:
        if self._active is None and not self._start_next():
            return
        active = self._active
        if active.job["id"] in self._cancelled:
            self._end(active, "cancelled", "the job was cancelled")
            return
        if time.time() - active.job.get("started_at", time.time()) > self._max_job_s:
            self._end(active, "failed", f"the job ran longer than its limit of {self._max_job_s:.0f} s",
                      error={"code": "time_limit", "message": "wall-clock limit reached", "param": None})
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
            self._slice(active, MAX_EXAMPLES_PER_SLICE if is_idle else 1)
        except Exception as exc:  # noqa: BLE001 - the job fails with its reason; serving goes on
            log.exception("training job %s failed", active.job["id"])
            self._end(active, "failed", f"training failed: {exc}", error={"code": "training_error",
                                                                         "message": str(exc), "param": None})
            return
        took = time.monotonic() - started
        self._next_step_at = time.monotonic() + took * (1 - self._share_under_load) / self._share_under_load

    def _start_next(self) -> bool:
        """True once a job is prepared; otherwise starts preparing the next queued one (off this thread)."""
        if self._preparing is not None:
            job, future = self._preparing
            if not future.done():
                return False
            self._preparing = None
            try:
                self._active = future.result()
                return True
            except Exception as exc:  # noqa: BLE001 - e.g. the file was deleted: the job fails, said why
                self._finish(job, "failed", f"the job could not start: {exc}",
                             error={"code": "invalid_training_file", "message": str(exc), "param": "training_file"})
        while self._queue:
            job = self._state.job(self._queue.popleft())
            if job is None or job["status"] not in ACTIVE_STATUSES:
                continue
            if job["id"] in self._cancelled:
                self._finish(job, "cancelled", "the job was cancelled")
                continue
            future = self._prep_pool.submit(prepare, self._state, job, self._facts)
            self._preparing = (job, future)
            future.add_done_callback(lambda _: self._engine.notify())
            return False
        return False

    def _slice(self, active: Prepared, size: int) -> None:
        """The next `size` examples of the current step's batch (the update once it is done), or of the
        validation file while evaluating."""
        if active.eval_next is not None:
            self._eval_slice(active, size)
            return
        steps_per_epoch = math.ceil(len(active.train) / active.hyper.batch_size)
        epoch, index = divmod(active.trainer.num_steps, steps_per_epoch)
        order = epoch_order(len(active.train), epoch, active.job["seed"])
        batch_size = active.hyper.batch_size
        batch = [active.train[i] for i in order[index * batch_size:(index + 1) * batch_size]]
        start = active.num_done_in_batch
        part = batch[start:start + size]
        active.batch_loss += active.trainer.accumulate(part, num_counted(batch))
        active.num_done_in_batch += len(part)
        if active.num_done_in_batch == len(batch):
            active.trainer.apply()
            self._after_step(active, batch, is_epoch_end=index == steps_per_epoch - 1)
            active.num_done_in_batch, active.batch_loss = 0, 0.0

    def _after_step(self, active: Prepared, batch: list[Example], *, is_epoch_end: bool) -> None:
        job = active.job
        job["trained_tokens"] += sum(len(e.input_ids) + job["prompt_tuning"]["num_virtual_tokens"] for e in batch)
        job["train_loss"] = active.batch_loss
        job["progress"] = {"step": active.trainer.num_steps, "total_steps": active.total_steps}
        if is_epoch_end and active.validation:  # the step's record waits for its validation loss
            active.eval_next, active.eval_loss_sum, active.eval_num_counted = 0, 0.0, 0
            return
        self._record_step(active, is_epoch_end=is_epoch_end)

    def _eval_slice(self, active: Prepared, size: int) -> None:
        part = active.validation[active.eval_next:active.eval_next + size]
        num = num_counted(part)
        active.eval_loss_sum += active.trainer.evaluate(part, len(part)) * num
        active.eval_num_counted += num
        active.eval_next += len(part)
        if active.eval_next >= len(active.validation):
            active.eval_next = None
            active.job["valid_loss"] = active.eval_loss_sum / max(active.eval_num_counted, 1)
            self._record_step(active, is_epoch_end=True)

    def _record_step(self, active: Prepared, *, is_epoch_end: bool) -> None:
        job, step, loss = active.job, active.trainer.num_steps, active.job["train_loss"]
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

    def _publish(self, active: Prepared) -> None:
        job = active.job
        prompt = self._store.put(job["task_id"], active.trainer.prompt.detach(), task_type=self._facts.task_type)
        self._engine.forget_task(job["task_id"])
        job["fine_tuned_model"] = job["task_id"]
        self._end(active, "succeeded", f"published task {job['task_id']!r} version {prompt.version}")

    def _end(self, active: Prepared, status: str, message: str, error: dict | None = None) -> None:
        self._active = None
        self._finish(active.job, status, message, error)

    def _finish(self, job: dict, status: str, message: str, error: dict | None = None) -> None:
        """The job's ending: written if the disk lets it, else kept (shown, and written later)."""
        job.update(status=status, finished_at=int(time.time()), error=error)
        self._unsaved[job["id"]] = job
        self._cancelled.discard(job["id"])
        try:  # the event first: whoever sees the job ended has every event of it (the SSE stream relies on it)
            self._state.add_event(job["id"], message, level="error" if status == "failed" else "info")
        except OSError as exc:
            log.error("training job %s: cannot write its last event: %s", job["id"], exc)
        try:
            self._state.save_job(job)
            self._state.clear_cancel(job["id"])
        except OSError as exc:
            log.error("training job %s %s, but its record cannot be written yet: %s", job["id"], status, exc)
            return
        self._unsaved.pop(job["id"], None)
