"""100,000 distinct unknown task ids against a real `promptserve serve`: all 404, server memory flat.

    python bench/unknown_ids.py                 # 100,000 ids, 32 in flight (a few minutes on 2 cores)
    python bench/unknown_ids.py --num-ids 20000

Prints the server's RSS after each tenth of the ids, the status counts, and /metrics' label count.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from overload import start_server  # (same server start-up)


async def ask(url: str, ids: range, concurrency: int, statuses: dict[object, int]) -> None:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                route = ("/generate", "/v1/completions")[i % 2]
                body = ({"task_id": f"nope-{i:06d}", "inputs": "x"} if i % 2 == 0 else
                        {"model": f"nope-{i:06d}", "prompt": "x", "max_tokens": 1})
                try:
                    status = (await c.post(route, json=body)).status_code
                except httpx.TransportError as e:  # counted, not fatal: the figure must say how many
                    status = f"transport:{type(e).__name__}"
                statuses[status] = statuses.get(status, 0) + 1
        await asyncio.gather(*(one(i) for i in ids))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-ids", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: overload.py's tiny llama)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(8, 256, Path(tmp), args.model_dir)
        url = server.url
        print(f"server log: {server.log} (kept until the end)", flush=True)
        try:
            process = psutil.Process(server.proc.pid)
            statuses: dict[object, int] = {}
            step = args.num_ids // 10
            started = time.monotonic()
            for k in range(10):
                asyncio.run(ask(url, range(k * step, (k + 1) * step), args.concurrency, statuses))
                print(f"{(k + 1) * step:>7} ids: server RSS {process.memory_info().rss / (1 << 20):.1f} MiB, "
                      f"{time.monotonic() - started:.0f} s", flush=True)
            metrics = httpx.get(url + "/metrics").text
            labels = sum(1 for line in metrics.splitlines() if line.startswith("promptserve_task_requests_total{"))
            store = [line for line in metrics.splitlines() if line.startswith("promptserve_prompt_store_")
                     and ("entries" in line or "not_found" in line) and not line.startswith("#")]
            print(f"statuses {statuses}; task labels in /metrics: {labels}; " + "; ".join(store))
            if set(statuses) != {404}:
                print(server.log.read_text()[-4000:])
            return 0 if set(statuses) == {404} else 1
        finally:
            print(f"server exit status after SIGTERM: {server.stop(grace_s=60)}")


if __name__ == "__main__":
    sys.exit(main())
