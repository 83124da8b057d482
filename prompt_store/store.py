"""PromptStore: every task's soft prompt, read from PEFT adapter folders, validated, cached, written safely."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prompt_store import init as inits
from prompt_store.cache import TieredCache
from prompt_store.errors import InvalidPrompt, TaskNotFound
from prompt_store.folder_io import Signature, read_folder, recover, remove_folder, stat_signature, write_folder
from prompt_store.listing import TaskIndex, make_info, metadata_from_bytes
from prompt_store.peft_format import (
    CONFIG_NAME, MAX_CONFIG_BYTES, SAFETENSORS_NAME, WEIGHTS_NAMES, Limits, all_finite, build_config, build_weights,
    check_fits, misfit_reason, parse_config, parse_weights, stamp_weights, version_of,
)
from prompt_store.soft_prompt import CAUSAL_LM, TASK_TYPES, SoftPrompt
from prompt_store.task_ids import check_task_id
from prompt_store.task_list import TaskList
from prompt_store.tiers import CacheEntry
from prompt_store.types import StoreStats, TaskInfo

_MIB = 1024 * 1024
_STALE_TMP_S = 600.0  # a younger .tmp- folder may belong to a live writer in another process


class PromptStore:
    """Soft prompts of many tasks under one root folder, one PEFT adapter folder per task id."""

    def __init__(self, root: str | os.PathLike, *, token_dim: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_device_bytes: int = 512 * _MIB,
                 max_host_bytes: int = 2048 * _MIB, max_virtual_tokens: int = 512,
                 max_file_bytes: int | None = None, task_types: Iterable[str] = TASK_TYPES,
                 rescan_interval_s: float = 30.0, check_on_use: bool = False) -> None:
        if token_dim < 1 or max_virtual_tokens < 1:
            raise ValueError("token_dim and max_virtual_tokens must be positive")
        # The adapter task types the served model can run (e.g. ("CAUSAL_LM",) for a decoder-only model);
        # any other type is refused with InvalidPrompt by every read and write, and listed with `error` set.
        self.task_types = _checked_task_types(task_types)
        os.makedirs(root, exist_ok=True)
        self.root = Path(os.path.realpath(root))
        self.device = torch.device(device)
        self.dtype = dtype
        # Default bound: the largest valid file (two float64 blocks of the largest prompt) plus header room.
        default_max = 2 * max_virtual_tokens * token_dim * 8 + _MIB
        self.limits = Limits(token_dim, max_virtual_tokens, max_file_bytes or default_max)
        self._cache = TieredCache(self.device, max_device_bytes, max_host_bytes)
        self._index = TaskIndex(str(self.root), self.limits)
        # list() answers from memory until the root changes, refresh() is called or this many seconds pass
        # (the last catches files edited in place by other processes); see task_list.py.
        self._tasks = TaskList(str(self.root), self._index, rescan_interval_s, self._after_rescan)
        self._write_lock = threading.Lock()  # one writer at a time in this process
        # A root shared with other processes (replicas on one NFS folder or volume) can change under the
        # cache: then every read compares the cached entry's folder signature with the disk (stat only).
        self.check_on_use = check_on_use
        recover(str(self.root), _STALE_TMP_S)

    @property
    def token_dim(self) -> int:
        """The model's hidden size every prompt must have."""
        return self.limits.token_dim

    # ---- reading ----
    def get(self, task_id: str) -> SoftPrompt:
        """The task's prompt on the store's device and dtype (a hit never touches disk, unless
        `check_on_use`: then a stat of its folder first)."""
        check_task_id(task_id)
        self._drop_if_changed(task_id)
        return self._cache.get_or_load(task_id, lambda: self._load(task_id), pin=False)

    def acquire(self, task_id: str) -> SoftPrompt:
        """`get` and pin in one step: the prompt is not evicted until `release`."""
        check_task_id(task_id)
        self._drop_if_changed(task_id)
        return self._cache.get_or_load(task_id, lambda: self._load(task_id), pin=True)

    def _drop_if_changed(self, task_id: str) -> None:
        """With `check_on_use`: forget the cached prompt if its folder was replaced or deleted by another
        process since it was read (the next load then reads the new version, or finds no task)."""
        if not self.check_on_use:
            return
        is_cached, signature = self._cache.signature_of(task_id)
        if is_cached and stat_signature(str(self.root), task_id) != signature:
            self._cache.invalidate(task_id)

    def release(self, prompt: SoftPrompt) -> bool:
        """Unpin a prompt returned by `acquire` (per task and version); False if it was not pinned."""
        return self._cache.release(prompt)

    def _load(self, task_id: str) -> CacheEntry:
        raw = read_folder(str(self.root), task_id, self.limits.max_file_bytes)
        config = parse_config(task_id, raw.config_bytes, self.limits)
        served = parse_weights(task_id, raw.weights_name, raw.weights_bytes, config, self.limits)  # [n, D] fp32
        meta = metadata_from_bytes(raw.weights_bytes) if raw.weights_name == SAFETENSORS_NAME else {}
        info = make_info(task_id, raw.signature, version_of(served), config.task_type, config.num_virtual_tokens, meta)
        self._index.remember(task_id, raw.signature, info)  # spares list() a full read of a PEFT-written file
        check_fits(task_id, CONFIG_NAME, config.task_type, self.task_types)
        prompt = SoftPrompt(task_id, info.version, config.task_type, self._placed(task_id, raw.weights_name, served))
        return CacheEntry(prompt, raw.signature)

    def _placed(self, task_id: str, filename: str, served: torch.Tensor) -> torch.Tensor:
        """float32 CPU [n, D] -> the store's device and dtype, refusing values the dtype cannot hold."""
        values = served.numpy()
        if float(np.abs(values).max()) > torch.finfo(self.dtype).max:
            raise InvalidPrompt(f"task {task_id!r}: {filename}: values overflow {self.dtype}")
        if self.dtype == torch.float16:  # numpy's cast is single-threaded: fast on a busy CPU
            out = torch.empty(served.shape, dtype=torch.float16)
            np.copyto(out.numpy(), values, casting="same_kind")
            return out.to(self.device)
        return served.to(device=self.device, dtype=self.dtype)

    # ---- writing ----
    def put(self, task_id: str, embeddings: torch.Tensor, *, task_type: str = CAUSAL_LM,
            base_model_name_or_path: str | None = None) -> SoftPrompt:
        """Validate `[n, token_dim]` embeddings and store them as a PEFT adapter folder (float32 safetensors)."""
        check_task_id(task_id)
        served = self._checked_tensor(task_id, embeddings)
        self._check_task_type(task_id, task_type)
        version = version_of(served)
        files = {
            CONFIG_NAME: build_config(task_type, served.shape[0], self.token_dim, base_model_name_or_path),
            SAFETENSORS_NAME: build_weights(served, version, self._created(task_id)),
        }
        return self._commit(task_id, files, served, version, task_type)

    def put_adapter_files(self, task_id: str, config_bytes: bytes, weights_bytes: bytes,
                          weights_filename: str = SAFETENSORS_NAME) -> SoftPrompt:
        """Validate an uploaded adapter completely, then write the files as they are, atomically."""
        check_task_id(task_id)
        config = parse_config(task_id, bytes(config_bytes), self.limits)
        check_fits(task_id, CONFIG_NAME, config.task_type, self.task_types)
        served = parse_weights(task_id, weights_filename, bytes(weights_bytes), config, self.limits)
        version = version_of(served)
        if weights_filename == SAFETENSORS_NAME:  # the header's version and time are the store's, never the upload's
            weights_bytes = stamp_weights(bytes(weights_bytes), version, self._created(task_id))
        files = {CONFIG_NAME: bytes(config_bytes), weights_filename: bytes(weights_bytes)}
        return self._commit(task_id, files, served, version, config.task_type)

    def import_folder(self, task_id: str, folder: str | os.PathLike) -> SoftPrompt:
        """Copy a folder written by `PeftModel.save_pretrained` into the store under `task_id`."""
        folder = Path(folder)
        names = [name for name in WEIGHTS_NAMES if (folder / name).is_file()]
        if not names or not (folder / CONFIG_NAME).is_file():
            raise InvalidPrompt(f"task {task_id!r}: {CONFIG_NAME} and a weights file are needed in the folder")
        size = (folder / names[0]).stat().st_size
        if size > self.limits.max_file_bytes:  # refuse before reading it into memory
            raise InvalidPrompt(f"task {task_id!r}: {names[0]}: file is {size} bytes, "
                                f"more than the limit {self.limits.max_file_bytes}")
        data = (folder / names[0]).read_bytes()
        return self.put_adapter_files(task_id, (folder / CONFIG_NAME).read_bytes()[:MAX_CONFIG_BYTES + 1], data,
                                      names[0])

    def _commit(self, task_id: str, files: dict[str, bytes], served: torch.Tensor, version: str,
                task_type: str) -> SoftPrompt:
        prompt = SoftPrompt(task_id, version, task_type, self._placed(task_id, SAFETENSORS_NAME, served))
        with self._write_lock:
            write_folder(str(self.root), task_id, files)
            signature = stat_signature(str(self.root), task_id)
            self._cache.put(CacheEntry(prompt, signature))
        self._index.forget(task_id)  # the next list() reads the new header
        self._tasks.invalidate()  # (the root's mtime changed too; this also covers a file system that hides it)
        return prompt

    def _created(self, task_id: str) -> float:
        try:
            info = self._index.info(task_id)
        except Exception:  # absent or unreadable: this write creates it
            return time.time()
        return info.created if info.error is None else time.time()

    def _check_task_type(self, task_id: str, task_type: str) -> None:
        """For adapters the store writes itself: a known type that fits the served model."""
        if task_type not in TASK_TYPES:
            raise InvalidPrompt(f"task {task_id!r}: task_type {str(task_type)[:40]!r} is not one of {list(TASK_TYPES)}")
        check_fits(task_id, CONFIG_NAME, task_type, self.task_types)

    def _checked_tensor(self, task_id: str, embeddings: Any) -> torch.Tensor:
        if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
            raise InvalidPrompt(f"task {task_id!r}: embeddings must be a floating-point tensor")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.token_dim:
            raise InvalidPrompt(f"task {task_id!r}: embeddings have shape {tuple(embeddings.shape)}, "
                                f"expected [num_virtual_tokens, {self.token_dim}]")
        n = embeddings.shape[0]
        if not 1 <= n <= self.limits.max_virtual_tokens:
            raise InvalidPrompt(f"task {task_id!r}: {n} virtual tokens, allowed 1 to {self.limits.max_virtual_tokens}")
        served = embeddings.detach().to("cpu", torch.float32).contiguous()
        if not all_finite(served):
            raise InvalidPrompt(f"task {task_id!r}: embeddings hold NaN or infinite values")
        return served

    # ---- PEFT's three initialisations ----
    def create_random(self, task_id: str, *, num_virtual_tokens: int, seed: int | None = None,
                      task_type: str = CAUSAL_LM) -> SoftPrompt:
        """RANDOM init (N(0, 1), as PEFT's nn.Embedding), then `put`."""
        self._check_task_type(check_task_id(task_id), task_type)
        tensor = inits.random_init(num_virtual_tokens, self.token_dim, seed)
        return self.put(task_id, tensor, task_type=task_type)

    def create_sample_vocab(self, task_id: str, *, num_virtual_tokens: int, word_embeddings: Any,
                            seed: int | None = None, task_type: str = CAUSAL_LM) -> SoftPrompt:
        """SAMPLE_VOCAB init (random vocabulary rows), then `put`."""
        self._check_task_type(check_task_id(task_id), task_type)
        tensor = inits.sample_vocab_init(num_virtual_tokens, word_embeddings, seed)
        return self.put(task_id, tensor, task_type=task_type)

    def create_text(self, task_id: str, text: str, *, num_virtual_tokens: int, tokenizer: Any,
                    word_embeddings: Any, task_type: str = CAUSAL_LM) -> SoftPrompt:
        """TEXT init (the init text's word embeddings, tiled or truncated), then `put`."""
        self._check_task_type(check_task_id(task_id), task_type)
        tensor = inits.text_init(text, num_virtual_tokens, tokenizer, word_embeddings)
        return self.put(task_id, tensor, task_type=task_type)

    # ---- the rest ----
    def delete(self, task_id: str) -> None:
        """Remove the task's folder atomically and forget it; TaskNotFound if there is none."""
        check_task_id(task_id)
        with self._write_lock:
            existed = remove_folder(str(self.root), task_id)
            self._cache.invalidate(task_id)
        self._index.forget(task_id)
        self._tasks.invalidate()
        if not existed:
            raise TaskNotFound(f"task {task_id!r}: not found in the store")

    def list(self, *, prefix: str | None = None, after: str | None = None,
             limit: int | None = None) -> list[TaskInfo]:
        """Task folders sorted by id (all, or those with `prefix`, id > `after`, at most `limit`); see task_list.py.

        Built from memory while the root folder is unchanged (one stat); a rescan also drops cached prompts
        whose files changed on disk. A task whose type does not fit the served model is listed with `error` set.
        """
        return self._tasks.page(prefix, after, limit)

    def _after_rescan(self, infos: list[TaskInfo], signatures: dict[str, Signature]) -> list[TaskInfo]:
        """Drop cached prompts whose folder is gone or changed; mark tasks of a type the model cannot serve."""
        for task_id, cached in self._cache.signatures().items():
            if signatures.get(task_id) != cached:
                self._cache.invalidate(task_id)
        return infos if len(self.task_types) == len(TASK_TYPES) else [self._fitted(info) for info in infos]

    def _fitted(self, info: TaskInfo) -> TaskInfo:
        """`info`, with `error` set if its task type does not fit the served model."""
        reason = misfit_reason(info.task_type, self.task_types)
        if reason is None or info.error is not None:
            return info
        return dataclasses.replace(info, error=f"task {info.task_id!r}: {CONFIG_NAME}: {reason}")

    def info(self, task_id: str) -> TaskInfo:
        """One task's TaskInfo from disk (stats, always current); TaskNotFound if absent."""
        check_task_id(task_id)
        return self._fitted(self._index.info(task_id))

    def refresh(self, task_id: str | None = None) -> list[str]:
        """Compare cached prompts (or one) with the disk by stat; drop changed ones; return their ids.

        Also makes the next `list()` rescan, so files edited in place show up there too.
        """
        self._tasks.invalidate()
        cached = self._cache.signatures()
        if task_id is not None:
            check_task_id(task_id)
            cached = {task_id: cached[task_id]} if task_id in cached else {}
        root = str(self.root)
        changed = [tid for tid, sig in cached.items() if stat_signature(root, tid) != sig]
        for tid in changed:
            self._cache.invalidate(tid)
        return changed

    def stats(self) -> StoreStats:
        """Cache counters and per-tier fill."""
        return self._cache.stats()


def _checked_task_types(task_types: Iterable[str]) -> tuple[str, ...]:
    """The accepted adapter task types as a tuple in the store's canonical order; ValueError if unknown or none."""
    wanted = (task_types,) if isinstance(task_types, str) else tuple(task_types)
    unknown = [t for t in wanted if t not in TASK_TYPES]
    if unknown or not wanted:
        raise ValueError(f"task_types must be a non-empty selection of {list(TASK_TYPES)}, got {list(wanted)}")
    return tuple(t for t in TASK_TYPES if t in wanted)
