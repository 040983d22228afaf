"""Progress lines for long reads: at most one every PROGRESS_SECONDS per restriction."""
from __future__ import annotations

import logging
import time

PROGRESS_SECONDS = 15.0  # a line per restriction at most this often

_log = logging.getLogger(__name__)


class Progress:
    """Logs how far a worker is through one restriction of one object, now and then."""

    def __init__(self, uri: str, start: int, stop: int, unit: str):
        self._uri, self._start, self._stop, self._unit = uri, start, stop, unit
        self._next = time.monotonic() + PROGRESS_SECONDS

    def update(self, position: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + PROGRESS_SECONDS
        done = (position - self._start) / max(1, self._stop - self._start)
        _log.info('ragbeam: %s: %s %d of [%d, %d) (%.0f%% of this range)', self._uri, self._unit,
                  position, self._start, self._stop, 100 * done)
