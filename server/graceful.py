"""GracefulServer: uvicorn that drains on SIGTERM and then exits 0 (uvicorn itself re-raises the signal)."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT: mark the app draining (new requests 503), let in-flight ones finish, stop.

    uvicorn re-raises a caught signal after its graceful shutdown so the exit status says "killed by
    SIGTERM" (-15). For a server SIGTERM is the normal way to stop (Docker, systemd, Kubernetes), and a
    graceful stop is a success, so SIGTERM is not re-raised: `promptserve serve` exits 0. SIGINT keeps
    uvicorn's behaviour (a second Ctrl-C forces the exit).
    """

    def __init__(self, config: uvicorn.Config, on_drain=None):
        super().__init__(config)
        self._on_drain = on_drain or (lambda: None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Start the graceful shutdown; remember only signals other than SIGTERM for re-raising."""
        self._on_drain()
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
