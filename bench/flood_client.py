"""A lean HTTP/1.1 client for floods: keep-alive connections on asyncio streams, one request each at a time.

A flood of hundreds of requests a second through httpx costs the load generator most of a CPU core; on a
small machine that core is the server's, and the benchmark would measure the client. This one sends a
prebuilt request and reads back only the status and the body's length: a few times cheaper.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from urllib.parse import urlsplit


class FloodClient:
    """POSTs one of `bodies` (JSON, picked at random) to `path` with `headers`; `send()` returns the status
    code (0 on failure) and the response body."""

    def __init__(self, url: str, path: str, bodies: list[dict], headers: dict[str, str], rng: random.Random):
        parts = urlsplit(url)
        self._host, self._port = parts.hostname, parts.port or 80
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._requests = []
        for body in bodies:
            payload = json.dumps(body).encode()
            self._requests.append((f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: "
                                   f"application/json\r\nContent-Length: {len(payload)}\r\n{head}\r\n").encode() + payload)
        self._rng = rng
        self._idle: deque = deque()

    async def send(self) -> tuple[int, bytes]:
        """One request on an idle connection (or a new one)."""
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self._host, self._port)
        try:
            writer.write(self._rng.choice(self._requests))
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            self._idle.append((reader, writer))
            return int(status_line.split()[1]), body
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            writer.close()
            return 0, b""

    def close(self) -> None:
        """Close the idle connections."""
        while self._idle:
            self._idle.pop()[1].close()


async def poisson_arrivals(rate: float, seconds: float, rng: random.Random,
                           start_one: Callable[[], Coroutine]) -> None:
    """`start_one()` at Poisson arrivals of `rate` per second for `seconds`; waits for every one started."""
    tasks, end = [], time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        tasks.append(asyncio.create_task(start_one()))
        await asyncio.sleep(max(0.0, rng.expovariate(rate) - (time.perf_counter() - now)))
    await asyncio.gather(*tasks)


async def poisson_flood(client: FloodClient, rate: float, seconds: float, rng: random.Random,
                        on_done: Callable[[int, bytes, float], None]) -> None:
    """Requests at Poisson arrivals of `rate` per second for `seconds`; `on_done(status, body, latency_s)`."""
    async def one() -> None:
        t0 = time.perf_counter()
        status, body = await client.send()
        on_done(status, body, time.perf_counter() - t0)

    await poisson_arrivals(rate, seconds, rng, one)
    client.close()
