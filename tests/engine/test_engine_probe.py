"""The start-up exactness probe can fail: a decode or prefill kernel or attention glue that loses a position
is refused (the engine falls back, with a warning naming the reason), and the engine stays exact."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from server.engine.paged import step_plan
from server.engine.paged.cpu import native_check
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.model_loader import load_model


class KernelDroppingPositionZero:
    """A decode 'kernel' in torch that stores keys and values right but attends from position 1 on: the
    kind of error a wrong stride or offset makes."""

    @staticmethod
    def covers(dtype, device) -> bool:
        return True

    def run(self, query, new_keys, new_values, keys, values, write_rows, reads, scale, out, window=0, softcap=0.0):
        keys[:, write_rows] = new_keys.transpose(0, 1)
        values[:, write_rows] = new_values.transpose(0, 1)
        group = query.shape[1] // keys.shape[0]
        size = 1 << reads.block_shift
        for row in range(reads.num_decode):
            length = int(reads.lengths[row])
            rows = [int(reads.tables[row, p // size]) * size + p % size for p in range(min(1, length - 1), length)]
            k, v = keys[:, rows], values[:, rows]
            attended = F.scaled_dot_product_attention(query[row, :, None], k.repeat_interleave(group, 0),
                                                      v.repeat_interleave(group, 0), scale=scale)
            out[row] = attended[:, 0]


def test_a_kernel_that_drops_a_position_is_refused(engine_model_dir, monkeypatch, caplog):
    engine = _engine_with(KernelDroppingPositionZero(), "native_decode", engine_model_dir, monkeypatch, caplog)
    assert (engine.describe()["engine"], engine.describe()["decode_attention"]) == ("paged", "sdpa")


def _engine_with(kernel, module: str, engine_model_dir, monkeypatch, caplog) -> Engine:
    """An engine on the tiny Llama whose `module` (native_decode or native_prefill) loads `kernel`, which the
    probe alone judges; the probe must refuse it."""
    check = {"native_decode": "accept", "native_prefill": "accept_prefill"}[module]
    monkeypatch.setattr(native_check, check, lambda native, geometry: native)
    monkeypatch.setattr(f"server.engine.paged.cpu.{module}.load", lambda: kernel)
    loaded = load_model(str(engine_model_dir("llama")), device="cpu", dtype="float32")
    with caplog.at_level(logging.WARNING):
        engine = Engine(loaded, None, EngineConfig())
    refused = "native attention kernels not used for this model (logits differ from the model's own attention"
    assert refused in caplog.text
    return engine


class PrefillDroppingPositionZero:
    """A prefill 'kernel' in torch that attends from position 1 on (position 0 attends to itself)."""

    @staticmethod
    def covers(dtype, device, head_dim) -> bool:
        return True

    def run(self, query, keys, values, runs, start, scale, out):
        rows = [first + i for first, length in runs.tolist() for i in range(length)][:start + query.shape[0]]
        group = query.shape[1] // keys.shape[0]
        k, v = (t[:, rows].repeat_interleave(group, 0) for t in (keys, values))  # [H, L, d]
        for t in range(query.shape[0]):
            seen = range(min(1, start + t), start + t + 1)
            out[t] = F.scaled_dot_product_attention(query[t, :, None], k[:, seen], v[:, seen], scale=scale)[:, 0]


def test_a_prefill_kernel_that_drops_a_position_is_refused(engine_model_dir, monkeypatch, caplog):
    engine = _engine_with(PrefillDroppingPositionZero(), "native_prefill", engine_model_dir, monkeypatch, caplog)
    assert (engine.describe()["engine"], engine.describe()["prefill_attention"]) == ("paged", "sdpa")


def test_glue_that_hides_a_position_sends_the_model_to_the_legacy_path(engine_model_dir, monkeypatch, caplog):
    def hides_position_zero(chunk, device):
        rows = torch.arange(chunk.num_tokens, device=device)[:, None] + chunk.start
        cols = torch.arange(chunk.end, device=device)[None, :]
        return (cols <= rows) & (cols > 0)

    monkeypatch.setattr(step_plan, "_offset_causal_mask", hides_position_zero)  # later prefill chunks lose it
    loaded = load_model(str(engine_model_dir("gpt2")), device="cpu", dtype="float32")
    with caplog.at_level(logging.WARNING):
        engine = Engine(loaded, None, EngineConfig(native_attention=False))
    assert engine.describe()["engine"] == "legacy"
    assert "engine: legacy path (logits differ from the model's own attention by" in caplog.text


def test_the_probe_passes_exact_models_in_float64(engine_model_dir, caplog):
    loaded = load_model(str(engine_model_dir("llama")), device="cpu", dtype="float64")
    with caplog.at_level(logging.INFO, logger="server.engine.paged.probe"):
        engine = Engine(loaded, None, EngineConfig())
    assert engine.describe()["engine"] == "paged"
    assert "limit 1e-12" in caplog.text
