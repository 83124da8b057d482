"""CPU seconds of a local server process (optional `--server-pid`): a figure that neighbours' load distorts less."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class ProcessError(RuntimeError):
    """The process cannot be read (gone, or not on this machine's /proc)."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (all its threads), from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise ProcessError(f"cannot read process {pid}: {exc}") from None
    # The command name (field 2) may hold spaces and parentheses: split after its closing ")".
    fields = text[text.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuUse:
    """Server CPU over a run."""

    pid: int
    cpu_s: float
    wall_s: float
    generated_tokens: int

    @property
    def cores_busy(self) -> float:
        """Average number of cores the server kept busy."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        """Generated tokens per server CPU second."""
        return self.generated_tokens / self.cpu_s if self.cpu_s > 0 else 0.0
