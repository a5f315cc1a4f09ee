"""The outage tracker (streamtrain/client/outage.py) on an injected clock, and what a client reports to it.

No test here waits for a wall-clock window: the clock moves when the test (or a client's wait) moves it.
"""

from __future__ import annotations

import socket
import threading
from datetime import datetime

import httpx
import pytest

from streamtrain.client import KatoClient
from streamtrain.client.outage import OutageTracker
from streamtrain.config import ClientConfig
from streamtrain.errors import MaybeApplied, ServerUnavailable

WALL = datetime(2026, 3, 4, 5, 6, 7).timestamp()  # shown as 05:06:07


class Clock:
    """Monotonic seconds that move only when told (or when a client sleeps)."""

    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL + self.t - 5000.0

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def tracker(budget: float = 900, **kw) -> tuple[OutageTracker, Clock]:
    clock = Clock()
    return OutageTracker(budget, clock=clock, wall=clock.wall, sleep=clock.sleep, **kw), clock


def test_an_outage_counts_down_from_its_first_failure_and_ends_at_the_first_success() -> None:
    outage, clock = tracker(900)
    assert outage.status() is None and outage.left() == 900 and not outage.spent() and not outage.failing
    outage.failed("answering 500", write=True)
    clock.t += 1
    assert outage.status() == "server answering 500 since 05:06:07, retrying (899 s left)"
    clock.t += 99
    outage.failed("refusing connections", write=False)  # the last cause is shown; the outage began at its first
    assert outage.status("server http://x") == "server http://x refusing connections since 05:06:07, retrying (800 s left)"
    assert outage.left() == 800 and not outage.spent()
    clock.t += 800
    assert outage.spent() and outage.left() == 0
    assert outage.status() == "server refusing connections since 05:06:07, retrying (0 s left)"
    assert outage.past_budget() == ("the server has been refusing connections since 05:06:07 (15 min 0 s), longer "
                                    "than client.outage_seconds (900 s)")
    assert outage.succeeded(write=True) == (900, "refusing connections")
    assert outage.status() is None and outage.left() == 900 and not outage.failing
    clock.t += 10
    outage.failed("timing out", write=True)  # a new outage begins at its own first failure
    clock.t += 5
    assert outage.status() == "server timing out since 05:21:17, retrying (895 s left)"  # 910 s after the first


def test_a_read_does_not_end_an_outage_of_writes() -> None:
    """A full disk: reads go through while every write fails. The outage runs out instead of starting over."""
    outage, clock = tracker(60)
    outage.failed("answering 500", write=True)
    clock.t += 30
    assert outage.succeeded(write=False) is None and outage.failing and outage.left() == 30
    outage.failed("answering 500", write=False)  # a read failing too does not forget the writes
    assert outage.succeeded(write=False) is None and outage.failing
    assert outage.succeeded(write=True) == (30, "answering 500") and not outage.failing
    outage.failed("refusing connections", write=False)  # only reads failed: a read ends it
    clock.t += 2
    assert outage.succeeded(write=False) == (2, "refusing connections") and not outage.failing


def test_a_blip_is_not_announced() -> None:
    """One dropped connection, one 503: shorter than quiet_seconds, nothing to say (the bar, the log)."""
    outage, clock = tracker(900, quiet_seconds=1.0)
    outage.failed("dropping connections", write=True)
    clock.t += 0.4
    assert outage.status() is None and outage.warning_due() is None
    assert outage.status(blips=True) == "server dropping connections since 05:06:07, retrying (900 s left)"
    assert outage.succeeded(write=True) is None and not outage.failing


def test_warnings_come_once_the_outage_is_past_a_blip_then_every_warn_every_seconds() -> None:
    outage, clock = tracker(900, quiet_seconds=1.0, warn_every=30.0)
    outage.failed("answering 500", write=True)
    said = []
    for _ in range(300):
        clock.t += 1
        status = outage.warning_due()
        if status is not None:
            said.append(status)
    lefts = [int(s.split("(")[1].split()[0]) for s in said]
    assert lefts == [899, 869, 839, 809, 779, 749, 719, 689, 659, 629]  # counting down from the budget
    assert outage.succeeded(write=True) == (300, "answering 500")


def test_abort_makes_every_wait_raise_at_once() -> None:
    """A waiting retry (real time: nothing injected) raises the abort's exception at once, and so does every later
    wait; the first abort's exception is the one raised."""
    outage = OutageTracker(900)
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            outage.sleep(600)
        except ServerUnavailable as exc:
            raised.append(exc)

    waiting = threading.Thread(target=wait)
    waiting.start()
    first = ServerUnavailable("the run stops")
    outage.abort(first)
    outage.abort(ServerUnavailable("a later abort"))
    waiting.join(timeout=30)
    assert not waiting.is_alive() and raised == [first]
    assert outage.aborted
    with pytest.raises(ServerUnavailable, match="the run stops"):
        outage.sleep(0)
    with pytest.raises(ServerUnavailable, match="the run stops"):
        outage.check()


def test_the_budget_is_shared_by_the_clients_of_a_run() -> None:
    """One worker's failure starts the outage; another client that starts failing 50 s later gets what is left
    (10 s of 60), and its error names the outage's first failure."""
    outage, clock = tracker(60)
    down = httpx.MockTransport(lambda request: httpx.Response(500, text="oops"))
    settings = ClientConfig(outage_seconds=60, backoff_initial=0.5, backoff_max=2.0)
    with KatoClient("http://kato.test", settings=settings, transport=down, outage=outage) as worker, \
            KatoClient("http://kato.test", settings=settings, transport=down, outage=outage) as reader:
        with pytest.raises(MaybeApplied):
            worker.learn("s")  # unkeyed: one attempt, never resent blindly; the outage begins
        clock.t += 50
        with pytest.raises(ServerUnavailable) as info:
            reader.stm("s")
    assert clock.t == pytest.approx(5060)
    assert "has been answering 500 since 05:06:07 (1 min 0 s), longer than client.outage_seconds (60 s)" in str(
        info.value)


def test_a_client_outside_a_run_has_its_own_tracker_with_the_same_budget() -> None:
    with KatoClient("http://kato.test", settings=ClientConfig(outage_seconds=42)) as a, \
            KatoClient("http://kato.test", settings=ClientConfig(outage_seconds=42)) as b:
        assert a.outage is not b.outage and a.outage.budget == b.outage.budget == 42


@pytest.mark.parametrize(("failure", "words"), [
    (httpx.ReadTimeout("timed out"), "timing out"),
    (httpx.ConnectTimeout("timed out"), "timing out"),
    (httpx.RemoteProtocolError("Server disconnected without sending a response."), "dropping connections"),
    (httpx.Response(502, text="bad gateway"), "answering 502"),
    (httpx.Response(429, text="slow down"), "answering 429"),
])
def test_each_failure_is_named_in_words(failure, words: str) -> None:
    outage, clock = tracker(900)

    def handler(request: httpx.Request) -> httpx.Response:
        clock.t += 2  # each attempt takes 2 s: past a blip at once
        if isinstance(failure, Exception):
            raise failure
        return failure

    settings = ClientConfig(retry_max_attempts=2)
    with KatoClient("http://kato.test", settings=settings, transport=httpx.MockTransport(handler),
                    outage=outage) as client, pytest.raises(ServerUnavailable):
        client.health()
    assert outage.status() is not None and outage.status().startswith(f"server {words} since 05:06:")


def test_a_refused_connection_is_named_so() -> None:
    """A real refused connection on loopback (a port nobody listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    outage, clock = tracker(900)
    with KatoClient(f"http://127.0.0.1:{port}", settings=ClientConfig(retry_max_attempts=1), outage=outage) as client:
        with pytest.raises(ServerUnavailable, match="retry_max_attempts"):
            client.health()
    clock.t += 5
    assert outage.status() == "server refusing connections since 05:06:07, retrying (895 s left)"
