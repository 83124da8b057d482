"""One store folder shared by several servers (replicas on one NFS folder or volume): with `check_on_use`,
a task replaced or deleted by another process is never served stale; without it, a cached prompt is
served from memory until evicted (a hit never touches disk). Two stores on one root stand for two
replicas; one writer is a separate process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from prompt_store import PromptStore
from prompt_store.errors import TaskNotFound

TOKEN_DIM = 64


def _rows(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, TOKEN_DIM, generator=torch.Generator().manual_seed(seed))


def test_a_replaced_task_is_read_again_and_a_deleted_one_is_gone(tmp_path):
    writer = PromptStore(tmp_path, token_dim=TOKEN_DIM)
    reader = PromptStore(tmp_path, token_dim=TOKEN_DIM, check_on_use=True)
    first = writer.put("shared", _rows(1))
    held = reader.acquire("shared")  # cached and pinned, as by a running request
    assert held.version == first.version
    second = writer.put("shared", _rows(2, n=6))
    assert reader.get("shared").version == second.version
    assert torch.equal(reader.acquire("shared").embeddings, second.embeddings)
    assert reader.release(held)  # the running request still finishes on the old version
    writer.delete("shared")
    with pytest.raises(TaskNotFound):
        reader.acquire("shared")


def test_without_the_check_a_cached_prompt_is_served_from_memory(tmp_path):
    writer = PromptStore(tmp_path, token_dim=TOKEN_DIM)
    reader = PromptStore(tmp_path, token_dim=TOKEN_DIM)
    first = writer.put("shared", _rows(1))
    assert reader.get("shared").version == first.version
    writer.put("shared", _rows(2))
    assert reader.get("shared").version == first.version  # documented: use --shared-store for shared folders
    assert reader.refresh("shared") == ["shared"]


def test_a_write_by_another_process_is_seen(tmp_path):
    reader = PromptStore(tmp_path, token_dim=TOKEN_DIM, check_on_use=True)
    PromptStore(tmp_path, token_dim=TOKEN_DIM).put("shared", _rows(1))
    before = reader.get("shared").version
    script = (f"import torch; from prompt_store import PromptStore; "
              f"s = PromptStore({str(tmp_path)!r}, token_dim={TOKEN_DIM}); "
              f"print(s.put('shared', torch.full((3, {TOKEN_DIM}), 0.5)).version)")
    after = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.strip()
    assert after != before and reader.get("shared").version == after
