"""The client reads time only through its outage tracker, so a test injects the clock and waits for nothing."""

from __future__ import annotations

import httpx
import pytest

from streamtrain.client import KatoClient
from streamtrain.client.outage import OutageTracker
from streamtrain.config import ClientConfig
from streamtrain.errors import ServerUnavailable


class Clock:
    """Monotonic seconds that move only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def test_a_fifteen_minute_budget_is_spent_on_the_injected_clock() -> None:
    """A server refusing connections: the client retries until the outage budget (15 minutes) is spent on the
    injected clock, at once in wall time, and its message gives the time spent on that clock."""
    clock = Clock()
    tracker = OutageTracker(900.0, clock=clock, wall=lambda: 0.0, sleep=clock.sleep)
    settings = ClientConfig(outage_seconds=900.0, backoff_initial=1.0, backoff_max=60.0)
    with KatoClient("http://down", transport=httpx.MockTransport(refuse), settings=settings, outage=tracker) as client:
        with pytest.raises(ServerUnavailable) as gave_up:
            client.health()
    assert clock.now == pytest.approx(900.0)
    assert gave_up.value.attempts > 15  # backoff from 1 s up to 60 s, cut to what is left at the end
    assert "in 900.0 s" in str(gave_up.value)
