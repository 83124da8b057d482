"""Which environment `promptserve serve` re-executes itself with (server/preloads.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import preloads


@pytest.fixture
def library(tmp_path, monkeypatch) -> Path:
    """An intel-openmp install in a fake environment prefix; no system tcmalloc."""
    lib = tmp_path / "lib" / preloads.LIBRARY
    lib.parent.mkdir()
    lib.write_bytes(b"")
    monkeypatch.setattr(preloads.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(preloads.sys, "base_prefix", str(tmp_path))
    monkeypatch.setattr(preloads, "SYSTEM_LIBRARY_DIRS", (str(tmp_path / "system"),))
    return lib


@pytest.fixture
def tcmalloc(tmp_path) -> Path:
    lib = tmp_path / "tc" / preloads.TCMALLOC
    lib.parent.mkdir()
    lib.write_bytes(b"")
    return lib


def test_preload_goes_first_and_keeps_what_was_there(library):
    env = preloads.preload_env({"LD_PRELOAD": "/x/libother.so", "OTHER": "1"})
    assert env == {"LD_PRELOAD": f"{library}:/x/libother.so", "OTHER": "1"}


def test_nothing_to_do_when_preloaded_already_or_opted_out(library):
    assert preloads.preload_env({"LD_PRELOAD": str(library)}) is None  # the re-executed process: no loop
    assert preloads.preload_env({preloads.OPT_OUT: "1"}) is None


def test_nothing_to_do_without_the_libraries(tmp_path, monkeypatch):
    monkeypatch.setattr(preloads.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(preloads.sys, "base_prefix", str(tmp_path))
    monkeypatch.setattr(preloads, "SYSTEM_LIBRARY_DIRS", (str(tmp_path / "system"),))
    assert preloads.intel_openmp_library() is None
    assert preloads.preload_env({}) is None


def test_tcmalloc_named_by_the_environment_is_preloaded_with_openmp(library, tcmalloc):
    env = preloads.preload_env({preloads.TCMALLOC_ENV: str(tcmalloc)})
    assert env[preloads.TCMALLOC_ENV] == str(tcmalloc)
    assert env["LD_PRELOAD"] == f"{tcmalloc}:{library}"
    assert int(env[preloads.QUIET_TCMALLOC]) >= 1 << 40  # no warning for each large allocation
    assert preloads.preload_env(env) is None  # both in place: no second re-exec


def test_the_systems_tcmalloc_is_found_and_can_be_turned_off(library, tcmalloc):
    assert preloads.tcmalloc_library({}, search=(str(tcmalloc.parent),)) == tcmalloc
    assert preloads.tcmalloc_library({preloads.TCMALLOC_ENV: "0"}, search=(str(tcmalloc.parent),)) is None
    assert preloads.tcmalloc_library({preloads.TCMALLOC_ENV: str(tcmalloc.parent / "missing.so")}) is None
    assert preloads.preload_env({preloads.TCMALLOC_ENV: "0", "LD_PRELOAD": str(library)}) is None
