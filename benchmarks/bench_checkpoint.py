"""Checkpoint write latency: CheckpointStore.save with fsync (file + folder) against the same save without fsync.

    python benchmarks/bench_checkpoint.py [--saves 200] [--failures 100] [--dir data/bench/ckpt]

Prints p50/p99/max in milliseconds and the fsync cost as a ratio. Asserts nothing. The folder defaults to
data/bench/ (on the repo's disk: /tmp may be a RAM disk, where fsync costs nothing).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from streamtrain.checkpoint import Checkpoint, CheckpointStore, Counters, FailedSample, StreamPosition
from streamtrain.config import DatasetConfig, RunConfig


def make(seq: int, failures: int) -> Checkpoint:
    config = RunConfig(run_name="bench", dataset=DatasetConfig(path="parquet", data_files="data/bench/*.parquet"))
    now = datetime.now(timezone.utc)
    return Checkpoint(
        sequence=seq,
        run_name="bench",
        config=config,
        position=StreamPosition(raw_offset=seq * 1000, done_above=list(range(seq * 1000 + 1, seq * 1000 + 8))),
        counters=Counters(samples_trained=seq * 990, tokens=seq * 40000, patterns_learned=[seq * 5000, seq * 600, 80, 9]),
        failures=[FailedSample(raw_index=i, error=f"ServerUnavailable: gave up after 50 attempts ({i})") for i in range(failures)],
        reason="interval",
        started_at=now,
        created_at=now,
        elapsed_seconds=float(seq),
    )


def measure(folder: Path, fsync: bool, saves: int, failures: int) -> list[float]:
    shutil.rmtree(folder, ignore_errors=True)
    store = CheckpointStore(folder, keep=3, fsync=fsync)
    ckpts = [make(i + 1, failures) for i in range(saves)]  # built up front: only the save is timed
    out = []
    for ckpt in ckpts:
        t = time.perf_counter()
        store.save(ckpt)
        out.append((time.perf_counter() - t) * 1000)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, default=200)
    ap.add_argument("--failures", type=int, default=100, help="failed samples listed in each checkpoint (file size)")
    ap.add_argument("--dir", type=Path, default=Path("data/bench/ckpt"))
    args = ap.parse_args()
    size = len(make(1, args.failures).model_dump_json(indent=1))
    print(f"checkpoint write latency: {args.saves} saves of a {size / 1024:.1f} KiB checkpoint into {args.dir} (keep=3)")
    measure(args.dir / "warmup", True, 10, args.failures)
    results = {}
    for fsync in (False, True):
        lat = measure(args.dir / ("fsync" if fsync else "nofsync"), fsync, args.saves, args.failures)
        results[fsync] = lat
        label = "with fsync (file + folder)" if fsync else "without fsync (baseline) "
        print(
            f"  {label}: p50 {statistics.median(lat):7.2f} ms  p99 {pct(lat, 0.99):7.2f} ms  "
            f"max {max(lat):7.2f} ms"
        )
    ratio = statistics.median(results[True]) / statistics.median(results[False])
    print(f"  fsync costs {ratio:.1f}x the baseline at p50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
