"""The time a run reads: one object, so that tests can set it instead of waiting for it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Clock:
    """``monotonic()`` measures intervals (checkpoint intervals, throughput, a call's length); ``now()`` is the
    wall-clock time written down (a checkpoint's ``created_at``, a run's ``started_at``), in UTC."""

    monotonic: Callable[[], float] = time.monotonic
    now: Callable[[], datetime] = _utc_now


SYSTEM = Clock()
