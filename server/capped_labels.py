"""Metric label values with a cap on how many distinct ones there are (tasks, tenants)."""

from __future__ import annotations


class CappedLabels:
    """The first `max_labels` distinct values label themselves; the rest share `other`."""

    def __init__(self, max_labels: int, other: str):
        self._max_labels = max_labels
        self._other = other
        self._values: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._values:
            return value
        if len(self._values) < self._max_labels:
            self._values.add(value)
            return value
        return self._other

    def forget(self, value: str) -> bool:
        """Free `value`'s place; False if it had none."""
        if value not in self._values:
            return False
        self._values.discard(value)
        return True
