"""Embedded server throughput and prediction latency (prints figures, asserts nothing).

    .venv/bin/python benchmarks/bench_server.py            # default run, well under 2 minutes
    .venv/bin/python benchmarks/bench_server.py --big      # adds the 100k-pattern prediction figures
    .venv/bin/python benchmarks/bench_server.py --requests-only   # only the per-request figures (~30 s)

Measures, against the server as a real subprocess over loopback HTTP:
  * observations/s through observe-sequence with batches of 1 (baseline: one request per event), 8, 64, 512
  * learned patterns/s: one observe-sequence of 8 events with learn_at_end per pattern (the real-KATO
    protocol's shape), with and without an Idempotency-Key, POST /learn after an observe-sequence, auto-learn,
    and the extensions learn-batch and learn-batches (among them the trainer's shape: ~11 samples a request)
  * GET /predictions latency p50/p99 with 1k, 10k (and 100k with --big) patterns in the node, and in the same
    run the in-process prediction time with the symbol index against a full scan of the node; for a
    Zipf-distributed vocabulary (frequent symbols occur in most patterns: little for the index to skip)
    and a uniform one (rare symbols: the index skips almost everything)
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamtrain.server import EmbeddedServer


def zipf_vocab(rng: random.Random, size: int):
    words = [f"w{i}" for i in range(size)]
    cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(size)))
    return lambda k: rng.choices(words, cum_weights=cum, k=k)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def new_session(c: httpx.Client, node: str) -> str:
    return c.post("/sessions", json={"node_id": node, "config": {"process_predictions": False}}).json()["session_id"]


def server_cpu(srv: EmbeddedServer) -> float:
    """CPU seconds used so far by the server process (a load-independent cost figure)."""
    import psutil

    t = psutil.Process(srv.pid).cpu_times()
    return t.user + t.system


def bench_ingest(c: httpx.Client, srv: EmbeddedServer, draw, budget_events: int) -> None:
    print("\n== observations/s through observe-sequence (no learning, process_predictions=false)")
    base = None
    for batch in (1, 8, 64, 512):
        sid = new_session(c, f"ingest{batch}")
        n_req = max(4, budget_events // batch)
        bodies = [{"observations": [{"strings": draw(1)} for _ in range(batch)]} for _ in range(n_req)]
        cpu0, t0 = server_cpu(srv), time.perf_counter()
        for i, body in enumerate(bodies):
            if i % 2 == 0 and batch >= 64:
                c.post(f"/sessions/{sid}/clear-stm")      # keep the STM short: measure ingest, not STM size
            c.post(f"/sessions/{sid}/observe-sequence", json=body)
        dt, cpu = time.perf_counter() - t0, server_cpu(srv) - cpu0
        rate = n_req * batch / dt
        base = base or rate
        print(f"  batch {batch:4d}: {rate:8.0f} obs/s  (x{rate / base:4.1f} vs batch 1; server CPU "
              f"{cpu / (n_req * batch) * 1e6:6.1f} us/obs = {n_req * batch / cpu:8.0f} obs per CPU-second)")


def bench_learn(c: httpx.Client, srv: EmbeddedServer, draw, n: int) -> None:
    print("\n== learned patterns/s (one session, 8 single-symbol events per pattern)")
    for label, keyed in (("observe-sequence of 8 + learn_at_end", False),
                         ("same, with Idempotency-Key", True)):
        sid = new_session(c, f"learn{int(keyed)}")
        bodies = [{"observations": [{"strings": draw(1)} for _ in range(8)], "learn_at_end": True}
                  for _ in range(n)]
        cpu0, t0 = server_cpu(srv), time.perf_counter()
        for i, body in enumerate(bodies):
            headers = {"Idempotency-Key": f"bench-{i}"} if keyed else None
            c.post(f"/sessions/{sid}/observe-sequence", json=body, headers=headers)
        dt, cpu = time.perf_counter() - t0, server_cpu(srv) - cpu0
        print(f"  {label:40s}: {n / dt:6.0f} patterns/s wall; server CPU {cpu / n * 1e3:.2f} ms/pattern "
              f"= {n / cpu:5.0f} patterns per CPU-second")
    for per_request in (8, 64):
        # Auto-learn: max_pattern_length 8 (CLEAR) learns every 8 events, so one request carries many patterns.
        sid = c.post("/sessions", json={"node_id": f"auto{per_request}", "config": {
            "process_predictions": False, "max_pattern_length": 8}}).json()["session_id"]
        n_req = max(1, n // per_request)
        bodies = [{"observations": [{"strings": draw(1)} for _ in range(8 * per_request)]} for _ in range(n_req)]
        cpu0, t0 = server_cpu(srv), time.perf_counter()
        learned = 0
        for body in bodies:
            learned += len(c.post(f"/sessions/{sid}/observe-sequence", json=body).json()["auto_learned_patterns"])
        dt, cpu = time.perf_counter() - t0, server_cpu(srv) - cpu0
        label = f"auto-learn mpl=8, {per_request} patterns/request"
        print(f"  {label:40s}: {learned / dt:6.0f} patterns/s wall; server CPU {cpu / learned * 1e3:.2f} ms/pattern "
              f"= {learned / cpu:5.0f} patterns per CPU-second")
    for per_request in (6, 64):
        # learn-batch (extension): many 8-event patterns per keyed request, no session; 6 is about one demo
        # sample (its chunks on every level), what the trainer sends per request.
        n_req = max(1, n // per_request)
        bodies = [{"items": [{"node_id": "batch", "events": [draw(1) for _ in range(8)]} for _ in range(per_request)]}
                  for _ in range(n_req)]
        cpu0, t0 = server_cpu(srv), time.perf_counter()
        for i, body in enumerate(bodies):
            c.post("/learn-batch", json=body, headers={"Idempotency-Key": f"batch-{per_request}-{i}"})
        dt, cpu = time.perf_counter() - t0, server_cpu(srv) - cpu0
        learned = n_req * per_request
        label = f"learn-batch, {per_request} patterns/request, keyed"
        print(f"  {label:40s}: {learned / dt:6.0f} patterns/s wall; server CPU {cpu / learned * 1e3:.2f} ms/pattern "
              f"= {learned / cpu:5.0f} patterns per CPU-second")
    def learn_batches_row(label: str, bodies: list[dict], per_request: int, samples: int) -> None:
        """POST each body to /learn-batches; `per_request` patterns and `samples` keyed batches in each."""
        cpu0, t0 = server_cpu(srv), time.perf_counter()
        for body in bodies:
            c.post("/learn-batches", json=body)
        dt, cpu = time.perf_counter() - t0, server_cpu(srv) - cpu0
        learned = len(bodies) * per_request
        print(f"  {label:40s}: {learned / dt:6.0f} patterns/s wall; server CPU {cpu / learned * 1e3:.2f} ms/pattern "
              f"= {learned / cpu:5.0f} patterns per CPU-second; {len(bodies) * samples / dt:5.0f} samples/s wall")

    # learn-batches (extension): 4 keyed batches of 6 patterns per request (4 samples of the trainer's shape).
    n_req = max(1, n // 24)
    learn_batches_row("learn-batches, 4 x 6 patterns/request", [
        {"batches": [{"key": f"lbs-{i}-{b}", "items": [{"node_id": "batches", "events": [draw(1) for _ in range(8)]}
                                                       for _ in range(6)]} for b in range(4)]}
        for i in range(n_req)], 24, 4)
    # learn-batches in the trainer's shape of an earlier version (demo corpus, 16 samples per request at most):
    # ~11 samples per request, each a keyed batch of 6 patterns of 8 single-symbol events: 5 of words on level 0,
    # 1 of pattern names on level 1.
    n_req = max(1, n // 66)
    rng = random.Random(3)
    names = [f"PTRN|{rng.getrandbits(160):040x}" for _ in range(4000)]
    learn_batches_row("learn-batches, 11 x 6 (trainer's shape)", [
        {"batches": [{"key": f"trainer-{i}-{b}", "items": [
            {"node_id": "trainer-L0", "events": [draw(1) for _ in range(8)]} for _ in range(5)] + [
            {"node_id": "trainer-L1", "events": [[w] for w in rng.choices(names, k=8)]}]} for b in range(11)]}
        for i in range(n_req)], 66, 11)
    sid = new_session(c, "learn-separate")
    bodies = [{"observations": [{"strings": draw(1)} for _ in range(8)]} for _ in range(n // 2)]
    cpu0, t0 = server_cpu(srv), time.perf_counter()
    for body in bodies:
        c.post(f"/sessions/{sid}/observe-sequence", json=body)
        c.post(f"/sessions/{sid}/learn")
    dt, cpu = time.perf_counter() - t0, server_cpu(srv) - cpu0
    print(f"  {'observe-sequence of 8, then POST /learn':40s}: {n // 2 / dt:6.0f} patterns/s wall; server CPU "
          f"{cpu / (n // 2) * 1e3:.2f} ms/pattern (2 requests each)")


def fill_node(db: Path, node: str, draw, target: int) -> None:
    """Grow `node` to `target` learned 8-event patterns in-process (fast; the HTTP learn rate is measured above)."""
    from streamtrain.server.engine import Engine
    from streamtrain.server.store import Store

    store = Store(db)
    eng = Engine(store)
    have = store.node_stats(eng.kb_id(node))[0]
    t0 = time.perf_counter()
    with store.transaction():
        s = eng.create_session(node, {}, None, {"process_predictions": False})
    while have < target:
        with store.transaction():
            for _ in range(min(1000, target - have)):
                if eng.learn_events(s, [[w] for w in draw(8)], with_context=False):
                    have += 1
    store.close()
    print(f"  (grew node to {target} patterns in-process in {time.perf_counter() - t0:.1f} s)")


def bench_predictions(srv: EmbeddedServer, db: Path, draw, sizes: list[int], queries: int, label: str) -> None:
    from streamtrain.server.engine import Engine
    from streamtrain.server.kbindex import KBIndexes
    from streamtrain.server.store import Store

    print(f"\n== predictions, {label} (STM = 4 single-symbol events, recall_threshold 0.1, max_predictions 100)")
    node = f"predict-{label.split()[0]}"
    for size in sizes:
        srv.stop()                      # grow the node while the server is down, then serve it
        fill_node(db, node, draw, size)
        srv.start()
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            stats = c.get(f"/nodes/{node}/stats").json()
            sid = new_session(c, node)
            lat, counts = [], []
            stms = [[[w] for w in draw(4)] for _ in range(queries)]
            c.post(f"/sessions/{sid}/observe-sequence", json={"observations": [{"strings": e} for e in stms[0]]})
            c.get(f"/sessions/{sid}/predictions")           # first call loads the patterns
            for stm in stms:
                c.post(f"/sessions/{sid}/clear-stm")
                c.post(f"/sessions/{sid}/observe-sequence", json={"observations": [{"strings": e} for e in stm]})
                t0 = time.perf_counter()
                r = c.get(f"/sessions/{sid}/predictions")
                lat.append(time.perf_counter() - t0)
                counts.append(r.json()["count"])
        print(f"  {stats['pattern_count']:7d} patterns ({stats['distinct_symbols']} symbols): HTTP p50 "
              f"{pct(lat, .5) * 1e3:7.1f} ms  p99 {pct(lat, .99) * 1e3:7.1f} ms  (mean {statistics.mean(counts):.0f} "
              "predictions)")
        # The same queries in-process on the same file: symbol index against a full scan of the node.
        store = Store(db)
        eng = Engine(store)
        kb = eng.kb_id(node)
        p50 = {}
        for label, use_index in (("symbol index", True), ("full scan", False)):
            eng.kb_index = KBIndexes()
            eng.predict(kb, stms[0], recall_threshold=0.1, max_predictions=100, use_token_matching=True,
                        use_index=use_index)                   # load the node into memory
            times = []
            for stm in stms:
                t0 = time.perf_counter()
                eng.predict(kb, stm, recall_threshold=0.1, max_predictions=100, use_token_matching=True,
                            use_index=use_index)
                times.append(time.perf_counter() - t0)
            p50[label] = pct(times, .5)
            print(f"      in-process {label:12s}: p50 {pct(times, .5) * 1e3:7.1f} ms  p99 {pct(times, .99) * 1e3:7.1f} ms")
        print(f"      full scan / index at p50: x{p50['full scan'] / p50['symbol index']:.1f}")
        store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", action="store_true", help="also measure predictions with 100k patterns (slow to build)")
    ap.add_argument("--vocab", type=int, default=20000, help="vocabulary size (Zipf-distributed draws)")
    ap.add_argument("--queries", type=int, default=40, help="prediction queries per size")
    ap.add_argument("--learns", type=int, default=1500, help="patterns learned per learn figure (default 1500)")
    ap.add_argument("--requests-only", action="store_true",
                    help="only the per-request figures (observations, learns), no predictions")
    a = ap.parse_args()
    rng = random.Random(1)
    draw = zipf_vocab(rng, a.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.sqlite3"
        srv = EmbeddedServer(db)
        with srv, httpx.Client(base_url=srv.url, timeout=120) as c:
            print(f"embedded server {srv.url}, db {db}, python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
                  f"load average {os.getloadavg()[0]:.1f}")
            bench_ingest(c, srv, draw, budget_events=4000)
            bench_learn(c, srv, draw, n=a.learns)
            if a.requests_only:
                return 0
            sizes = [1000, 10000] + ([100000] if a.big else [])
            bench_predictions(srv, db, draw, sizes, a.queries, "zipf vocabulary (words of a text)")
            uniform_rng = random.Random(2)
            words = [f"u{i}" for i in range(a.vocab)]
            bench_predictions(srv, db, lambda k: uniform_rng.choices(words, k=k), sizes, a.queries,
                              "uniform vocabulary (like an upper level, whose symbols are pattern names)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
