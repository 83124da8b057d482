"""Separate virtual environments for the TGI and LoRAX clients (they pin a huggingface_hub that breaks
our transformers). Built once, cached under ~/.cache/promptserve-test/, installed in background threads
started at the beginning of the session so the download overlaps other tests."""

from __future__ import annotations

import os
import subprocess
import threading
import venv
from pathlib import Path

CLIENTS = {"text-generation": "text-generation==0.7.0", "lorax-client": "lorax-client==0.6.3"}
CACHE = Path(os.environ.get("PROMPTSERVE_TEST_CACHE", Path.home() / ".cache" / "promptserve-test"))


def install(requirement: str) -> Path:
    """The python of a cached venv holding `requirement` (built now if missing)."""
    folder = CACHE / ("venv-" + requirement.replace("==", "-"))
    python, marker = folder / "bin" / "python", folder / ".installed"
    if marker.exists():
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"installing {requirement} failed:\n{done.stdout}\n{done.stderr}")
    marker.write_text(requirement)
    return python


class ClientVenvs:
    """Installs every client in its own daemon thread; `python(name)` waits for that one."""

    def __init__(self) -> None:
        self._results: dict[str, Path | BaseException] = {}
        self._threads = {name: threading.Thread(target=self._run, args=(name,), daemon=True) for name in CLIENTS}
        for thread in self._threads.values():
            thread.start()

    def _run(self, name: str) -> None:
        try:
            self._results[name] = install(CLIENTS[name])
        except BaseException as e:  # noqa: BLE001 - re-raised in the test that needs this client
            self._results[name] = e

    def python(self, name: str) -> Path:
        """The client's python; raises (failing the test, never skipping it) if the install failed."""
        self._threads[name].join(timeout=900)
        result = self._results.get(name, TimeoutError(f"installing {name} took too long"))
        if isinstance(result, BaseException):
            raise result
        return result
