"""The trainer's time comes from one injected clock (``streamtrain/clock.py``): its checkpoint interval and its
progress history are tested by setting the time, never by waiting for it."""

from __future__ import annotations

from streamtrain.clock import Clock
from streamtrain.trainer import CheckpointCadence, ProgressHistory


class FakeTime:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def clock(self) -> Clock:
        return Clock(monotonic=lambda: self.now)


def test_checkpoint_every_seconds_is_due_after_the_interval_once_a_sample_finished() -> None:
    t = FakeTime(100.0)
    cadence = CheckpointCadence(every=1000, every_seconds=30.0, clock=t.clock())
    t.now = 500.0
    assert not cadence.due()  # the interval passed, but no sample finished: a call that only waits writes none
    cadence.finished()
    assert cadence.due()
    cadence.restart()  # the checkpoint is written
    cadence.finished()
    t.now = 529.9
    assert not cadence.due()
    t.now = 530.0
    assert cadence.due()


def test_checkpoint_every_samples_is_due_whatever_the_time() -> None:
    t = FakeTime()
    cadence = CheckpointCadence(every=3, every_seconds=None, clock=t.clock())
    cadence.finished()
    cadence.finished()
    t.now = 1e9
    assert not cadence.due()  # no interval in seconds: only the count
    cadence.finished()
    assert cadence.due()
    cadence.restart()
    assert not cadence.due()


def test_progress_history_stays_bounded() -> None:
    """The throughput history is thinned evenly as it grows, so a run of any length keeps a bounded record."""
    t = FakeTime()
    history = ProgressHistory(t.clock(), start=0.0, max_points=8)
    for second in range(1, 1001):  # a 1000-second call, a point whenever one is due
        t.now = float(second)
        if history.due():
            history.record(position=second, samples_trained=second, tokens=0)
    positions = [p.position for p in history.points]
    assert 4 <= len(history.points) <= 8 and history.every == 128.0
    assert positions == sorted(positions) and positions[-1] >= 1000 - history.every
    assert [p.elapsed_seconds for p in history.points] == [float(p) for p in positions]
