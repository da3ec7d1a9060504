"""Ctrl-C that never lands inside psycopg.

A KeyboardInterrupt raised while psycopg is between sending a statement and
reading its result leaves the connection busy ("another command is already
in progress"): the rollback after it fails, psycopg logs the failure, and
the next statement (recording the run as interrupted) raises an
OperationalError that read as "lost the database" (exit 3). So while an eval
runs, a SIGINT that arrives inside psycopg is only noted, and raised as
KeyboardInterrupt at the runner's next ``check()`` (after each database call
it makes, before each forward pass and judge call) or when the block ends;
anywhere else it raises at once, as usual. The statement in flight finishes
(an eval's are short: one image's neighbour search, one item's verdicts),
the connection stays usable, and the run is recorded as interrupted on it.
No timer re-sends the signal: a late one could hit whatever runs next.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


def _in_psycopg(frame: FrameType | None) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).split(".")[0] == "psycopg":
            return True
        frame = frame.f_back
    return False


class Interrupts:
    """What ``deferred_in_psycopg`` saw: ``interrupted`` once any SIGINT arrived."""

    def __init__(self) -> None:
        self.interrupted = False
        self.pending = False  # arrived inside psycopg, not raised yet

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True
        if _in_psycopg(frame):
            self.pending = True
            return
        self.pending = False
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise the interrupt that arrived inside psycopg, if any: call it where one is safe."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


@contextmanager
def deferred_in_psycopg() -> Iterator[Interrupts]:
    """Install the SIGINT handler above for the block (main thread only; elsewhere a no-op that
    reports nothing), then restore the previous one and raise an interrupt still pending."""
    state = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.signal(signal.SIGINT, state._handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
    state.check()
