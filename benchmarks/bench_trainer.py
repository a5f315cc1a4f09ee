"""End-to-end training throughput, against a per-token baseline client measured in the same run.

    python benchmarks/bench_trainer.py [--samples 1500] [--workers 1 2 4] [--repeat 3]
    python benchmarks/bench_trainer.py --plain [--samples 1500] [--workers 1 2] [--repeat 3]   # real-KATO protocol
    python benchmarks/bench_trainer.py --memory [--memory-samples 200000]   # RSS of a long run, every 10 s

What it measures, on the demo corpus (Shakespeare's speeches, built into data/demo if missing) and one embedded
server started for the benchmark:

* streamtrain's ``train``: as against a real KATO (``counter``: no idempotency keys, one observe-sequence with
  learn_at_end per chunk, a lost answer decided by the session's counter), with one keyed request per chunk
  (``keys``), and with the embedded server's learn-batches extension (several samples per request) with 1, 2 and
  4 workers, ``--repeat`` times each (a run takes seconds: the median and the range are printed): samples/s,
  tokens/s, learns/s, HTTP requests per sample (counted at ``httpx.Client.send``);
* a baseline written here the way the system streamtrain replaces talks to KATO: one ``observe`` request per
  token, then one ``learn`` per chunk, same chunks, same levels, one worker;
* ratios against that baseline.

``--plain`` compares the real-KATO protocol with a *plain client* written here: one observe-sequence with
learn_at_end per chunk and no guarantee at all (no journal, no checkpoints, no recovery), with the same workers,
the same chunks and levels, on the same server without idempotency (playing KATO). Runs alternate and repeat;
medians are printed, with streamtrain's requests per chunk and samples/s as ratios of the plain client's: the
median of the ratios of runs made back to back (robust to a load that drifts during the benchmark), and the
ratio of the medians.

Nothing is asserted: figures are printed (the README quotes them with this command).
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

from streamtrain.config import ClientConfig, DatasetConfig, RunConfig
from streamtrain.data.stream import DatasetStream
from streamtrain.data.tokenization import get_tokenizer
from streamtrain.demo import build_demo_corpus
from streamtrain.hierarchy import plan_sample
from streamtrain.server import EmbeddedServer
from streamtrain.trainer import train

ROOT = Path(__file__).resolve().parents[1]

# Every HTTP request of this process (streamtrain's and the baselines'), counted where httpx sends it.
_sent = itertools.count()
_send = httpx.Client.send


def _counting_send(self: httpx.Client, *args: object, **kwargs: object) -> httpx.Response:
    next(_sent)  # atomic under the GIL: workers count without a lock
    return _send(self, *args, **kwargs)  # type: ignore[arg-type]


httpx.Client.send = _counting_send  # type: ignore[method-assign]


def requests_sent() -> int:
    return next(_sent)  # the next value: what was counted so far (plus this read, which the deltas cancel)


def corpus_config(corpus: Path) -> DatasetConfig:
    return DatasetConfig(path="parquet", data_files=str(corpus / "*.parquet"), min_chars=20)


def run_streamtrain(url: str, corpus: Path, ckpt_dir: Path, samples: int, workers: int, mode: str,
                    tag: str = "") -> dict:
    """mode: "batch" (learn-batches: several samples per request), "keys" (one keyed request per chunk) or "counter"
    (a server without idempotency, as a real KATO: one observe-sequence with learn_at_end per chunk)."""
    client = ClientConfig(learn_batch=(mode == "batch"))
    cfg = RunConfig(run_name=f"bench-{mode}-w{workers}{tag}", server_url=url, dataset=corpus_config(corpus),
                    max_samples=samples, checkpoint_dir=ckpt_dir, num_workers=workers, checkpoint_every=1000,
                    client=client)
    before = requests_sent()
    result = train(cfg, progress=False)
    requests = requests_sent() - before - 1
    return {"name": f"streamtrain {mode}, {workers} worker(s)", "samples": result.new_samples,
            "tokens": result.new_tokens, "seconds": result.elapsed_seconds, "requests": requests,
            "learns": sum(result.patterns_learned)}


def run_plain(url: str, corpus: Path, samples: int, workers: int, tag: str = "") -> dict:
    """The plain client: per chunk one observe-sequence with learn_at_end, nothing else (no journal, no checkpoint,
    no check of the answer, no recovery). ``workers`` threads, each with its own connection and session per level,
    take samples from a queue filled by the stream (tokenizing and planning in the worker, as streamtrain does)."""
    layers = RunConfig(run_name="x", dataset=corpus_config(corpus)).layers
    tokenizer = get_tokenizer("words")
    inbox: queue.Queue[str | None] = queue.Queue(maxsize=2 * workers + 2)
    totals = {"samples": 0, "tokens": 0, "learns": 0}
    lock = threading.Lock()

    def worker(number: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            sids = [http.post("/sessions", json={"node_id": f"plain{tag}-w{workers}-L{level}",
                                                 "config": layer.session_config()}).json()["session_id"]
                    for level, layer in enumerate(layers)]
            done = tokens = learns = 0
            while (text := inbox.get()) is not None:
                toks = tokenizer(text)
                for step in plan_sample(toks, layers):
                    http.post(f"/sessions/{sids[step.level]}/observe-sequence",
                              json={"observations": [{"strings": e} for e in step.events],
                                    "learn_at_end": True}).raise_for_status()
                    learns += 1
                done, tokens = done + 1, tokens + len(toks)
            for sid in sids:
                http.delete(f"/sessions/{sid}")
        with lock:
            totals["samples"] += done
            totals["tokens"] += tokens
            totals["learns"] += learns

    before = requests_sent()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for raw_index, text in DatasetStream(corpus_config(corpus)):
        if raw_index >= samples:
            break
        inbox.put(text)
    for _ in threads:
        inbox.put(None)
    for t in threads:
        t.join()
    return {"name": f"plain client, {workers} worker(s)", "seconds": time.perf_counter() - t0,
            "requests": requests_sent() - before - 1, **totals}


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
        rows = [[run_per_token_baseline(server.url, corpus, args.samples)],
                [run_streamtrain(plain.url, corpus, work / "ckpt", args.samples, 1, "counter")],
                [run_streamtrain(server.url, corpus, work / "ckpt", args.samples, 1, "keys")]]
        batch: dict[int, list[dict]] = {n: [] for n in args.workers}
        for r in range(args.repeat):  # learn-batches runs take seconds: repeated, alternating, new nodes each time
            for n in (args.workers if r % 2 == 0 else args.workers[::-1]):
                batch[n].append(run_streamtrain(server.url, corpus, work / "ckpt", args.samples, n, "batch", tag=f"-r{r}"))
        rows += batch.values()
    base = rows[0][0]["samples"] / rows[0][0]["seconds"]
    print(f"\nend-to-end training, {args.samples} raw records of the demo corpus, embedded server, {os.cpu_count()} cores")
    print("(counter = the protocol used against a real KATO, which has no idempotency keys; learn-batches rows: "
          f"median of {args.repeat} runs, with their range)")
    print(f"{'client':<40} {'samples/s':>10} {'tokens/s':>10} {'learns/s':>9} {'req/sample':>11} {'vs baseline':>12}"
          "  range")
    for runs in rows:
        sps_all = sorted(r["samples"] / r["seconds"] for r in runs)
        r = min(runs, key=lambda x: abs(x["samples"] / x["seconds"] - statistics.median(sps_all)))  # the median run
        sps = r["samples"] / r["seconds"]
        spread = f"  {sps_all[0]:.0f}-{sps_all[-1]:.0f}" if len(runs) > 1 else ""
        print(f"{r['name']:<40} {sps:>10.1f} {r['tokens'] / r['seconds']:>10.0f} {r['learns'] / r['seconds']:>9.0f} "
              f"{r['requests'] / max(r['samples'], 1):>11.2f} {sps / base:>11.2f}x{spread}")


def versus_plain(args: argparse.Namespace, corpus: Path, work: Path) -> None:
    """streamtrain's real-KATO protocol against the plain client, alternating, at equal workers; medians."""
    with EmbeddedServer(work / "kb-noidem.sqlite3", idempotency=False, log_path=work / "server.log") as kato:
        results: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.repeat):
            for n in args.workers:
                order = ("plain", "counter") if r % 2 == 0 else ("counter", "plain")
                for who in order:
                    row = (run_plain(kato.url, corpus, args.samples, n, tag=f"-r{r}") if who == "plain" else
                           run_streamtrain(kato.url, corpus, work / "ckpt", args.samples, n, "counter", tag=f"-r{r}"))
                    results.setdefault((who, n), []).append(row)
    print(f"\nreal-KATO protocol vs a plain client, {args.samples} raw records of the demo corpus, embedded server "
          f"with --no-idempotency, {os.cpu_count()} cores; median of {args.repeat} alternating runs")
    print(f"{'client':<36} {'samples/s':>10} {'req/chunk':>10} {'req/sample':>11} {'samples/s vs plain':>19} "
          f"{'(pairs)':>8} {'req/chunk vs plain':>19}")
    for n in args.workers:
        med = {}
        for who in ("plain", "counter"):
            rows = results[(who, n)]
            med[who] = (statistics.median(r["samples"] / r["seconds"] for r in rows),
                        statistics.median(r["requests"] / r["learns"] for r in rows),
                        statistics.median(r["requests"] / r["samples"] for r in rows))
        pairs = statistics.median((c["samples"] / c["seconds"]) / (p["samples"] / p["seconds"])
                                  for p, c in zip(results[("plain", n)], results[("counter", n)], strict=True))
        for who in ("plain", "counter"):
            sps, rpc, rps = med[who]
            name = f"plain client, {n} worker(s)" if who == "plain" else f"streamtrain counter, {n} worker(s)"
            print(f"{name:<36} {sps:>10.1f} {rpc:>10.3f} {rps:>11.2f} {sps / med['plain'][0]:>18.2f}x "
                  f"{(pairs if who == 'counter' else 1.0):>7.2f}x {rpc / med['plain'][1]:>18.3f}x")


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
    p.add_argument("--plain", action="store_true", help="compare the real-KATO protocol with a plain client instead")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per learn-batches row, or with --plain per client, alternating (default 3)")
    p.add_argument("--memory-samples", type=int, default=200_000)
    args = p.parse_args()
    corpus = ROOT / "data" / "demo"
    build_demo_corpus(corpus)
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    try:
        (memory if args.memory else versus_plain if args.plain else throughput)(args, corpus, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
