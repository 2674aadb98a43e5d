"""Warnings that a flood cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import time


class ThrottledWarning:
    """Log the first occurrence, then at most one line per `interval_s` counting what was suppressed.

    A peer that sends 300,000 bad frames costs a few log lines, not 300,000."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.total = 0
        self._suppressed = 0
        self._last = float("-inf")

    def __call__(self, fmt: str, *args) -> None:
        self.total += 1
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        suffix = f" (and {self._suppressed} more like it in the last {now - self._last:.0f}s)" if self._suppressed else ""
        self.logger.warning(fmt + suffix, *args)
        self._last, self._suppressed = now, 0
