"""In-process wake-ups: discovery wakes when a run starts, watchers when files move.

Only a hint: other replicas make changes this process never hears about, so
every waiter also wakes on a timeout and re-reads the database.
"""

from __future__ import annotations

import threading


class ChangeFeed:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def notify(self) -> None:
        with self._condition:
            self._version += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Blocks until something changed after version `seen`, or timeout; returns the version."""
        with self._condition:
            self._condition.wait_for(lambda: self._version != seen, timeout)
            return self._version
