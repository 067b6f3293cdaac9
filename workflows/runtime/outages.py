"""Living through a database outage: retry what must reach the database, with backoff.

Used by the process that runs a node (claim, outcome, checkpoints outside the node's own
transaction) and by the worker that watches it. Only connection errors are retried; a
retried write that did land the first time is rejected by the engine's compare-and-set,
never applied twice.
"""

import contextlib
import logging
import time

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections

logger = logging.getLogger(__name__)

# What a database outage looks like from here: the server is gone or restarting.
OUTAGE_ERRORS = (OperationalError, InterfaceError)


def retry(action, *, what: str):
    """``action()``, retried with backoff while the database is unreachable.

    Returns (its result, a description of the wait or "" when none was needed). Gives up
    (raises) after KEEL_REPORT_RETRY_SECONDS: the attempt then stays running and the
    watchdog finds it.
    """
    deadline = time.monotonic() + settings.KEEL_REPORT_RETRY_SECONDS
    first_error: str = ""
    started = time.monotonic()
    delay = 0.25
    while True:
        try:
            result = action()
        except OUTAGE_ERRORS as error:
            drop_broken_connections()
            if not first_error:
                first_line = (str(error).strip().splitlines() or [""])[0]
                first_error = f"{type(error).__name__}: {first_line}"
                logger.warning(
                    "Could not %s, the database is unreachable (%s); retrying.", what, first_error
                )
            if time.monotonic() + delay > deadline:
                logger.error("Gave up trying to %s after %.0fs.", what, time.monotonic() - started)
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if not first_error:
            return result, ""
        waited = time.monotonic() - started
        logger.warning("Could %s after waiting %.1fs for the database.", what, waited)
        return result, f"waited {waited:.0f}s for the database ({first_error})"


def drop_broken_connections() -> None:
    """Close this thread's connections after an outage error: the next query reconnects."""
    for connection in connections.all(initialized_only=True):
        with contextlib.suppress(DatabaseError):
            connection.close()
