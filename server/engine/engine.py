"""Engine: submit() -> RequestStream; one worker thread runs the step loop (the model never runs on the
event loop)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from server.engine.config import EngineConfig
from server.engine.errors import EngineStopped
from server.engine.faults import FaultInjector
from server.engine.hf_cache.open import open_hf_cache_worker
from server.engine.hf_cache.worker import Worker
from server.engine.model_loader import LoadedModel
from server.engine.paged.kv_memory import PagedKV
from server.engine.paged.open import open_paged_worker, probe_step
from server.engine.paged.runner import warm_up
from server.engine.paged.worker import PagedWorker
from server.engine.request import validation
from server.engine.request.outbox import Outbox
from server.engine.request.sequence import Sequence
from server.engine.request.stream import RequestStream
from server.engine.scheduling.scheduler import Scheduler
from server.engine.types import NO_SHARE, EngineStats, KVStats, PromptTokens, SamplingParams, Share
from server.engine.worker_base import LogitsTap

log = logging.getLogger(__name__)


class Engine:
    """Continuous batching of mixed-task soft-prompt requests on one frozen model."""

    def __init__(self, loaded_model: LoadedModel, store: Any, config: EngineConfig | None = None):
        self.loaded = loaded_model
        self.store = store
        self.config = config or EngineConfig()
        self.fault_injector = FaultInjector()
        self._scheduler = Scheduler(self.config)
        self._outbox = Outbox()
        self._worker = self._make_worker(store.release if store is not None else (lambda prompt: None))
        self._wake = threading.Condition()
        self._accept_lock = threading.Lock()  # is_accepting flips and queue additions do not interleave
        self._is_accepting = False
        self._stop_now = False
        self._thread: threading.Thread | None = None
        self._side_work: Any = None  # set_side_work(): training slices between steps
        self.burst_wait: Callable[[float], None] = time.sleep  # test hook: how _gather_burst waits

    def _make_worker(self, release: Callable[[Any], None]) -> Worker | PagedWorker:
        """The paged path's worker when the model can run on it (see paged/open.py), else the DynamicCache
        path's (hf_cache/open.py)."""
        worker = None
        if self.config.use_paged and not self.loaded.is_encoder_decoder:
            worker = open_paged_worker(self.loaded, self.fault_injector, self._scheduler, self.config, release,
                                       self._outbox.flush)
        if worker is None:
            worker = open_hf_cache_worker(self.loaded, self.fault_injector, self._scheduler, release,
                                          self._outbox.flush)
        return worker

    @property
    def memory(self) -> PagedKV | None:
        """The paged engine's KV memory (None on the legacy path)."""
        return self._worker.memory if isinstance(self._worker, PagedWorker) else None

    @property
    def runner(self) -> Any:
        """The runner that calls the model (the paged path's PagedRunner, or the DynamicCache path's). Its
        `forward` runs once per step, on the engine's thread: a benchmark may wrap it to time or profile
        steps (bench/profile_step.py). Serving code has no use for it."""
        return self._worker.runner

    def is_alive(self) -> bool:
        """Whether the worker thread is running (a replica's health check)."""
        return self._thread is not None and self._thread.is_alive()

    def warm_up(self) -> float:
        """Run representative steps once (the compiled step compiles here); returns the seconds taken.
        Call before start(); the server does so before /ready."""
        if self.memory is None:
            return 0.0
        started = time.monotonic()
        runner = self._worker.runner
        try:
            warm_up(runner)
            # The compiled step is code of its own: it must pass the exactness probe too.
            reason = probe_step(runner, runner.native, runner.native_prefill) if runner.is_compiled else None
        except Exception as exc:  # noqa: BLE001 - e.g. inductor found no C++ compiler
            if not runner.is_compiled:
                raise
            reason = repr(exc)[:300]
        if reason is not None:
            runner.use_eager(reason)
            warm_up(runner)
        return time.monotonic() - started

    def describe(self) -> dict[str, Any]:
        """How requests are computed (for /info): the KV path, the decode and prefill attention, a compiled step."""
        memory = self.memory
        if memory is None:
            path = "seq2seq" if self.loaded.is_encoder_decoder else "legacy"
            return {"engine": path, "decode_attention": "transformers", "prefill_attention": "transformers",
                    "compiled_step": False}
        return {"engine": "paged", "decode_attention": "native" if memory.has_native_decode else "sdpa",
                "prefill_attention": "native" if memory.has_native_prefill else "sdpa",
                "compiled_step": self._worker.runner.is_compiled, "kv_block_tokens": memory.block_tokens,
                "kv_pool_tokens": memory.num_tokens}

    def set_side_work(self, work: Any) -> None:
        """Work the engine's thread does between inference steps (training): `work.has_work()` says whether
        there is any, `work.run_slice(is_serving)` does a bounded piece of it, with gradients allowed.
        `is_serving` says whether requests are running or waiting: the work then keeps its slices short."""
        self._side_work = work

    def notify(self) -> None:
        """Wake the engine's thread (side work arrived)."""
        with self._wake:
            self._wake.notify_all()

    def forget_task(self, task_id: str) -> None:
        """A task was deleted or replaced: drop its cached KV blocks."""
        if isinstance(self._worker, PagedWorker):
            self._worker.forget_task(task_id)

    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer."""
        return self.loaded.tokenizer

    @property
    def logits_tap(self) -> LogitsTap | None:
        """Test hook: called on the worker thread with each row's logits before sampling."""
        return self._worker.logits_tap

    @logits_tap.setter
    def logits_tap(self, tap: LogitsTap | None) -> None:
        self._worker.logits_tap = tap

    def start(self) -> None:
        """Start the worker thread and accept requests."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._stop_now = False
        self._thread = threading.Thread(target=self._run, name="promptserve-engine", daemon=True)
        self._thread.start()
        with self._accept_lock:
            self._is_accepting = True

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish for up to `grace_s`, then stop;
        what is left fails with EngineStopped. Blocking: from async code use `await engine.aclose()`."""
        with self._accept_lock:
            self._is_accepting = False
        deadline = time.monotonic() + grace_s
        while self._scheduler.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._wake:
            self._stop_now = True
            self._wake.notify_all()
        self.fault_injector.release_all()  # a step a test held must end for the thread to stop
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in self._scheduler.drain():
            self._worker.fail(seq, EngineStopped("the engine stopped before this request finished"))
        self._worker.reset()
        self._outbox.flush()

    async def aclose(self, grace_s: float = 30.0) -> None:
        """`stop()` without blocking the event loop."""
        await asyncio.to_thread(self.stop, grace_s)

    def tokenize(self, inputs: str | list[int]) -> PromptTokens:
        """The token ids `submit` would queue for `inputs` (422 errors for bad or too long inputs); pass
        them to `submit` as they are, and the text is not tokenized again."""
        ids = validation.tokenize(inputs, self.loaded.tokenizer, self.loaded.vocab_size)
        validation.check_input_length(len(ids), self.config)
        return PromptTokens(ids)

    async def submit(self, inputs: str | list[int] | PromptTokens, *, task_id: str | None,
                     params: SamplingParams, request_id: str | None = None, share: Share = NO_SHARE) -> RequestStream:
        """Validate, pin the task's prompt, queue; raises typed errors at once, never after queuing. `inputs`:
        text, token ids, or what `tokenize` returned (then queued as they are)."""
        self._check_accepting()
        validation.check_params(params, self.config)
        ids = (inputs if isinstance(inputs, PromptTokens) else self.tokenize(inputs)).ids
        share = share if self.config.fair_share else NO_SHARE
        self._scheduler.check_room(share.tenant, share.weight)
        # A cold task reads its adapter from disk: never on the event loop.
        prompt = None if task_id is None else await asyncio.to_thread(self.store.acquire, task_id)
        try:
            return self._enqueue(ids, task_id, prompt, params, request_id or uuid.uuid4().hex, share)
        except BaseException:
            if prompt is not None:
                self.store.release(prompt)
            raise

    def _enqueue(self, ids: list[int], task_id: str | None, prompt: Any, params: SamplingParams,
                 request_id: str, share: Share) -> RequestStream:
        num_virtual = 0
        if prompt is not None:
            validation.check_prompt(prompt, self.loaded.hidden_size, self.loaded.task_type)
            num_virtual = prompt.num_virtual_tokens
        validation.check_context(num_virtual, len(ids), params.max_new_tokens, self.config,
                                 self.loaded.max_positions, self.loaded.is_encoder_decoder,
                                 None if self.memory is None else self.memory.num_tokens)
        seed = params.seed if params.seed is not None or not params.do_sample else secrets.randbits(63)
        seq: Sequence  # the stream's cancel callback reads it when called, after it is assigned below
        stream = RequestStream(request_id, asyncio.get_running_loop(), self._outbox,
                               cancel=lambda: self._cancel(seq), num_prompt_tokens=len(ids),
                               num_virtual_tokens=num_virtual)
        seq = Sequence(request_id=request_id, task_id=task_id, prompt=prompt, prompt_ids=ids, params=params,
                       seed=seed, eos_token_ids=self.loaded.eos_token_ids, tokenizer=self.loaded.tokenizer,
                       sink=stream, continues_prompt=not self.loaded.is_encoder_decoder,
                       tenant=share.tenant, weight=share.weight)
        with self._accept_lock:
            self._check_accepting()
            self._scheduler.add(seq)
        with self._wake:
            self._wake.notify()
        return stream

    def _check_accepting(self) -> None:
        if not self._is_accepting:
            raise EngineStopped("the engine is not running")

    def _cancel(self, seq: Sequence) -> None:
        seq.is_cancel_requested = True
        with self._wake:
            self._wake.notify()

    def stats(self) -> EngineStats:
        """A snapshot of the load (counts are read without locking: approximate by one step)."""
        w = self._worker
        return EngineStats(is_running=self._is_accepting, num_waiting=self._scheduler.num_waiting,
                           num_running=self._scheduler.num_running, num_steps=w.num_steps,
                           num_finished=w.num_finished, num_failed=w.num_failed, num_cancelled=w.num_cancelled,
                           num_generated_tokens=w.num_generated_tokens, num_preempted=w.num_preempted,
                           kv=self._kv_stats())

    def _kv_stats(self) -> KVStats | None:
        worker = self._worker
        if not isinstance(worker, PagedWorker):
            return None
        blocks, memory = worker.blocks, worker.memory
        used = sum(s.num_cached for s in self._scheduler.running())
        return KVStats(blocks.num_blocks, memory.block_tokens, blocks.num_used, blocks.num_cached, memory.num_bytes,
                       used, worker.prefix.num_prompt_tokens, worker.prefix.num_hit_tokens)

    def _gather_burst(self) -> None:
        """Work arrived at an idle engine: while more requests keep arriving (each within `burst_wait_s` of
        the one before, at most 10 such waits), let them, so that a burst starts in one step instead of
        joining over many (and finishing over as many, at smaller batches). A lone request waits once."""
        for _ in range(10):
            num_seen = self._scheduler.num_waiting
            if self.config.burst_wait_s <= 0 or num_seen >= self.config.max_batch_size:
                return
            self.burst_wait(self.config.burst_wait_s)
            if self._scheduler.num_waiting == num_seen:
                return

    def _run(self) -> None:
        # Grad mode is per thread: the whole loop, cache surgery included, runs in inference mode.
        with torch.inference_mode():
            while True:
                was_idle = False
                with self._wake:
                    while not self._stop_now and not self._scheduler.has_work() and not self._has_side_work():
                        was_idle = True
                        self._wake.wait(timeout=self.config.idle_wait_s)
                    if self._stop_now:
                        return
                if self._scheduler.has_work():
                    if was_idle:
                        self._gather_burst()
                    try:
                        self._worker.step()
                    except Exception as exc:
                        log.exception("engine step failed")
                        self._worker.fail_all(exc)
                    self._outbox.flush()
                if self._has_side_work():
                    self._run_side_slice()

    def _has_side_work(self) -> bool:
        return self._side_work is not None and self._side_work.has_work()

    def _run_side_slice(self) -> None:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                self._side_work.run_slice(self._scheduler.has_work())
        except Exception:
            log.exception("side work failed")
