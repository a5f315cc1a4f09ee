"""The health of a run's server, shared by every client of the run: is it failing, since when, how long may it still.

An outage begins with the first failed attempt (a retried 5xx, 429, a refused connection, a time-out, a dropped
connection) and ends with the first success. Every client of a run (its workers, the checkpoint's reads of the
knowledge base, the start-up wait) reports to one ``OutageTracker``, and retries until the outage has lasted
``budget`` seconds (``client.outage_seconds``) counted from its first failure: four workers failing together spend
one budget, not four, and a call that starts failing late in an outage gets only what is left. A client made outside
a run (a notebook, ``connect``) has a tracker of its own with the same budget.

A read that succeeds does not end an outage of writes: a server whose disk is full still answers reads while every
write fails, and its outage must run out, not start over at each read in between.

``abort(exc)`` makes every retry that waits, and every later wait, raise ``exc`` at once: a run that is stopping
(a second Ctrl-C, an error elsewhere, a server that cannot come back) does not wait out the budget.

The clock is injectable (``clock``: monotonic seconds; ``wall``: the epoch time shown as HH:MM:SS; ``sleep``), so the
tests need no wall-clock windows. Why the default budget is 15 minutes: docs/client.md ("Retry policy").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

__all__ = ["OutageTracker", "duration_text"]


class OutageTracker:
    """One server's outage, if any, and the budget it may last (thread-safe; shared by a run's clients).

    Args:
        budget: seconds an outage may last, from its first failure, before the retries give up.
        quiet_seconds: an outage shorter than this is a blip (one dropped connection, one 503): it is not announced
            (``status`` is None, no warning, no "answering again" line).
        warn_every: seconds between two warnings of the same outage (``warning_due``).
        clock: monotonic seconds. wall: epoch seconds (shown as local HH:MM:SS). sleep: how to wait (None: a wait
            that ``abort`` cuts short).
    """

    def __init__(self, budget: float, *, quiet_seconds: float = 1.0, warn_every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.budget = budget
        self.quiet_seconds = quiet_seconds
        self.warn_every = warn_every
        self._clock, self._wall, self._sleep = clock, wall, sleep
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic time of the outage's first failure; None: the server answers
        self._since_wall = 0.0
        self._cause = ""  # the last failure, as words after "server": "answering 500", "refusing connections"
        self._writes_failing = False
        self._warned_at: float | None = None  # when the current outage was last announced
        self._aborted = threading.Event()
        self._abort_exc: BaseException | None = None

    # ---- what the clients report ----------------------------------------------------------------------------

    def failed(self, cause: str, *, write: bool) -> None:
        """An attempt failed in a way worth another; ``cause`` in words after "server" ("answering 500")."""
        with self._lock:
            if self._since is None:
                self._since, self._since_wall = self._clock(), self._wall()
                self._warned_at = None
                self._writes_failing = False
            self._cause = cause
            self._writes_failing = self._writes_failing or write

    def succeeded(self, *, write: bool) -> tuple[float, str] | None:
        """An answer came. When it ends an announced outage: (how long it lasted, its last cause in words)."""
        if self._since is None:  # the common case, without the lock
            return None
        with self._lock:
            if self._since is None or (self._writes_failing and not write):
                return None
            lasted = self._clock() - self._since
            announced = self._warned_at is not None or lasted >= self.quiet_seconds
            cause = self._cause
            self._since, self._warned_at, self._writes_failing = None, None, False
        return (lasted, cause) if announced else None

    # ---- what the clients ask -------------------------------------------------------------------------------

    def now(self) -> float:
        """The tracker's clock (monotonic seconds)."""
        return self._clock()

    @property
    def failing(self) -> bool:
        return self._since is not None

    def lasted(self) -> float:
        """Seconds since the outage's first failure (0 when the server answers)."""
        since = self._since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def left(self) -> float:
        """Seconds the outage may still last before the retries give up (the whole budget when there is none)."""
        return max(0.0, self.budget - self.lasted())

    def spent(self) -> bool:
        return self._since is not None and self.lasted() >= self.budget

    def since(self) -> str:
        """The local time of the outage's first failure, HH:MM:SS."""
        return datetime.fromtimestamp(self._since_wall).strftime("%H:%M:%S")

    def status(self, server: str = "server", *, blips: bool = False) -> str | None:
        """``server answering 500 since 12:03:04, retrying (873 s left)``; None when the server answers, or when the
        outage is still a blip (unless ``blips``)."""
        with self._lock:
            if self._since is None:
                return None
            lasted = self._clock() - self._since
            if lasted < self.quiet_seconds and not blips:
                return None
            cause = self._cause
        return f"{server} {cause} since {self.since()}, retrying ({max(0.0, self.budget - lasted):.0f} s left)"

    def warning_due(self, server: str = "server") -> str | None:
        """The status, when it is time to log it: once the outage is past a blip, then every ``warn_every`` s."""
        status = self.status(server)
        if status is None:
            return None
        with self._lock:
            now = self._clock()
            if self._warned_at is not None and now - self._warned_at < self.warn_every:
                return None
            self._warned_at = now
        return status

    def past_budget(self, since: float | None = None) -> str:
        """Why the retries gave up, for a message: the last cause, since when, for how long, and the budget.
        ``since``: a call's own first failure (on this clock), when the call ran out of budget before the outage
        did (a success of another request, or of a read in between, ended an outage of its route's failures)."""
        now = self._clock()
        if since is None:
            since, wall = (self._since if self._since is not None else now), self._since_wall
        else:
            wall = self._wall() - (now - since)
        return (f"the server has been {self._cause} since {datetime.fromtimestamp(wall).strftime('%H:%M:%S')} "
                f"({duration_text(now - since)}), longer than client.outage_seconds ({self.budget:g} s)")

    # ---- waiting, and stopping every wait -------------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; raise the abort exception at once if ``abort`` is called before or meanwhile."""
        self.check()
        if self._sleep is not None:
            self._sleep(seconds)
        elif seconds > 0:
            self._aborted.wait(seconds)
        self.check()

    def abort(self, exc: BaseException) -> None:
        """Every wait, now and later, raises ``exc`` (the first abort's) at once. Requests in flight run on."""
        with self._lock:
            if self._abort_exc is None:
                self._abort_exc = exc
        self._aborted.set()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    @property
    def abort_cause(self) -> BaseException | None:
        """The exception the first ``abort`` gave, or None."""
        return self._abort_exc

    def check(self) -> None:
        """Raise the abort exception, if ``abort`` was called."""
        if self._abort_exc is not None:
            raise self._abort_exc


def duration_text(seconds: float) -> str:
    """A duration for people: ``8.2 s``, ``15 min 3 s``, ``2 h 5 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"
