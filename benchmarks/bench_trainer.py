"""End-to-end training throughput, against a per-token baseline client measured in the same run.

    python benchmarks/bench_trainer.py [--samples 1500] [--workers 1 2 4]
    python benchmarks/bench_trainer.py --memory [--memory-samples 200000]   # RSS of a long run, every 10 s

What it measures, on the demo corpus (Shakespeare's speeches, built into data/demo if missing) and one embedded
server started for the benchmark:

* streamtrain's ``train``: as against a real KATO (``verify``: no idempotency keys, two requests per chunk),
  with one keyed request per chunk (``keys``), and with the embedded server's learn-batch extension (one
  request per sample) with 1, 2 and 4 workers: samples/s, tokens/s, learns/s, HTTP requests per sample;
* a baseline written here the way the system streamtrain replaces talks to KATO: one ``observe`` request per
  token, then one ``learn`` per chunk, same chunks, same levels, one worker;
* ratios against that baseline.

Nothing is asserted: figures are printed (the README quotes them with this command).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from streamtrain.config import ClientConfig, DatasetConfig, RunConfig  # noqa: E402
from streamtrain.demo import build_demo_corpus  # noqa: E402
from streamtrain.hierarchy import plan_sample  # noqa: E402
from streamtrain.server import EmbeddedServer  # noqa: E402
from streamtrain.stream import DatasetStream  # noqa: E402
from streamtrain.tokenize import get_tokenizer  # noqa: E402
from streamtrain.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def corpus_config(corpus: Path) -> DatasetConfig:
    return DatasetConfig(path="parquet", data_files=str(corpus / "*.parquet"), min_chars=20)


def run_streamtrain(url: str, corpus: Path, ckpt_dir: Path, samples: int, workers: int, mode: str) -> dict:
    """mode: "batch" (one learn-batch request per sample), "keys" (one keyed request per chunk) or "verify"
    (a server without idempotency, as a real KATO: observe-sequence + learn per chunk)."""
    client = ClientConfig(learn_batch=(mode == "batch"))
    cfg = RunConfig(run_name=f"bench-{mode}-w{workers}", server_url=url, dataset=corpus_config(corpus),
                    max_samples=samples, checkpoint_dir=ckpt_dir, num_workers=workers, checkpoint_every=1000,
                    client=client)
    result = train(cfg, progress=False)
    learns = sum(result.patterns_learned)
    requests = {"batch": result.samples_trained, "keys": learns, "verify": 2 * learns}[mode]
    return {"name": f"streamtrain {mode}, {workers} worker(s)", "samples": result.new_samples,
            "tokens": result.new_tokens, "seconds": result.elapsed_seconds, "requests": requests, "learns": learns}


def run_per_token_baseline(url: str, corpus: Path, samples: int) -> dict:
    """One observe per token, then learn, per chunk: the request pattern of the system streamtrain replaces."""
    layers = RunConfig(run_name="x", dataset=corpus_config(corpus)).layers
    tokenizer = get_tokenizer("words")
    requests = tokens = done = learns = 0
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=30) as http:
        sids = []
        for level, layer in enumerate(layers):
            r = http.post("/sessions", json={"node_id": f"baseline-L{level}", "config": layer.session_config()})
            sids.append(r.json()["session_id"])
        for raw_index, text in DatasetStream(corpus_config(corpus)):
            if raw_index >= samples:
                break
            toks = tokenizer(text)
            tokens += len(toks)
            for step in plan_sample(toks, layers):  # the same chunks and levels as streamtrain
                for event in step.events:
                    http.post(f"/sessions/{sids[step.level]}/observe", json={"strings": event}).raise_for_status()
                    requests += 1
                http.post(f"/sessions/{sids[step.level]}/learn").raise_for_status()
                requests += 1
                learns += 1
            done += 1
    return {"name": "baseline: observe per token + learn", "samples": done, "tokens": tokens,
            "seconds": time.perf_counter() - t0, "requests": requests, "learns": learns}


def throughput(args: argparse.Namespace, corpus: Path, work: Path) -> None:
    with EmbeddedServer(work / "kb.sqlite3", log_path=work / "server.log") as server, \
            EmbeddedServer(work / "kb-noidem.sqlite3", idempotency=False, log_path=work / "server2.log") as plain:
        rows = [run_per_token_baseline(server.url, corpus, args.samples),
                run_streamtrain(plain.url, corpus, work / "ckpt", args.samples, 1, "verify"),
                run_streamtrain(server.url, corpus, work / "ckpt", args.samples, 1, "keys")]
        for n in args.workers:
            rows.append(run_streamtrain(server.url, corpus, work / "ckpt", args.samples, n, "batch"))
    base = rows[0]["samples"] / rows[0]["seconds"]
    print(f"\nend-to-end training, {args.samples} raw records of the demo corpus, embedded server, {os.cpu_count()} cores")
    print("(verify = the protocol used against a real KATO, which has no idempotency keys)")
    print(f"{'client':<40} {'samples/s':>10} {'tokens/s':>10} {'learns/s':>9} {'req/sample':>11} {'vs baseline':>12}")
    for r in rows:
        sps = r["samples"] / r["seconds"]
        print(f"{r['name']:<40} {sps:>10.1f} {r['tokens'] / r['seconds']:>10.0f} {r['learns'] / r['seconds']:>9.0f} "
              f"{r['requests'] / max(r['samples'], 1):>11.1f} {sps / base:>11.2f}x")


def memory(args: argparse.Namespace, corpus: Path, work: Path) -> None:
    """Resident memory of the trainer (and the server) sampled every 10 s over a long run."""
    import psutil

    big = work / "big"
    big.mkdir()
    copies = -(-args.memory_samples // 31000)
    for i in range(copies):  # the corpus repeated under other names: a stream longer than the corpus
        for f in sorted(corpus.glob("*.parquet")):
            shutil.copy(f, big / f"r{i:02d}-{f.name}")
    cfg = RunConfig(run_name="bench-memory", dataset=corpus_config(big), max_samples=args.memory_samples,
                    checkpoint_dir=work / "ckpt", num_workers=2, checkpoint_every=5000)
    me = psutil.Process()
    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(10.0):
            server_rss = sum(c.memory_info().rss for c in me.children(recursive=True)) / 2**20
            samples.append((time.monotonic() - t0, me.memory_info().rss / 2**20, server_rss))
            print(f"  t={samples[-1][0]:7.0f} s  trainer RSS {samples[-1][1]:7.1f} MiB  server RSS {server_rss:7.1f} MiB",
                  flush=True)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    result = train(cfg, progress=False)
    stop.set()
    print(f"\nlong run: {result.new_samples} samples in {result.elapsed_seconds:.0f} s "
          f"({result.samples_per_second:.1f} samples/s, 2 workers, embedded server)")
    if samples:
        first, last = samples[0], samples[-1]
        peak = max(s[1] for s in samples)
        print(f"trainer RSS: first {first[1]:.1f} MiB, last {last[1]:.1f} MiB, peak {peak:.1f} MiB "
              f"over {len(samples)} samples 10 s apart")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1500, help="raw records per client (default 1500)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--memory", action="store_true", help="run the long memory measurement instead")
    p.add_argument("--memory-samples", type=int, default=200_000)
    args = p.parse_args()
    corpus = ROOT / "data" / "demo"
    build_demo_corpus(corpus)
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    try:
        (memory if args.memory else throughput)(args, corpus, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
