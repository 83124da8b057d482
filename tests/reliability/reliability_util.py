"""Helpers of the reliability tests (tests/reliability is on sys.path; `conftest` names clash across folders)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from live_server_util import LiveServer

TASKS = ("rel-a", "rel-b", "rel-c", "rel-d")
KEYS = {
    "rel-admin-key-1": {"tenant": "ops", "tasks": ["*"], "admin": True},
    "rel-acme-key-01": {"tenant": "acme", "tasks": ["acme-*"], "admin": True},
    "rel-globex-key1": {"tenant": "globex", "tasks": ["globex-*"], "base_model": False},
}
TENANT_TASKS = ("acme-x", "globex-x")



def create_tasks(live: LiveServer, task_ids, headers=None) -> None:
    """RANDOM-init tasks with fixed seeds and different lengths."""
    with live.client(headers=headers) as c:
        for i, task_id in enumerate(task_ids):
            r = c.put(f"/v1/tasks/{task_id}", json={"init": "random", "num_virtual_tokens": 3 + 2 * i, "seed": i})
            assert r.status_code == 201, r.text



def keys_file(tmp_path_factory) -> Path:
    """A keys file with KEYS."""
    path = tmp_path_factory.mktemp("rel-keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"key": k, **v} for k, v in KEYS.items()]}))
    return path



def wait_for(predicate, timeout_s: float = 30, what: str = "condition") -> None:
    """Poll until `predicate()` is true (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)



class EngineGate:
    """Holds the engine's worker inside a step of request `gate-*` until opened (queues others up)."""

    def __init__(self, engine):
        self.engine = engine
        self.opened = threading.Event()
        self.is_held = threading.Event()

    def tap(self, request_id, step, logits) -> None:
        if request_id.startswith("gate") and not self.opened.is_set():
            self.is_held.set()
            self.opened.wait(30)



def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def settled(live: LiveServer) -> bool:
    """Nothing waiting, running or pinned, as /metrics reports it."""
    with live.client() as c:
        text = c.get("/metrics").text
    return all(metric(text, n) == 0 for n in ("promptserve_queue_depth", "promptserve_running_batch_size",
                                              "promptserve_prompt_store_pinned"))


def write_store_folder(folder: Path, config: bytes, weights: bytes, name: str = "adapter_model.safetensors") -> None:
    """Put adapter files into a store folder behind the server's back (as an operator's copy would)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_bytes(config)
    (folder / name).write_bytes(weights)


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only for this process, for real: a read-only bind mount as root (root ignores file
    modes), the write bits cleared otherwise. Skips where root may not mount (no CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for path in modes:
            path.chmod(0o555)
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {bind.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)
