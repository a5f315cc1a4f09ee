"""Helper process for the torn-write test: saves checkpoints 1, 2, 3... into a run folder until killed.

Usage: python checkpoint_writer.py RUN_DIR START_SEQUENCE
Prints "ready" once the first checkpoint is saved. Each checkpoint carries ~200 KB of failures so a
write takes long enough for a SIGKILL to land in the middle of one.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from streamtrain.config import DatasetConfig, RunConfig
from streamtrain.records.checkpoint import Checkpoint, CheckpointStore, Counters, FailedSample, StreamPosition


def main() -> None:
    run_dir, seq = Path(sys.argv[1]), int(sys.argv[2])
    store = CheckpointStore(run_dir, keep=3)
    config = RunConfig(run_name=run_dir.name, dataset=DatasetConfig(path="text", data_files="x.txt"))
    now = datetime.now(timezone.utc)
    failures = [FailedSample(raw_index=i, error="x" * 150) for i in range(1000)]
    with store.lock():
        while True:
            ckpt = Checkpoint(
                sequence=seq,
                run_name=config.run_name,
                config=config,
                position=StreamPosition(raw_offset=seq * 10),
                counters=Counters(samples_trained=seq * 10),
                failures=failures,
                reason="interval",
                started_at=now,
                created_at=datetime.now(timezone.utc),
                elapsed_seconds=float(seq),
            )
            store.save(ckpt)
            if seq == int(sys.argv[2]):
                print("ready", flush=True)
            seq += 1


if __name__ == "__main__":
    main()
