"""Ctrl-C and SIGTERM during a run: requests the dispatcher answers where its bookkeeping is whole."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0
        self.stop = threading.Event()
        self.abandon = threading.Event()

    def _handle(self, signum: int, frame: Any) -> None:
        # no logging here: the handler may run inside a logging call of the same thread
        self.received += 1
        if self.received == 1:
            self.stop.set()
        elif self.received == 2:
            self.abandon.set()
        else:
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
