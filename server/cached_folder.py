"""A folder built once into a cache (a model, a converted GGUF): built aside, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MARKER = "config.json"  # present once a model folder is complete


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, made by `build(tmp)` in a sibling temp folder and renamed (atomic, safe to race): a
    server that loses the race keeps the winner's folder, and a crash never leaves half a folder."""
    if (final / MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-build-", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final)
    except OSError:
        if not (final / MARKER).exists():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_cache_dir() -> Path:
    """The user's cache dir for promptserve (platformdirs: ~/.cache/promptserve on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("promptserve"))
