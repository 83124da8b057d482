"""A writer for the crash tests: puts versions in a loop; can stop itself at a chosen step so it is killed there."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch


def _hang_at(mode: str, say: Callable[[str], None]) -> None:
    import prompt_store.folder_io as folder_io

    real = os.fsync if mode == "after-first-fsync" else os.rename

    def hang(*args):
        if mode == "after-first-fsync":
            real(*args)  # the first file is durable now; the rest of the folder is not written
        say("hanging")
        time.sleep(3600)

    setattr(folder_io.os, real.__name__, hang)  # only inside this (child) process


def run_writer(root: str, mode: str, say: Callable[[str], None]) -> None:
    """Loop forever writing t0..t2 with alternating shapes (1 or 512 rows, value 1.0 or 0.0)."""
    from prompt_store import PromptStore

    torch.set_num_threads(1)
    if mode != "run":
        _hang_at(mode, say)
    store = PromptStore(root, token_dim=64)
    say("ready")
    step = 0
    while True:
        step += 1
        for task_id in ("t0", "t1", "t2"):
            n = 1 + (step % 2) * 511  # a mix of one version's config with the other's weights cannot parse
            store.put(task_id, torch.full((n, 64), float(step % 2)))


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    run_writer(sys.argv[1], sys.argv[2], lambda line: print(line, flush=True))
