"""Thread safety: the asyncio thread and the engine thread call get/acquire/release/put/delete at once."""

from __future__ import annotations

import random
import subprocess
import sys
import threading

import torch

from prompt_store import TaskNotFound

ENTRY = 4 * 64 * 4


def test_mixed_calls_from_many_threads_keep_the_invariants(make_store):
    store = make_store(max_device_bytes=3 * ENTRY, max_host_bytes=3 * ENTRY)
    task_ids = [f"t{i}" for i in range(10)]
    for task_id in task_ids:
        store.put(task_id, torch.full((4, 64), 1.0))
    errors: list[BaseException] = []

    def engine_like(seed: int) -> None:
        rng = random.Random(seed)
        held = []
        try:
            for _ in range(300):
                task_id = rng.choice(task_ids)
                try:
                    prompt = store.acquire(task_id)
                except TaskNotFound:
                    continue
                assert prompt.embeddings.shape == (4, 64) and len(prompt.embeddings.unique()) == 1
                held.append(prompt)
                if len(held) > 3:
                    assert store.release(held.pop(0))
            for prompt in held:
                assert store.release(prompt)
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    def admin_like() -> None:
        rng = random.Random(99)
        try:
            for step in range(60):
                task_id = rng.choice(task_ids)
                if step % 7 == 6:
                    try:
                        store.delete(task_id)
                    except TaskNotFound:
                        pass
                else:
                    store.put(task_id, torch.full((4, 64), float(step)))
                store.list()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=engine_like, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=admin_like))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    stats = store.stats()
    assert stats.pinned == 0 and stats.pinned_bytes == 0  # every acquire was released
    assert stats.device.num_bytes <= 3 * ENTRY and stats.host.num_bytes <= 3 * ENTRY  # bounds hold again
    for info in store.list():  # what is cached agrees with the disk
        assert store.get(info.task_id).version == info.version


def test_prompt_store_imports_nothing_from_server():
    code = ("import sys, prompt_store; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'loadtest')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
