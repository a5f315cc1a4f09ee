"""Resume cost: time from opening a DatasetStream at a raw offset to its first record, `.skip` against
`load_state_dict`, on a local Parquet dataset in 8 shards (1M rows by default).

    python benchmarks/bench_stream.py [--rows 1000000] [--shards 8] [--repeat 3] [--dir data/bench/stream]

The dataset is generated once under --dir (reused afterwards). The exact states are taken from one pass that
reads the stream from 0, as a trainer's checkpoints would. Prints medians; asserts nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from streamtrain.config import DatasetConfig
from streamtrain.data.stream import DatasetStream

WORDS = "the quick brown fox jumps over a lazy dog while seven ravens watch from an old oak".split()


def generate(folder: Path, rows: int, shards: int) -> None:
    marker = folder / f".complete-{rows}-{shards}"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    per = rows // shards
    for s in range(shards):
        start, stop = s * per, rows if s == shards - 1 else (s + 1) * per
        texts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(5 + i % 11)) + f" #{i}" for i in range(start, stop)]
        pq.write_table(pa.table({"text": texts, "id": pa.array(range(start, stop), pa.int64())}),
                       folder / f"part-{s:02d}.parquet", row_group_size=10_000)
    marker.touch()


def first_record_seconds(cfg: DatasetConfig, offset: int, state: dict | None) -> tuple[float, int, str]:
    t = time.perf_counter()
    with DatasetStream(cfg, start=offset, state_dict=state) as stream:
        index, _ = next(stream)
        return time.perf_counter() - t, index, stream.resumed_by


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("data/bench/stream"))
    args = ap.parse_args()
    folder = args.dir / f"{args.rows}-{args.shards}"
    t = time.perf_counter()
    generate(folder, args.rows, args.shards)
    print(f"dataset: {args.rows} rows in {args.shards} Parquet shards under {folder} (ready in {time.perf_counter() - t:.1f} s)")
    cfg = DatasetConfig(path="parquet", data_files=str(folder / "*.parquet"))
    offsets = [0, 100_000, args.rows - 1]  # the last offset is the dataset's last record (the "1M" case)
    offsets = sorted({o for o in offsets if 0 <= o < args.rows})

    # One pass from 0, taking the exact state at each offset (what a trainer's checkpoint would hold).
    t = time.perf_counter()
    states: dict[int, dict | None] = {}
    with DatasetStream(cfg) as stream:
        for off in offsets:
            while stream.position < off:
                next(stream)
            states[off] = stream.state_for(off)
    print(f"states taken in one pass over {offsets[-1]} records in {time.perf_counter() - t:.1f} s")

    print(f"time to first record (median of {args.repeat}):")
    print(f"  {'raw offset':>10}  {'.skip':>10}  {'state_dict':>10}  {'skip/state':>10}")
    for off in offsets:
        results = {}
        for method in ("skip", "state_dict"):
            runs = []
            for _ in range(args.repeat):
                seconds, index, how = first_record_seconds(cfg, off, None if method == "skip" else states[off])
                if index != off:  # both must land on the same record; say so loudly if not
                    print(f"  !! {method} at offset {off} started at raw record {index}")
                runs.append(seconds)
            results[method] = statistics.median(runs)
        ratio = results["skip"] / results["state_dict"]
        print(f"  {off:>10}  {results['skip']:>9.3f}s  {results['state_dict']:>9.3f}s  {ratio:>9.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
