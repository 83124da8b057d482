"""Which environment `promptserve serve` re-executes itself with (server/openmp.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import openmp


@pytest.fixture
def library(tmp_path, monkeypatch) -> Path:
    lib = tmp_path / "lib" / openmp.LIBRARY
    lib.parent.mkdir()
    lib.write_bytes(b"")
    monkeypatch.setattr(openmp.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(openmp.sys, "base_prefix", str(tmp_path))
    return lib


def test_preload_goes_first_and_keeps_what_was_there(library):
    env = openmp.preload_env({"LD_PRELOAD": "/x/libtcmalloc.so", "OTHER": "1"})
    assert env == {"LD_PRELOAD": f"{library}:/x/libtcmalloc.so", "OTHER": "1"}


def test_nothing_to_do_when_preloaded_already_or_opted_out(library):
    assert openmp.preload_env({"LD_PRELOAD": str(library)}) is None  # the re-executed process: no loop
    assert openmp.preload_env({openmp.OPT_OUT: "1"}) is None


def test_nothing_to_do_without_the_library(tmp_path, monkeypatch):
    monkeypatch.setattr(openmp.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(openmp.sys, "base_prefix", str(tmp_path))
    assert openmp.intel_openmp_library() is None
    assert openmp.preload_env({}) is None
