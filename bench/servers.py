"""Servers the benchmarks start (the one copy): a free loopback port, the `promptserve serve` command, and a
server process waited for on its readiness route and stopped with every process it started.

    port = free_port()
    server = ServerProcess("promptserve", promptserve_command("--model", m, "--port", str(port)), log, port)
    server.wait_ready(300)            # seconds it took; RuntimeError with the log's tail if it died
    ... server.url ...
    status = server.stop()            # SIGTERM to its process group, SIGKILL after grace_s; exit status

Used by bench_peer (peer_servers.py), bench_http, bench_scaleout, bench_fairness, overload and unknown_ids.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

POLL_S = 0.25  # between two readiness checks


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promptserve_command(*flags: str, python: str = sys.executable) -> list[str]:
    """`promptserve serve FLAGS` as `python -m server.cli serve FLAGS`: the installed package (this tree when
    installed editable), or the tree in ServerProcess's `cwd` (bench_fairness's baseline commit)."""
    return [python, "-m", "server.cli", "serve", *flags]


def group_stats(pgid: int) -> list[list[str]]:
    """/proc stat fields (after "(comm)") of the live, non-zombie processes of a process group."""
    stats = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state ppid pgrp ... utime(11) stime(12)
            stats.append(fields)
    return stats


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (children included)."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum(int(f[11]) + int(f[12]) for f in group_stats(pgid)) / tick


class ServerProcess:
    """A server in its own process group (pgid = proc.pid), stdout and stderr in the file `log`; `url` is
    http://127.0.0.1:port, and it is ready once `ready` (a path) answers 200. `env` and `cwd`: this
    process's when None. stop() ends the whole group."""

    def __init__(self, name: str, cmd: list[str], log: Path, port: int, *, ready: str = "/ready",
                 env: dict[str, str] | None = None, cwd: Path | str | None = None) -> None:
        self.name, self.cmd, self.log = name, cmd, Path(log)
        self.url = f"http://127.0.0.1:{port}"
        self.ready_url = f"{self.url}{ready}"
        self.started = time.perf_counter()
        with open(self.log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from the start until ready_url answers 200; RuntimeError (with the log's tail) if the
        server exits first or is not ready `timeout_s` after its start."""
        deadline = self.started + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(POLL_S)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, num_lines: int = 8) -> str:
        """The last lines of the server's log, on one line each."""
        lines = self.log.read_text(errors="replace").splitlines()[-num_lines:]
        return " | ".join(line.strip()[:200] for line in lines)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM to the whole group, SIGKILL to what is left after `grace_s`; safe to call twice. The
        server's exit status (None if it could not be reaped)."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if self.is_gone():
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.perf_counter() + wait_s
            while time.perf_counter() < deadline and not self.is_gone():
                time.sleep(0.2)
        return self.proc.poll()

    @contextmanager
    def paused(self):
        """SIGSTOP the whole group for the block, SIGCONT after. An idle server is not idle to its neighbour:
        vLLM's idle processes wake about 1,300 times a second (0.5 % of a core), and each wake-up preempts
        one of the other server's OpenMP threads, which stalls the parallel region it is in."""
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def is_gone(self) -> bool:
        """Whether the server and every process it started have exited."""
        return self.proc.poll() is not None and not group_stats(self.proc.pid)
