"""Libraries `promptserve serve` preloads: it re-executes itself once with them in LD_PRELOAD.

- Intel's OpenMP runtime (pip `intel-openmp`, a dependency on x86-64 Linux). torch's CPU kernels run their
  parallel regions on OpenMP. With GNU OpenMP (what torch links), regions started from any thread but the
  process's first one are slow: twice the futex calls, and a bf16 linear of the benchmark model took
  120 us there against 63 us on the main thread; the engine's step loop, which runs on its own thread, ran
  at half the speed of the same loop on the main thread. With Intel's runtime the engine's thread runs as
  fast as the main thread. PROMPTSERVE_NO_IOMP=1 turns it off.
- tcmalloc (`libtcmalloc_minimal.so.4`, e.g. Debian's `libtcmalloc-minimal4`; the Docker image has it),
  when the system has it or PROMPTSERVE_TCMALLOC names it: a step allocates and frees hundreds of tensors,
  and with it a bf16 decode step of the benchmark model took about 7 % less time than with glibc's malloc
  (vLLM's CPU build recommends the same). PROMPTSERVE_TCMALLOC=0 turns it off.

A preload is the only way to swap either, hence the re-exec (it keeps the pid), done before torch is
imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIBRARY = "libiomp5.so"
OPT_OUT = "PROMPTSERVE_NO_IOMP"
TCMALLOC = "libtcmalloc_minimal.so.4"
TCMALLOC_ENV = "PROMPTSERVE_TCMALLOC"  # a path to the library, or 0 for none
# tcmalloc prints a warning for every allocation above this (1 GiB by default), which a KV pool's layer is.
QUIET_TCMALLOC = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
SYSTEM_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                       "/usr/local/lib")


def intel_openmp_library() -> Path | None:
    """Where pip's intel-openmp put its library (the environment's lib/), if it is installed."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = Path(prefix) / "lib" / LIBRARY
        if path.is_file():
            return path
    return None


def tcmalloc_library(environ: dict[str, str], search: tuple[str, ...] = SYSTEM_LIBRARY_DIRS) -> Path | None:
    """The tcmalloc to preload: PROMPTSERVE_TCMALLOC's path, else the system's, else none."""
    chosen = environ.get(TCMALLOC_ENV)
    if chosen == "0":
        return None
    if chosen:
        return Path(chosen) if Path(chosen).is_file() else None
    return next((Path(d) / TCMALLOC for d in search if (Path(d) / TCMALLOC).is_file()), None)


def preload_vars(environ: dict[str, str]) -> dict[str, str]:
    """The variables that add what `environ` lacks of the preloads ({} when nothing is missing). Ray Serve
    starts each replica's process with them."""
    if not sys.platform.startswith("linux"):
        return {}
    wanted = [tcmalloc_library(environ), None if environ.get(OPT_OUT) else intel_openmp_library()]
    preloaded = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    missing = [str(lib) for lib in wanted if lib is not None and str(lib) not in preloaded]
    if not missing:
        return {}
    quiet = {QUIET_TCMALLOC: str(1 << 40)} if wanted[0] is not None else {}  # the KV pool is one big alloc
    return {**quiet, "LD_PRELOAD": ":".join([*missing, *preloaded])}


def preload_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do."""
    extra = preload_vars(environ)
    if not extra:
        return None
    return {**extra, **environ, "LD_PRELOAD": extra["LD_PRELOAD"]}  # a threshold the user set stays


def reexec_with_preloads() -> None:
    """Replace this process by itself with the libraries above preloaded (no-op when none is installed, all
    are opted out, or it was done already). Call before importing torch."""
    env = preload_env(dict(os.environ))
    if env is not None and "torch" not in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
