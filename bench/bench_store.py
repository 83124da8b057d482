"""Prompt store figures: hot-hit latency, cold-load latency (20x4096 fp16), bytes per cached task, list() at 100k.

    python bench/bench_store.py                       # CPU, about a minute here
    python bench/bench_store.py --device cuda --dtype bfloat16

The 100,000-task tree is made with hard links (one real folder per task, the files shared) under --list-root
(default: a tmpfs folder when /dev/shm exists, because creating 100,000 folders on this VM's ext4 takes minutes;
stat cost, which is what list() pays, was measured the same on both).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from prompt_store import PromptStore
from prompt_store.task_list import RACY_NS

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def timed(fn, repeats: int) -> list[float]:
    """Seconds per call, one sample per call."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def bench_hot_hit(store: PromptStore, repeats: int) -> None:
    store.get("hot")
    start = time.perf_counter()
    for _ in range(repeats):
        store.get("hot")
    per_get = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        store.release(store.acquire("hot"))
    per_pair = (time.perf_counter() - start) / repeats
    print(f"hot hit: get {per_get * 1e6:.2f} us, acquire+release {per_pair * 1e6:.2f} us  (mean of {repeats})")


def bench_cold_load(root: Path, args, repeats: int) -> None:
    # Zero-byte tiers: nothing stays cached, so every get reads, validates, hashes and converts again.
    cold = PromptStore(root, token_dim=4096, device=args.device, dtype=args.dtype, max_device_bytes=0,
                       max_host_bytes=0)
    samples = timed(lambda: cold.get("hot"), repeats)
    if cold.device.type == "cuda":
        torch.cuda.synchronize()
    print(f"cold load 20x4096 (file fp32 -> {args.dtype}, {args.device}): median "
          f"{statistics.median(samples) * 1e3:.3f} ms, p90 {sorted(samples)[int(0.9 * repeats)] * 1e3:.3f} ms "
          f"(OS page cache warm; {repeats} loads)")


def bench_bytes_per_task(root: Path, args, count: int) -> None:
    writer = PromptStore(root, token_dim=4096, max_device_bytes=0, max_host_bytes=0)
    for i in range(count):
        writer.put(f"mem-{i}", torch.randn(20, 4096))
    store = PromptStore(root, token_dim=4096, device=args.device, dtype=args.dtype)
    gc.collect()
    tracemalloc.start()
    rss_before, traced_before = rss_bytes(), tracemalloc.get_traced_memory()[0]
    for i in range(count):
        store.get(f"mem-{i}")
    gc.collect()
    python_bytes = (tracemalloc.get_traced_memory()[0] - traced_before) / count
    rss_per_task = (rss_bytes() - rss_before) / count
    tracemalloc.stop()
    tensor = store.get("mem-0").num_bytes
    print(f"bytes per cached task ({count} tasks of 20x4096 {args.dtype}): tensor {tensor} + python objects "
          f"{python_bytes:.0f} (traced); process RSS growth {rss_per_task:.0f}")


def make_tree(root: Path, count: int) -> None:
    seed = PromptStore(root, token_dim=64)
    seed.put("task-0000000", torch.randn(20, 64))
    src = root / "task-0000000"
    for i in range(1, count):
        folder = root / f"task-{i:07d}"
        folder.mkdir()
        os.link(src / "adapter_config.json", folder / "adapter_config.json")
        os.link(src / "adapter_model.safetensors", folder / "adapter_model.safetensors")


def bench_list(root: Path, count: int) -> None:
    start = time.perf_counter()
    make_tree(root, count)
    print(f"made {count} task folders in {time.perf_counter() - start:.1f} s under {root}")
    store = PromptStore(root, token_dim=64)
    gc.collect()
    rss_before = rss_bytes()
    start = time.perf_counter()
    infos = store.list()
    first = time.perf_counter() - start
    index_bytes = (rss_bytes() - rss_before) / count  # includes the returned list of TaskInfo
    assert len(infos) == count and all(info.error is None for info in infos)
    # The first list() made .promptserve/ (the hint's folder): the root changed. Wait out the racy window
    # (task_list.RACY_NS) so that the next rescan's stamp of the root is trusted.
    time.sleep(RACY_NS / 1e9 + 0.1)
    rescans = []
    for _ in range(3):
        store.refresh()  # forces the next list() to rescan: stat every folder, read none
        rescans.extend(timed(store.list, 1))
    warm = timed(store.list, 20)
    assert len(store.list()) == count
    page = timed(lambda: store.list(prefix=f"task-{count // 2 // 100:05d}", limit=50), 1000)
    after = timed(lambda: store.list(after=f"task-{count // 3:07d}", limit=100), 1000)
    start = time.perf_counter()
    assert len(PromptStore(root, token_dim=64).list()) == count  # a new store: starts from the hint file
    from_hint = time.perf_counter() - start
    print(f"list() at {count} tasks: first {first:.2f} s (reads each config + safetensors header, writes the "
          f"hint file), rescan {min(rescans):.2f} s (stat only; min of 3), warm {statistics.median(warm) * 1e3:.2f} ms "
          f"(root unchanged: 1 stat; median of 20, max {max(warm) * 1e3:.2f} ms), a new process's first "
          f"{from_hint:.2f} s (hint file + stats); index + result {index_bytes:.0f} bytes per task (RSS growth)")
    print(f"paged list() at {count} tasks: prefix + limit=50 {statistics.median(page) * 1e6:.1f} us, "
          f"after + limit=100 {statistics.median(after) * 1e6:.1f} us (median of 1000)")
    middle = f"task-{count // 2:07d}"
    store.get(middle)
    samples = timed(lambda: store.get(middle), 10000)
    print(f"hit at {count} tasks: {statistics.mean(samples) * 1e6:.2f} us; "
          f"miss of an unknown id: {statistics.mean(timed(lambda: _missing(store), 2000)) * 1e6:.1f} us")


def _missing(store: PromptStore) -> None:
    try:
        store.get("no-such-task")
    except Exception:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks for the list() figure")
    parser.add_argument("--cached-tasks", type=int, default=300, help="tasks for the bytes-per-task figure")
    parser.add_argument("--list-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    list_root = Path(tempfile.mkdtemp(prefix="bench-store-list-", dir=args.list_root))
    try:
        store = PromptStore(work / "a", token_dim=4096, device=args.device, dtype=args.dtype)
        store.put("hot", torch.randn(20, 4096))
        print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, {os.cpu_count()} CPUs")
        bench_hot_hit(store, 200_000)
        bench_cold_load(work / "a", args, 300)
        bench_bytes_per_task(work / "b", args, args.cached_tasks)
        bench_list(list_root, args.tasks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(list_root, ignore_errors=True)


if __name__ == "__main__":
    main()
