"""`open_hf_cache_worker`: the DynamicCache path's worker for a model, with its runner.

Encoder-decoders run here (Seq2SeqRunner), and causal models the paged path does not take (ModelRunner):
`server.engine.paged.open.open_paged_worker` returned None for them, with its reason logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.engine.faults import FaultInjector
from server.engine.hf_cache.runner import ModelRunner
from server.engine.hf_cache.runner_seq2seq import Seq2SeqRunner
from server.engine.hf_cache.worker import Worker
from server.engine.model_loader import LoadedModel
from server.engine.scheduling.scheduler import Scheduler


def open_hf_cache_worker(loaded: LoadedModel, faults: FaultInjector, scheduler: Scheduler,
                         release: Callable[[Any], None], flush: Callable[[], None]) -> Worker:
    """The worker that runs `loaded` over transformers' own cache (DynamicCache / EncoderDecoderCache)."""
    runner_type = Seq2SeqRunner if loaded.is_encoder_decoder else ModelRunner
    return Worker(runner_type(loaded.model, faults), scheduler, release, flush)
