"""A valid checkpoint to save, load and damage, for the checkpoint and CLI tests."""

from __future__ import annotations

from datetime import datetime, timezone

from streamtrain.config import DatasetConfig, RunConfig
from streamtrain.records.checkpoint import Checkpoint, Counters, FailedSample, StreamPosition


def make_ckpt(seq: int, run_name: str = "run1", **kw) -> Checkpoint:
    config = RunConfig(run_name=run_name, dataset=DatasetConfig(path="text", data_files="x.txt"))
    now = datetime.now(timezone.utc)
    fields = dict(
        sequence=seq,
        run_name=run_name,
        config=config,
        position=StreamPosition(raw_offset=seq * 10, done_above=[seq * 10 + 2]),
        counters=Counters(samples_trained=seq * 9, samples_filtered=seq, patterns_learned=[seq, 1]),
        failures=[FailedSample(raw_index=3, error="boom")],
        reason="interval",
        started_at=now,
        created_at=now,
        elapsed_seconds=1.5 * seq,
    )
    fields.update(kw)
    return Checkpoint(**fields)
