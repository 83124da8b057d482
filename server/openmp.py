"""Intel's OpenMP runtime for the engine: `promptserve serve` re-executes itself once with it preloaded.

torch's CPU kernels run their parallel regions on OpenMP. With GNU OpenMP (what torch links), regions
started from any thread but the process's first one are slow: twice the futex calls, and a bf16 linear
of the benchmark model took 120 us there against 63 us on the main thread; the engine's step loop, which
runs on its own thread, ran at half the speed of the same loop on the main thread. With Intel's runtime
(pip `intel-openmp`, a dependency on x86-64 Linux) preloaded, the engine's thread runs as fast as the main
thread. A preload is the only way to swap the runtime, hence the re-exec (it keeps the pid), done before
torch is imported. PROMPTSERVE_NO_IOMP=1 turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIBRARY = "libiomp5.so"
OPT_OUT = "PROMPTSERVE_NO_IOMP"


def intel_openmp_library() -> Path | None:
    """Where pip's intel-openmp put its library (the environment's lib/), if it is installed."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = Path(prefix) / "lib" / LIBRARY
        if path.is_file():
            return path
    return None


def preload_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do."""
    library = intel_openmp_library()
    if library is None or environ.get(OPT_OUT) or not sys.platform.startswith("linux"):
        return None
    preloaded = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    if str(library) in preloaded:
        return None
    return {**environ, "LD_PRELOAD": ":".join([str(library), *preloaded])}


def reexec_with_intel_openmp() -> None:
    """Replace this process by itself with Intel's OpenMP preloaded (no-op when not installed, opted out,
    or already done). Call before importing torch."""
    env = preload_env(dict(os.environ))
    if env is not None and "torch" not in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
