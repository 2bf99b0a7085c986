"""Test-only fault injection: `AUTOLOADER_TEST_FAULT=<point>` makes the process exit at that point.

The crash tests name every step of the write protocol (agent and control
plane) and check that a restart leaves the table equal to the sources.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

VARIABLE = "AUTOLOADER_TEST_FAULT"
EXIT_CODE = 17


def crash_point(point: str) -> None:
    """Exits the process at once (no cleanup, like a kill) if the environment names this point."""
    if os.environ.get(VARIABLE) == point:
        log.warning("test fault: exiting at %s", point, extra={"action": "test.fault"})
        logging.shutdown()
        os._exit(EXIT_CODE)


PAUSE_VARIABLE = "AUTOLOADER_TEST_PAUSE"


def pause_point(point: str) -> None:
    """Stops the whole process (SIGSTOP, every thread: no heartbeat either) if the environment names this point.

    The adversary's pause (a VM freeze, a long GC) at the worst moment; the test
    resumes the process with SIGCONT. Once per process.
    """
    if os.environ.get(PAUSE_VARIABLE) == point:
        del os.environ[PAUSE_VARIABLE]
        log.warning("test pause: stopping at %s", point, extra={"action": "test.pause"})
        # To this thread: the stop then takes effect before it runs another line (every thread stops).
        # os.kill() lets any thread take the signal, and this one could send its report meanwhile.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
