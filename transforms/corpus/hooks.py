"""Test hooks of the commit: die or wait at a named point, as a killed or slow driver would."""
from __future__ import annotations

import os
import time

CRASH_ENV = 'RAGBEAM_TEST_CRASH_AT'  # tests: die (os._exit) at a named point of the commit
DELAY_ENV = 'RAGBEAM_TEST_DELAY_AT'  # tests: POINT:SECONDS, wait there (another run commits)


def crash_point(name: str) -> None:
    """Dies here when the tests ask for it (RAGBEAM_TEST_CRASH_AT=name): a SIGKILL's effect;
    or waits here (RAGBEAM_TEST_DELAY_AT=name:seconds), as a slow driver would."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)
    point, _, seconds = os.environ.get(DELAY_ENV, '').partition(':')
    if point == name:
        time.sleep(float(seconds))
