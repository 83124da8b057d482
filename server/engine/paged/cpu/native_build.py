"""Build one of this folder's C++ sources into a shared library with the system's compiler, for this
machine (`-march=native`), in a private temporary folder (so a build never meets another CPU); loaded
through ctypes. Each kernel's module builds through `once`, so a process builds each source once."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Reassociation lets the compiler vectorize the dot products (sums in another order: within 1 ulp-ish of
# torch's, far inside the parity tolerances); no -ffast-math, so NaN and infinities keep their meaning.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fPIC", "-std=c++17"]


_lock = threading.Lock()
made: dict[Path, Any] = {}  # per source: what its module made of the built library (None: not built)


def once(source: Path, make: Callable[[], Any]) -> Any:
    """`make()` (a kernel's build, wrapped and checked by its module) the first time for `source`, then what it
    returned."""
    with _lock:
        if source not in made:
            made[source] = make()
        return made[source]


def build(source: Path, fallback: str, switch: str | None = None) -> ctypes.CDLL | None:
    """`source` compiled and loaded; None, with a warning ending in `fallback` (what the engine does
    instead), when there is no C++ compiler or the build fails, or (logged) when the environment variable
    `switch` is "0"."""
    if switch is not None and os.environ.get(switch, "1") == "0":
        log.info("engine: %s off (%s=0), %s", source.name, switch, fallback)
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("engine: no C++ compiler for %s, %s", source.name, fallback)
        return None
    folder = Path(tempfile.mkdtemp(prefix="promptserve-native-"))
    obj, lib = folder / f"{source.stem}.o", folder / f"lib{source.stem}.so"
    try:
        # Linked without -fopenmp: the OpenMP symbols bind to the runtime torch has loaded already.
        subprocess.run([compiler, *FLAGS, "-c", str(source), "-o", str(obj)], check=True, capture_output=True)
        subprocess.run([compiler, "-shared", str(obj), "-o", str(lib)], check=True, capture_output=True)
        return ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("engine: %s not built (%s %s), %s", source.name, exc, detail.decode(errors="replace")[-300:],
                    fallback)
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped
