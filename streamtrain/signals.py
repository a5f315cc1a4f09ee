"""What stops a run from outside its own work: Ctrl-C and SIGTERM (or a caller's stop event), requests the dispatcher
answers where its bookkeeping is whole. (Stopping the run's clients' retries at once is ``outage.OutageTracker.abort``.)"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class StopSignals:
    """Ctrl-C and SIGTERM during a run, turned into flags that the dispatcher reads where its state is whole.

    An exception raised by a signal handler lands between any two bytecodes: between advancing the read position
    and marking a sample in flight, or between finishing a sample and counting it. The checkpoint written after it
    would then skip that sample or lose its counts. So the first signal only asks the run to stop: no sample is
    dispatched any more, each worker finishes the one it holds, and an 'interrupt' checkpoint is written. The
    second stops waiting for the workers (their samples stay unfinished; the next run replays them from the
    journal). The third raises KeyboardInterrupt at once and no checkpoint is written: the last checkpoint and the
    journal still resume exactly, as after a crash.

    A third signal that lands inside a library that guards its state with locks of its own (``LOCKING_LIBRARIES``:
    logging, httpx/httpcore, tqdm, datasets...) is raised at the dispatcher's next check (``raise_if_pending``, at
    most 0.2 s later while it dispatches) or when the run's signals are uninstalled. Such locks are taken in Python
    code before a ``try`` (CPython 3.11's ``logging.Handler.handle``; httpcore's ``ThreadLock.__enter__``), so an
    exception raised there leaves the lock held: the workers of the process's next run blocked forever on their
    first log line, and closing the run's HTTP client blocked on its connection pool. A fourth signal raises at once
    wherever it lands (for a main thread stuck in a library call): a library's lock may then stay held, so a
    notebook's kernel should be restarted before it trains again.

    ``stop`` is the caller's event when given (``train(..., stop=event)``): setting it is one Ctrl-C, from any thread,
    also where no signal handler can be installed (a call in a background thread); a first signal sets it too.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.received = 0
        self.stop = stop if stop is not None else threading.Event()
        self.abandon = threading.Event()
        self.pending = False  # a third signal that came inside a locking library: KeyboardInterrupt owed

    def _handle(self, signum: int, frame: Any) -> None:
        # no logging here: the handler may run inside a logging call of the same thread
        self.received += 1
        if self.received == 1:
            self.stop.set()
        elif self.received == 2:
            self.abandon.set()
        elif self.received == 3 and _in_locking_library(frame):
            self.pending = True
        else:
            raise KeyboardInterrupt

    def raise_if_pending(self) -> None:
        """The KeyboardInterrupt a third signal owes, where the caller's state allows it."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread: nothing to catch here
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.raise_if_pending()


# Top-level packages whose Python code takes locks before a ``try`` that would release them: a KeyboardInterrupt raised
# inside them can leave a lock held for the rest of the process.
LOCKING_LIBRARIES = frozenset({
    "logging", "httpx", "httpcore", "h11", "anyio", "tqdm", "datasets", "fsspec", "pyarrow", "huggingface_hub",
    "filelock", "tokenizers", "tiktoken",
})


def _in_locking_library(frame: FrameType | None) -> bool:
    """Whether the interrupted code runs inside one of LOCKING_LIBRARIES (one of its locks may be held)."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.partition(".")[0] in LOCKING_LIBRARIES:
            return True
        frame = frame.f_back
    return False
