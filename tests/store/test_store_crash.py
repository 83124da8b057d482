"""Crash-safe writes: kill a writer process mid-write; the store still loads every task, old or new, never a mix."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from prompt_store import PromptStore, TaskNotFound
from prompt_store.folder_io import write_folder

WRITER = Path(__file__).with_name("crash_writer.py")
REPO = Path(__file__).resolve().parents[2]
VERSIONS = {(1, 1.0), (512, 0.0), (512, 1.0), (1, 0.0)}  # (rows, value) any put may leave


def start_writer(root: Path, mode: str) -> subprocess.Popen:
    """A fresh Python process running the writer (slow to start: imports torch)."""
    proc = subprocess.Popen([sys.executable, str(WRITER), str(root), mode], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def fork_writer(root: Path, mode: str):
    """The writer in a forked child (starts in milliseconds); returns (process, receiving end of its pipe)."""
    spec = importlib.util.spec_from_file_location("store_crash_writer", WRITER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=module.run_writer, args=(str(root), mode, sender.send), daemon=True)
    proc.start()
    assert receiver.poll(30) and receiver.recv() == "ready"
    return proc, receiver


def kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    if isinstance(proc, subprocess.Popen):
        proc.wait(timeout=10)
    else:
        proc.join(timeout=10)


def check_every_task_loads(root: Path) -> None:
    store = PromptStore(root, token_dim=64)  # a fresh process view: no cache
    for info in store.list():
        assert info.error is None, info
        prompt = store.get(info.task_id)
        values = prompt.embeddings.unique().tolist()
        assert len(values) == 1 and (prompt.num_virtual_tokens, values[0]) in VERSIONS
        assert info.version == prompt.version


def seed_store(root: Path) -> None:
    store = PromptStore(root, token_dim=64)
    for task_id in ("t0", "t1", "t2"):
        store.put(task_id, torch.full((1, 64), 1.0))


def test_kill_a_fresh_process_after_its_first_fsync(tmp_path):
    seed_store(tmp_path)
    proc = start_writer(tmp_path, "after-first-fsync")
    assert proc.stdout.readline().strip() == "hanging"
    kill(proc)
    assert any(name.startswith(".tmp-") for name in os.listdir(tmp_path))  # really died mid-write
    check_every_task_loads(tmp_path)


def test_kill_before_the_rename(tmp_path):
    seed_store(tmp_path)
    proc, receiver = fork_writer(tmp_path, "before-rename")
    assert receiver.poll(30) and receiver.recv() == "hanging"
    kill(proc)
    assert any(name.startswith(".tmp-") for name in os.listdir(tmp_path))
    check_every_task_loads(tmp_path)


def test_kill_at_random_moments(tmp_path):
    seed_store(tmp_path)
    rng = random.Random(0)
    num_mid_write = 0
    seen_leftovers: set[str] = set()
    for _ in range(20):
        proc, _ = fork_writer(tmp_path, "run")
        time.sleep(rng.uniform(0.01, 0.2))
        kill(proc)
        leftovers = {name for name in os.listdir(tmp_path) if name.startswith(".tmp-")}
        num_mid_write += bool(leftovers - seen_leftovers)
        seen_leftovers |= leftovers
        check_every_task_loads(tmp_path)
    assert num_mid_write >= 1  # some kills really landed inside a write


def test_readers_see_old_or_new_never_a_mix(tmp_path):
    seed_store(tmp_path)
    proc, _ = fork_writer(tmp_path, "run")
    reader = PromptStore(tmp_path, token_dim=64, max_device_bytes=0, max_host_bytes=0)  # every get reads disk
    seen = set()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            prompt = reader.get("t1")  # raises InvalidPrompt if config and weights were mixed
            seen.add((prompt.num_virtual_tokens, prompt.embeddings[0, 0].item()))
    finally:
        kill(proc)
    assert seen <= VERSIONS and len(seen) >= 2  # the writer really changed the task under the reader


def test_in_process_writers_and_readers(tmp_path):
    store = PromptStore(tmp_path, token_dim=64, max_device_bytes=4096, max_host_bytes=0)
    store.put("x", torch.ones(1, 64))
    errors = []

    def write():
        for step in range(30):
            store.put("x", torch.full((1 + (step % 2) * 7, 64), float(step % 2)))

    def read():
        try:
            for _ in range(200):
                prompt = store.get("x")
                values = prompt.embeddings.unique().tolist()
                assert len(values) == 1 and (prompt.num_virtual_tokens, values[0]) in {(1, 1.0), (8, 1.0), (1, 0.0)}
        except Exception as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.get("x").version == PromptStore(tmp_path, token_dim=64).get("x").version


def test_recover_restores_a_folder_lost_between_two_renames(tmp_path):
    store = PromptStore(tmp_path, token_dim=64)
    version = store.put("a", torch.ones(2, 64)).version
    os.rename(tmp_path / "a", tmp_path / ".old-a.0123abcd")  # as if killed inside the fallback replace
    with pytest.raises(TaskNotFound):
        PromptStore(tmp_path, token_dim=64, max_device_bytes=0, max_host_bytes=0).get("zzz")
    assert PromptStore(tmp_path, token_dim=64).get("a").version == version
    assert not (tmp_path / ".old-a.0123abcd").exists()


def test_recover_drops_only_stale_temporaries(tmp_path):
    PromptStore(tmp_path, token_dim=64)
    write_folder(str(tmp_path), "a", {"adapter_config.json": b"{}"})
    young, old = tmp_path / ".tmp-b.1", tmp_path / ".tmp-c.2"
    young.mkdir()
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    PromptStore(tmp_path, token_dim=64)
    assert young.exists() and not old.exists()


def test_fallback_replace_without_rename_exchange(tmp_path, monkeypatch):
    import prompt_store.folder_io as folder_io

    monkeypatch.setattr(folder_io, "_exchange", lambda a, b: False)
    store = PromptStore(tmp_path, token_dim=64)
    store.put("a", torch.ones(2, 64))
    new = store.put("a", torch.zeros(3, 64))
    assert PromptStore(tmp_path, token_dim=64).get("a").version == new.version
    assert sorted(os.listdir(tmp_path)) == ["a"]
