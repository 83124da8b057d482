"""PEFT's prompt-tuning adapter files: parse and validate them from bytes, and build them (never executes code)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from prompt_store.errors import InvalidPrompt
from prompt_store.soft_prompt import TASK_TYPES

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
WEIGHTS_NAMES = (SAFETENSORS_NAME, BIN_NAME)  # PEFT's own order: safetensors first
WEIGHTS_KEY = "prompt_embeddings"
MAX_CONFIG_BYTES = 64 * 1024
VERSION_META_KEY = "promptserve_version"
CREATED_META_KEY = "promptserve_created"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Limits:
    """What a stored adapter may be for this store's model."""

    token_dim: int
    max_virtual_tokens: int
    max_file_bytes: int


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of adapter_config.json the server uses."""

    task_type: str
    num_virtual_tokens: int
    num_transformer_submodules: int
    base_model_name_or_path: str | None


def misfit_reason(task_type: str, accepted: tuple[str, ...]) -> str | None:
    """Why an adapter of `task_type` cannot serve a model that takes `accepted` adapter types; None if it can."""
    if task_type in accepted:
        return None
    return f"task_type {task_type!r} does not fit the served model, which takes {' or '.join(accepted)} adapters"


def check_fits(task_id: str, filename: str, task_type: str, accepted: tuple[str, ...]) -> None:
    """InvalidPrompt naming the task, the file, its type and the types that fit, unless the type fits."""
    reason = misfit_reason(task_type, accepted)
    if reason is not None:
        raise _bad(task_id, filename, reason)


def _bad(task_id: str, filename: str, reason: str) -> InvalidPrompt:
    return InvalidPrompt(f"task {task_id!r}: {filename}: {reason}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_config(task_id: str, data: bytes, limits: Limits) -> AdapterConfig:
    """Validate adapter_config.json bytes for a PROMPT_TUNING adapter of this model."""
    if len(data) > MAX_CONFIG_BYTES:
        raise _bad(task_id, CONFIG_NAME, f"file is {len(data)} bytes, more than the limit {MAX_CONFIG_BYTES}")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise _bad(task_id, CONFIG_NAME, f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise _bad(task_id, CONFIG_NAME, "not a JSON object")
    if raw.get("peft_type") != "PROMPT_TUNING":
        raise _bad(task_id, CONFIG_NAME, f"peft_type is {str(raw.get('peft_type'))[:40]!r}, expected 'PROMPT_TUNING'")
    task_type = raw.get("task_type")
    if task_type not in TASK_TYPES:
        raise _bad(task_id, CONFIG_NAME, f"task_type {str(task_type)[:40]!r} is not one of {list(TASK_TYPES)}")
    n = raw.get("num_virtual_tokens")
    if not _positive_int(n):
        raise _bad(task_id, CONFIG_NAME, "num_virtual_tokens must be a positive integer")
    if n > limits.max_virtual_tokens:
        raise _bad(task_id, CONFIG_NAME, f"num_virtual_tokens {n} is more than the limit {limits.max_virtual_tokens}")
    token_dim = raw.get("token_dim")
    if token_dim is not None and token_dim != limits.token_dim:
        raise _bad(task_id, CONFIG_NAME,
                   f"token_dim {str(token_dim)[:20]} does not match the model's hidden size {limits.token_dim}")
    subs = raw.get("num_transformer_submodules")
    if subs is None:  # PEFT's default when the config leaves it open
        subs = 2 if task_type == "SEQ_2_SEQ_LM" else 1
    if subs not in (1, 2) or isinstance(subs, bool):
        raise _bad(task_id, CONFIG_NAME, "num_transformer_submodules must be 1 or 2")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(task_type, n, subs, base if isinstance(base, str) else None)


def _load_tensors(task_id: str, filename: str, data: bytes) -> dict:
    try:
        if filename == SAFETENSORS_NAME:
            return safetensors_load(data)
        # weights_only: the unpickler builds tensors and plain containers only, never runs code.
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure of untrusted bytes is the file's fault, not ours
        raise _bad(task_id, filename, f"cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(loaded, dict):
        raise _bad(task_id, filename, "does not hold a dict of tensors")
    return loaded


def parse_weights(task_id: str, filename: str, data: bytes, config: AdapterConfig, limits: Limits) -> torch.Tensor:
    """Validate the weights bytes; return the served rows as float32 `[num_virtual_tokens, token_dim]`."""
    if filename not in WEIGHTS_NAMES:
        raise _bad(task_id, filename, f"weights file must be named one of {list(WEIGHTS_NAMES)}")
    if len(data) > limits.max_file_bytes:
        raise _bad(task_id, filename, f"file is {len(data)} bytes, more than the limit {limits.max_file_bytes}")
    tensor = _load_tensors(task_id, filename, data).get(WEIGHTS_KEY)
    if not isinstance(tensor, torch.Tensor):
        raise _bad(task_id, filename, f"no tensor under the key {WEIGHTS_KEY!r}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise _bad(task_id, filename, f"dtype {tensor.dtype} is not a floating-point type")
    if tensor.dim() != 2:
        raise _bad(task_id, filename, f"{WEIGHTS_KEY} has {tensor.dim()} dimensions, expected 2")
    rows, cols = tensor.shape
    if cols != limits.token_dim:
        raise _bad(task_id, filename,
                   f"{WEIGHTS_KEY} has {cols} columns, the model's hidden size is {limits.token_dim}")
    expected = config.num_virtual_tokens * config.num_transformer_submodules
    if rows != expected:
        raise _bad(task_id, filename, f"{WEIGHTS_KEY} has {rows} rows, expected num_virtual_tokens * "
                   f"num_transformer_submodules = {expected}")
    # Only the first block is ever used (seq2seq files repeat one block per transformer submodule).
    served = tensor[: config.num_virtual_tokens].to(torch.float32).contiguous()  # [n, D]
    if not all_finite(served):
        raise _bad(task_id, filename, f"{WEIGHTS_KEY} holds NaN or infinite values")
    return served


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a CPU float32 tensor holds only finite values (numpy: one pass, no thread-pool start-up)."""
    return bool(np.isfinite(tensor.numpy()).all())


def version_of(embeddings: torch.Tensor) -> str:
    """Content hash of a prompt: the same float32 values give the same version, wherever they came from."""
    data = embeddings.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def build_config(task_type: str, num_virtual_tokens: int, token_dim: int, base_model: str | None) -> bytes:
    """adapter_config.json for a store-written adapter; only keys every PEFT release accepts."""
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        # One block even for seq2seq: PEFT reads only the first block for PROMPT_TUNING anyway.
        "num_transformer_submodules": 1,
        "num_attention_heads": None,
        "num_layers": None,
        # Always RANDOM: the weights are the prompt; a TEXT init here would name a tokenizer to fetch.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
    }
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def build_weights(embeddings: torch.Tensor, version: str, created: float) -> bytes:
    """adapter_model.safetensors bytes holding the float32 prompt; version and creation time in the header."""
    tensor = embeddings.detach().to("cpu", torch.float32).contiguous()
    metadata = {"format": "pt", VERSION_META_KEY: version, CREATED_META_KEY: repr(created)}
    return safetensors_save({WEIGHTS_KEY: tensor}, metadata=metadata)



def stamp_weights(data: bytes, version: str, created: float) -> bytes:
    """Checked safetensors bytes with the store's version and creation time in the header, whatever the uploader
    wrote there: the listing reads them back without hashing, so only the store may write them. The tensor bytes
    are untouched (their offsets count from the header's end)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if not k.startswith("promptserve_")}
    header["__metadata__"] = {**meta, VERSION_META_KEY: version, CREATED_META_KEY: repr(created)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + size:]
