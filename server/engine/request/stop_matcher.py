"""Stop sequences matched on the output text, across token boundaries (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextUpdate:
    """What one step releases: text safe to stream now, and whether a stop sequence ended the output."""

    text: str
    is_stopped: bool


class StopMatcher:
    """Accumulates text; holds back a tail that could still become a stop sequence."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = tuple(s for s in stops if s)
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._emitted = 0  # characters of _text already released

    @property
    def text(self) -> str:
        """The output so far (without any stop sequence once stopped)."""
        return self._text

    def feed(self, delta: str) -> TextUpdate:
        """Add decoded text; cut at the first stop sequence found."""
        start = max(0, len(self._text) - self._max_len + 1)
        self._text += delta
        cut = self._find_stop(start)
        if cut is not None:
            self._text = self._text[:cut]
            return TextUpdate(self._release(len(self._text)), is_stopped=True)
        return TextUpdate(self._release(len(self._text) - self._held_back()), is_stopped=False)

    def finish(self) -> str:
        """Release everything still held back (the output ended for another reason)."""
        return self._release(len(self._text))

    def _find_stop(self, start: int) -> int | None:
        found = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        # Longest suffix of the text that is a proper prefix of some stop sequence.
        for size in range(min(self._max_len - 1, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self._text[self._emitted:upto]
        self._emitted = upto
        return out
