"""StopSignals on its own: where a third Ctrl-C may raise KeyboardInterrupt, where it must wait, and the fourth."""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading

import pytest

from streamtrain.signals import StopSignals


def _signal_on_return_from_acquire(frame, event, arg):
    """Sends SIGINT as logging's Handler.acquire returns the lock to Handler.handle, before handle's ``try``: the
    one place where a KeyboardInterrupt leaves the handler's lock held for good (CPython 3.11's handle)."""
    if event == "return" and frame.f_code.co_name == "acquire" and frame.f_globals.get("__name__") == "logging":
        sys.settrace(None)
        os.kill(os.getpid(), signal.SIGINT)
    return _signal_on_return_from_acquire


def _log_from_another_thread(log: logging.Logger, message: str) -> None:
    worker = threading.Thread(target=log.warning, args=(message,), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "the handler's lock was left held: this thread blocks on it forever"


def test_a_third_signal_inside_a_logging_call_is_raised_after_it():
    """The third signal lands inside a log call: the KeyboardInterrupt is owed, not raised there, so the handler's
    lock is released; another thread (a later run's worker) can still log, and the interrupt comes on leaving."""
    log = logging.getLogger("streamtrain.test-signals")
    handler = logging.StreamHandler(io.StringIO())
    log.addHandler(handler)
    log.propagate = False
    signals = StopSignals()
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.installed():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                assert signals.stop.is_set() and signals.abandon.is_set()
                sys.settrace(_signal_on_return_from_acquire)
                try:
                    log.warning("the third Ctrl-C arrives while this is written")
                finally:
                    sys.settrace(None)
                assert signals.received == 3 and signals.pending
                _log_from_another_thread(log, "a worker's line")
        assert not signals.pending
        _log_from_another_thread(log, "a later run's worker's line")
        assert handler.stream.getvalue().count("\n") == 3
    finally:
        log.removeHandler(handler)
        log.propagate = True


def _signal_on_return_from_pool_lock(frame, event, arg):
    """Sends SIGINT as httpcore's ThreadLock.__enter__ returns, its lock acquired: an exception raised there leaves
    the lock held (the ``with`` block was never entered), and closing the client blocks on it for good."""
    if (event == "return" and frame.f_code.co_name == "__enter__"
            and frame.f_globals.get("__name__") == "httpcore._synchronization"):
        sys.settrace(None)
        os.kill(os.getpid(), signal.SIGINT)
    return _signal_on_return_from_pool_lock


def test_a_third_signal_inside_an_http_call_is_raised_after_it(server):
    """The third signal lands inside httpcore, its connection pool's lock just taken: the KeyboardInterrupt is owed,
    the call completes, and the client closes (it blocked forever on the lock the interrupt left held)."""
    import httpx

    signals = StopSignals()
    client = httpx.Client(base_url=server.url, timeout=10)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.installed():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                sys.settrace(_signal_on_return_from_pool_lock)
                try:
                    assert client.get("/health").status_code == 200
                finally:
                    sys.settrace(None)
                assert signals.received == 3 and signals.pending
        closing = threading.Thread(target=client.close, daemon=True)
        closing.start()
        closing.join(timeout=5)
        assert not closing.is_alive(), "the pool's lock was left held: closing the client blocks on it forever"
    finally:
        sys.settrace(None)


def test_a_fourth_signal_raises_wherever_it_lands():
    """A third signal owed (it came inside a library), the fourth raises at once: a way out of a long library call."""
    log = logging.getLogger("streamtrain.test-signals-4")
    signals = StopSignals()
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals.installed():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            sys.settrace(_signal_on_return_from_acquire)
            try:
                log.warning("the third Ctrl-C arrives while this is written")
            finally:
                sys.settrace(None)
            assert signals.pending
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the fourth signal")
    assert reached == [] and signals.received == 4


def test_a_third_signal_elsewhere_raises_at_once():
    signals = StopSignals()
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals.installed():
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the third signal")
    assert reached == [] and not signals.pending
