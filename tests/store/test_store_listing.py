"""list() and info(): contents, created/modified, broken folders, and that an unchanged folder is never re-read."""

from __future__ import annotations

import builtins
import os
import time
from pathlib import Path

import pytest
import torch

from prompt_store import TaskNotFound
from prompt_store.index_file import index_path


def make_many(store, count: int) -> None:
    """`count` tasks by hard-linking one written folder (fast, and a real folder per task)."""
    store.put("seed", torch.ones(3, 64))
    src = store.root / "seed"
    for i in range(count):
        folder = store.root / f"task-{i:05d}"
        folder.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.link(src / name, folder / name)


def test_list_reports_each_task(store):
    first = store.put("b", torch.ones(2, 64))
    store.put("a", torch.ones(5, 64), task_type="SEQ_2_SEQ_LM")
    infos = store.list()
    assert [i.task_id for i in infos] == ["a", "b"]
    a, b = infos
    assert (a.num_virtual_tokens, a.task_type, a.error) == (5, "SEQ_2_SEQ_LM", None)
    assert b.version == first.version
    assert b.num_bytes == sum(f.stat().st_size for f in (store.root / "b").iterdir())
    assert abs(b.modified - time.time()) < 60 and b.created <= b.modified
    assert store.info("b") == b
    with pytest.raises(TaskNotFound):
        store.info("zzz")


def test_created_survives_a_new_version(store):
    created = store.put("a", torch.ones(2, 64)) and store.info("a").created
    time.sleep(0.02)
    store.put("a", torch.zeros(2, 64))
    info = store.info("a")
    assert info.created == created and info.modified > created


def test_broken_and_foreign_entries(store, tmp_path):
    store.put("good", torch.ones(2, 64))
    (store.root / "bad").mkdir()
    (store.root / "bad" / "adapter_config.json").write_text("{oops")
    (store.root / "bad" / "adapter_model.safetensors").write_bytes(b"x")
    (store.root / "half").mkdir()
    (store.root / "stray-file.txt").write_text("not a task")
    (store.root / ".tmp-x.1").mkdir()  # a writer's temporary folder is never listed
    (store.root / "outside").symlink_to(tmp_path, target_is_directory=True)
    infos = {i.task_id: i for i in store.list()}
    assert set(infos) == {"good", "bad", "half"}
    assert "not valid JSON" in infos["bad"].error and infos["bad"].version == ""
    assert "missing" in infos["half"].error
    assert infos["good"].error is None


def test_peft_written_folder_is_hashed_once(store, tiny_model_dir, monkeypatch, peft_saved_adapter):
    peft_saved_adapter(tiny_model_dir("llama"), store.root / "peft", task_type="CAUSAL_LM", num_virtual_tokens=3)
    version = store.list()[0].version
    assert version == store.get("peft").version
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert store.list()[0].version == version
    assert opened == []


def test_list_at_a_thousand_tasks_reads_only_new_folders(store, monkeypatch):
    make_many(store, 1000)
    infos = store.list()
    assert len(infos) == 1001 and all(i.error is None and i.num_virtual_tokens == 3 for i in infos)
    assert len({i.version for i in infos}) == 1
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    store.put("task-00007", torch.zeros(4, 64))  # one change: only that folder is read again
    opened.clear()
    infos = store.list()
    assert len(opened) == 2  # its config and its safetensors header, nothing else
    assert {i.task_id: i for i in infos}["task-00007"].num_virtual_tokens == 4
    (store.root / "task-00008" / "adapter_config.json").unlink()
    os.remove(store.root / "task-00008" / "adapter_model.safetensors")
    os.rmdir(store.root / "task-00008")
    assert len(store.list()) == 1000


def test_a_new_process_lists_from_the_hint_file(make_store, monkeypatch):
    first = make_store()
    make_many(first, 50)
    expected = first.list()  # reads every folder once and leaves the hint file behind
    assert os.path.exists(index_path(first.root))
    first.put("task-00003", torch.zeros(2, 64))  # changed after the hint was written: must be read again
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(str(a[0])) or real_open(*a, **k))
    infos = make_store().list()
    read = [os.path.basename(p) for p in opened if "task-00003" not in p and ".tmp-index." not in p]
    assert read == [os.path.basename(index_path(first.root))]  # (a .tmp-index file: the refreshed hint being written)
    assert {i.task_id: i for i in infos}["task-00003"].num_virtual_tokens == 2
    assert [i for i in infos if i.task_id != "task-00003"] == [i for i in expected if i.task_id != "task-00003"]


def test_a_corrupt_or_foreign_hint_file_is_ignored(make_store):
    store = make_store()
    make_many(store, 5)
    expected = store.list()
    hint = '{"format": 1, "token_dim": 64, "max_virtual_tokens": 512, "tasks": {"x": 1}}'
    Path(index_path(store.root)).write_text(hint)
    assert make_store().list() == expected
    Path(index_path(store.root)).write_text("garbage")
    assert make_store().list() == expected
    assert make_store(max_virtual_tokens=2).list()[0].error is not None  # other limits: the hint is not trusted
