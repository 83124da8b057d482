"""list() from memory: one stat of the root while it is unchanged; what makes it rescan; paging by id."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from prompt_store import TaskNotFound
from prompt_store import task_list as task_list_module
from prompt_store.index_file import index_path


def age_root(store, seconds: float = 60.0) -> None:
    """Date the root's mtime back, so the next scan's stamp is trusted (not within the racy window).

    A first list() comes before: the first list() of a root makes the store's own sub-folder for its hint file.
    """
    if not (store.root / ".promptserve").is_dir():
        store.list()
    old = time.time_ns() - int(seconds * 1e9)
    os.utime(store.root, ns=(old, old))


@pytest.fixture
def disk_calls(monkeypatch):
    """Counts of os.stat / os.scandir / os.open calls made from now on (scandir: of a store's root only)."""
    counts = {"stat": 0, "scandir": 0, "open": 0}

    def counting(name, real):
        def call(*args, **kwargs):
            if name != "scandir" or not str(args[0]).endswith(".promptserve"):  # the hint's folder is not a scan
                counts[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(os, "stat", counting("stat", os.stat))
    monkeypatch.setattr(os, "scandir", counting("scandir", os.scandir))
    monkeypatch.setattr(os, "open", counting("open", os.open))
    return counts


def ids(infos) -> list[str]:
    return [info.task_id for info in infos]


def test_warm_list_costs_one_stat_of_the_root(make_store, disk_calls):
    store = make_store(rescan_interval_s=3600)
    for i in range(30):
        store.put(f"t{i:02d}", torch.full((2, 64), float(i)))
    age_root(store)
    disk_calls.update(stat=0, scandir=0, open=0)
    first = store.list()
    assert len(first) == 30 and disk_calls["scandir"] == 1 and disk_calls["stat"] >= 60
    disk_calls.update(stat=0, scandir=0, open=0)
    for _ in range(5):
        assert store.list() == first
    assert disk_calls == {"stat": 5, "scandir": 0, "open": 0}


def test_saving_the_hint_file_leaves_the_root_alone(make_store):
    store = make_store(rescan_interval_s=3600)
    for i in range(5):
        store.put(f"t{i}", torch.ones(2, 64))
    age_root(store)  # (its list() wrote the hint file)
    os.unlink(index_path(store.root))
    before = os.stat(store.root).st_mtime_ns
    make_store().list()  # a new store: reads every folder and writes the hint (temp file + rename in .promptserve/)
    assert json.loads(Path(index_path(store.root)).read_text())["tasks"].keys() == {f"t{i}" for i in range(5)}
    assert os.stat(store.root).st_mtime_ns == before


def test_a_recently_changed_root_is_not_trusted(make_store, disk_calls, monkeypatch):
    monkeypatch.setattr(task_list_module, "RACY_NS", 3600 * 10**9)  # "recent" = this hour: no flaky timing
    store = make_store(rescan_interval_s=3600)
    store.put("a", torch.ones(2, 64))
    age_root(store, 60)  # a change in the same timestamp tick as this mtime would be invisible
    disk_calls.update(scandir=0)
    store.list()
    store.list()
    assert disk_calls["scandir"] == 2  # each call rescans until the stamp is old enough


def test_another_store_adding_removing_or_replacing_is_noticed_via_the_root(make_store):
    ours, theirs = make_store(rescan_interval_s=3600), make_store()
    ours.put("a", torch.ones(2, 64))
    ours.put("b", torch.ones(3, 64))
    assert ours.get("b").num_virtual_tokens == 3  # cached in ours
    age_root(ours)
    assert ids(ours.list()) == ["a", "b"]
    theirs.put("c", torch.ones(2, 64))
    assert ids(ours.list()) == ["a", "b", "c"]
    age_root(ours)
    ours.list()
    theirs.delete("b")
    assert ids(ours.list()) == ["a", "c"]
    with pytest.raises(TaskNotFound):  # the rescan also dropped the cached prompt of the removed task
        ours.get("b")
    age_root(ours)
    ours.list()
    new = theirs.put("a", torch.zeros(4, 64))  # replaced by swapping the whole folder in
    assert {i.task_id: i.version for i in ours.list()}["a"] == new.version


def test_in_place_edit_is_noticed_on_refresh(make_store, tmp_path):
    ours = make_store(rescan_interval_s=3600)
    old = ours.put("a", torch.ones(2, 64))
    other = ours.put("src", torch.full((2, 64), 7.0))
    age_root(ours)
    assert {i.task_id: i.version for i in ours.list()}["a"] == old.version
    # Rewrite a's weights in the same file (same inode, root folder untouched), as `cp` over it would.
    shutil.copyfile(ours.root / "src" / "adapter_model.safetensors", ours.root / "a" / "adapter_model.safetensors")
    assert {i.task_id: i.version for i in ours.list()}["a"] == old.version  # warm: not looked at (documented)
    ours.refresh()
    assert {i.task_id: i.version for i in ours.list()}["a"] == other.version
    assert ours.get("a").version == other.version


def test_in_place_edit_is_noticed_after_the_rescan_interval(make_store, monkeypatch):
    clock = [1000.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], time_ns=time.time_ns)
    monkeypatch.setattr(task_list_module, "time", fake_time)
    store = make_store(rescan_interval_s=30)
    old = store.put("a", torch.ones(2, 64))
    other = store.put("src", torch.full((2, 64), 7.0))
    age_root(store)
    store.list()
    shutil.copyfile(store.root / "src" / "adapter_model.safetensors", store.root / "a" / "adapter_model.safetensors")
    clock[0] += 29
    assert {i.task_id: i.version for i in store.list()}["a"] == old.version
    clock[0] += 1
    assert {i.task_id: i.version for i in store.list()}["a"] == other.version


def test_zero_interval_rescans_every_call(make_store):
    store = make_store(rescan_interval_s=0)
    store.put("a", torch.ones(2, 64))
    other = store.put("src", torch.full((2, 64), 7.0))
    age_root(store)
    store.list()
    shutil.copyfile(store.root / "src" / "adapter_model.safetensors", store.root / "a" / "adapter_model.safetensors")
    assert {i.task_id: i.version for i in store.list()}["a"] == other.version
    with pytest.raises(ValueError):
        make_store(rescan_interval_s=-1)


def test_writes_through_the_store_show_at_once(make_store):
    store = make_store(rescan_interval_s=3600)
    store.put("a", torch.ones(2, 64))
    age_root(store)
    store.list()
    store.put("b", torch.ones(2, 64))
    assert ids(store.list()) == ["a", "b"]
    age_root(store)
    store.list()
    store.delete("a")
    assert ids(store.list()) == ["b"]


def test_pages_by_prefix_after_and_limit(make_store):
    store = make_store()
    names = ["a", "a.1", "a.2", "a0", "ab", "b", "b-x", "c"]
    for name in reversed(names):
        store.put(name, torch.ones(1, 64))
    assert ids(store.list()) == names  # the old call: everything, sorted
    assert ids(store.list(prefix="a")) == ["a", "a.1", "a.2", "a0", "ab"]
    assert ids(store.list(prefix="a.")) == ["a.1", "a.2"]
    assert ids(store.list(prefix="zz")) == [] and ids(store.list(prefix="")) == names
    assert ids(store.list(after="a0")) == ["ab", "b", "b-x", "c"]
    assert ids(store.list(after="a00")) == ["ab", "b", "b-x", "c"]  # need not be an existing id
    assert ids(store.list(after="c")) == [] and ids(store.list(after="")) == names
    assert ids(store.list(limit=3)) == ["a", "a.1", "a.2"] and store.list(limit=0) == []
    assert ids(store.list(prefix="a", after="a.1", limit=2)) == ["a.2", "a0"]
    assert ids(store.list(prefix="b", after="a.1")) == ["b", "b-x"]
    pages, after = [], None
    while page := store.list(after=after, limit=3):
        pages.append(ids(page))
        after = page[-1].task_id
    assert pages == [names[0:3], names[3:6], names[6:]]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            store.list(limit=bad)
    with pytest.raises(TypeError):
        store.list(prefix=3)


def test_concurrent_lists_while_another_store_writes(make_store):
    ours, theirs = make_store(rescan_interval_s=3600), make_store()
    errors: list[BaseException] = []
    is_done = threading.Event()

    def lister() -> None:
        try:
            while not is_done.is_set():
                listed = ids(ours.list())
                assert listed == sorted(listed) and set(listed) <= {f"t{i:02d}" for i in range(40)}
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=lister) for _ in range(3)]
    for thread in threads:
        thread.start()
    for i in range(40):
        theirs.put(f"t{i:02d}", torch.ones(1, 64))
    is_done.set()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and ids(ours.list()) == [f"t{i:02d}" for i in range(40)]
