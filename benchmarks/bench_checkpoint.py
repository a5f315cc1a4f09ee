"""Checkpoint write latency: CheckpointStore.save against the floor of its durability steps, in the same run.

    python benchmarks/bench_checkpoint.py [--saves 500] [--failures 100] [--dir data/bench/ckpt]

Four ways of writing the same checkpoint, interleaved save by save (round-robin, the order rotated each round) so
that each sees the same disk at the same moment:

* floor: the bare durability steps on the serialized checkpoint's bytes: write a temp file, fsync it,
  ``os.replace`` it over one final name, fsync the folder (nothing else: no serialization, no pruning);
* store: what the trainer does per checkpoint, ``store.next_sequence()`` then ``store.save(ckpt)`` (keep=3):
  the floor's steps plus the serialization and the unlink of the oldest file;
* before: the same steps as CheckpointStore.save did them before issue 12 (a folder listing for
  ``next_sequence``, another for pruning, a third for temp files, stat + mkdir of the folder at every save);
* no fsync: ``CheckpointStore(fsync=False)``, what the disk costs (not a mode a run can use).

Prints p50/p99/max in milliseconds and each row's ratio to the floor at p50 and p99. Asserts nothing. The
folder defaults to data/bench/ (on the repo's disk: /tmp may be a RAM disk, where fsync costs nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from streamtrain.config import DatasetConfig, RunConfig
from streamtrain.records.checkpoint import Checkpoint, CheckpointStore, Counters, FailedSample, StreamPosition


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(tmp: Path, final: Path, data: bytes, fsync: bool = True) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    if fsync:
        fsync_dir(final.parent)


def floor_writer(folder: Path, data: bytes) -> Callable[[Checkpoint], None]:
    folder.mkdir(parents=True)
    tmp, final = folder / ".floor.json.tmp", folder / "floor.json"
    return lambda ckpt: write_durably(tmp, final, data)


def store_writer(folder: Path, fsync: bool) -> Callable[[Checkpoint], None]:
    store = CheckpointStore(folder, keep=3, fsync=fsync)

    def save(ckpt: Checkpoint) -> None:
        store.next_sequence()  # as the trainer calls it before each save
        store.save(ckpt)

    return save


_NAME = re.compile(r"^ckpt-(\d{8})\.json$")
_TEMP = re.compile(r"^\.ckpt-\d{8}\.json\.\d+\.tmp$")


def before_writer(folder: Path, keep: int = 3) -> Callable[[Checkpoint], None]:
    """CheckpointStore.save (and the trainer's next_sequence call) as they were before issue 12."""

    def paths() -> list[tuple[int, Path]]:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(folder)
        if not folder.is_dir():
            return []
        return sorted((int(m.group(1)), folder / p.name) for p in folder.iterdir() if (m := _NAME.match(p.name)))

    def save(ckpt: Checkpoint) -> None:
        paths()  # next_sequence()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(folder)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / ckpt.file_name
        write_durably(folder / f".{ckpt.file_name}.{os.getpid()}.tmp", final, ckpt.model_dump_json(indent=1).encode())
        found = paths()
        for _, path in found[: max(0, len(found) - keep)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for p in folder.iterdir():
            if _TEMP.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    return save


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, default=500)
    ap.add_argument("--failures", type=int, default=100, help="failed samples listed in each checkpoint (file size)")
    ap.add_argument("--dir", type=Path, default=Path("data/bench/ckpt"))
    args = ap.parse_args()
    data = make(1, args.failures).model_dump_json(indent=1).encode()
    print(f"checkpoint write latency: {args.saves} saves of a {len(data) / 1024:.1f} KiB checkpoint into {args.dir} "
          "(keep=3), the four ways interleaved")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    labels = {
        "floor": "floor: write+fsync+replace+folder fsync",
        "store": "store: next_sequence() + save()",
        "before": "former code: 3 folder listings per save",
        "nofsync": "store without fsync (not durable)",
    }
    writers = {
        "floor": floor_writer(args.dir / "floor", data),
        "store": store_writer(args.dir / "store", True),
        "before": before_writer(args.dir / "before"),
        "nofsync": store_writer(args.dir / "nofsync", False),
    }
    ckpts = [make(i + 1, args.failures) for i in range(args.saves + 10)]  # built up front: only the save is timed
    lat: dict[str, list[float]] = {k: [] for k in writers}
    order = list(writers)
    for i, ckpt in enumerate(ckpts):
        for k in order[i % len(order):] + order[: i % len(order)]:
            t = time.perf_counter()
            writers[k](ckpt)
            if i >= 10:  # the first 10 rounds warm up
                lat[k].append((time.perf_counter() - t) * 1000)
    shutil.rmtree(args.dir, ignore_errors=True)
    f50, f99 = statistics.median(lat["floor"]), pct(lat["floor"], 0.99)
    print(f"  {'':42s} {'p50':>9s} {'p99':>9s} {'max':>9s}   {'p50 / floor':>11s} {'p99 / floor':>11s}")
    for k, label in labels.items():
        v = lat[k]
        p50, p99 = statistics.median(v), pct(v, 0.99)
        print(f"  {label:42s} {p50:6.2f} ms {p99:6.2f} ms {max(v):6.2f} ms   {p50 / f50:10.2f}x {p99 / f99:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
