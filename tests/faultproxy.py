"""A fault-injecting HTTP/1.1 proxy on loopback for tests: asyncio, seeded, bounded, in a background thread.

    with FaultProxy(server.url, fault_rate=0.1, seed=1) as proxy:
        client = KatoClient(proxy.url, ...)
        ...
        proxy.counts  # {"requests": 412, "forwarded": 371, "drop_before": 9, ...}

Each request read from a client is, with probability ``fault_rate``, hit by one fault chosen uniformly
from ``kinds``:

* ``drop_before``: close the client's connection without forwarding. The request is NOT applied.
* ``drop_after``: forward the request, read the whole answer, then close the client's connection without
  sending it. The request IS applied, and the client cannot know (the ambiguous case).
* ``503`` / ``429``: answer that status with ``Retry-After: <retry_after>`` and do not forward.
* ``500``: answer 500 (as a server whose disk is full does) and do not forward. The request is NOT applied.
* ``stall``: hold the connection without forwarding for ``stall_seconds`` (past the client's read
  timeout), then close it. The request is not applied, but the client sees a read timeout.
* ``stall_after``: forward the request, then hold the answer for ``stall_seconds`` and close. Applied,
  and the client sees a read timeout.

Besides these random faults, ``outage(seconds, kind, after=N, match=...)`` arms a timed outage: from the N-th next
request that ``match`` accepts, for ``seconds``, every request it accepts is answered ``kind`` ("500", "502" or
"504"; not forwarded, so NOT applied); or, with ``kind="refuse"``, the proxy stops listening (new connections are
refused), drops every open connection (a request being forwarded may be applied, unanswered) and listens on the
same port again when the time is up: a server restarting.

The proxy is HTTP-aware: it parses each request (Content-Length or chunked) so that it can fault single
requests on a keep-alive connection. Each forwarded request uses a fresh upstream connection with
``Connection: close``, so an idle upstream connection closing cannot add faults of its own. The random
sequence depends only on the seed and the order of requests. Faults are bounded by ``max_faults``,
connections by ``max_connections``, and message sizes by ``max_message_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

KINDS = ("drop_before", "drop_after", "503", "429", "stall", "stall_after")  # the default: what a client rides out
ALL_KINDS = KINDS + ("500",)  # 500 only when asked for: the client rides it out only within its outage budget
_HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection"}
OUTAGE_KINDS = ("500", "502", "504", "refuse")


@dataclass
class _Outage:
    """An armed outage (FaultProxy.outage): begins at the ``after``-th next request ``match`` accepts."""

    seconds: float
    kind: str
    after: int
    match: Callable[[str, str], bool] | None
    seen: int = 0
    started: float | None = None  # time.monotonic() of its first faulted request
    ended: float | None = None  # when the proxy answered (or listened) again; set lazily for status outages

    def active(self, now: float) -> bool:
        return self.started is not None and now - self.started < self.seconds


class _BadMessage(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The start line and headers up to the blank line; None on a clean EOF between messages."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise _BadMessage("connection closed in the middle of a message head") from exc
    except asyncio.LimitOverrunError as exc:
        raise _BadMessage("message head too large") from exc


def _parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return lines[0], headers


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]], limit: int,
                     until_eof: bool) -> tuple[bytes, bool]:
    """The raw body bytes as sent (chunked framing kept); second value: it was delimited by EOF."""
    if b"chunked" in (_header(headers, b"transfer-encoding") or b"").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    line = await reader.readuntil(b"\r\n")
                    out += line
                    if line == b"\r\n":
                        return bytes(out), False
            out += await reader.readexactly(size + 2)
            if len(out) > limit:
                raise _BadMessage("chunked body too large")
    length = _header(headers, b"content-length")
    if length is not None:
        n = int(length)
        if n > limit:
            raise _BadMessage("body too large")
        return await reader.readexactly(n), False
    if until_eof:
        data = await reader.read(limit + 1)
        chunks = [data]
        while data:
            data = await reader.read(limit + 1)
            chunks.append(data)
        return b"".join(chunks), True
    return b"", False


def _build_head(start: bytes, headers: list[tuple[bytes, bytes]], extra: Iterable[tuple[bytes, bytes]]) -> bytes:
    kept = [(k, v) for k, v in headers if k not in _HOP_HEADERS]
    lines = [start] + [k + b": " + v for k, v in kept] + [k + b": " + v for k, v in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class FaultProxy:
    """A seeded fault-injecting proxy in front of ``upstream_url``, running in its own thread.

    Args:
        upstream_url: e.g. ``http://127.0.0.1:8123``.
        fault_rate: probability that a request gets a fault (may be changed while running).
        seed: seeds the RNG that decides which requests fail and how.
        kinds: the fault kinds to choose from (see the module docstring).
        retry_after: the Retry-After value sent with 503/429 (seconds, as text).
        stall_seconds: how long ``stall``/``stall_after`` hold a connection.
        max_faults: stop injecting after this many faults (None: no limit).
        match: ``match(method, path)`` limits faults to the requests it accepts (None: all requests).
    """

    def __init__(
        self,
        upstream_url: str,
        fault_rate: float = 0.1,
        seed: int = 1,
        kinds: Iterable[str] = KINDS,
        *,
        retry_after: str = "1",
        stall_seconds: float = 3.0,
        max_faults: int | None = None,
        match: Callable[[str, str], bool] | None = None,
        max_connections: int = 64,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        kinds = tuple(kinds)
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {ALL_KINDS}, got {kinds}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream_url must be http://host:port, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port)
        self.fault_rate = fault_rate
        self.kinds = kinds
        self.retry_after = retry_after
        self.stall_seconds = stall_seconds
        self.max_faults = max_faults
        self.match = match
        self.max_message_bytes = max_message_bytes
        self._rng = random.Random(seed)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._outage: _Outage | None = None
        self.port: int | None = None

    # ---- public API -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy is not running; call start() or use it as a context manager")
        return f"http://127.0.0.1:{self.port}"

    @property
    def counts(self) -> dict[str, int]:
        """requests seen, forwarded, and the number of each fault kind injected so far."""
        with self._lock:
            return dict(self._counts)

    def outage(self, seconds: float, kind: str = "500", *, after: int = 0,
               match: Callable[[str, str], bool] | None = None) -> None:
        """Arm a timed outage (module docstring): it begins at the ``after``-th next request that ``match`` accepts
        (None: any; ``after=0``: the next one) and lasts ``seconds``. ``counts["outage"]`` counts the requests it
        answered (or dropped); ``outage_window`` tells when it began and ended."""
        if kind not in OUTAGE_KINDS:
            raise ValueError(f"outage kind must be one of {OUTAGE_KINDS}, got {kind!r}")
        with self._lock:
            self._outage = _Outage(seconds, kind, after, match)

    def end_outage(self) -> None:
        """End an outage of answers ("500", "502", "504") at once: the server is back. (A refusal ends on its own.)"""
        with self._lock:
            o = self._outage
            if o is not None and o.kind != "refuse" and o.started is not None and o.ended is None:
                o.ended = time.monotonic()
                o.seconds = min(o.seconds, o.ended - o.started)
            elif o is not None and o.started is None:
                self._outage = None

    @property
    def outage_window(self) -> tuple[float | None, float | None]:
        """(start, end) of the armed outage in time.monotonic(); None for what has not happened yet."""
        with self._lock:
            o = self._outage
            if o is None or o.started is None:
                return None, None
            end = o.ended if o.ended is not None else (o.started + o.seconds if not o.active(time.monotonic())
                                                        else None)
            return o.started, end

    @property
    def faults(self) -> int:
        c = self.counts
        return sum(c.get(k, 0) for k in KINDS)

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(target=self._run, name="FaultProxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"FaultProxy could not start: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the event loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stopped = asyncio.Event()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._slots = asyncio.Semaphore(self._max_connections)
        self._refusing: asyncio.Future[None] | None = None
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=64 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopped.wait()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopped.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with self._slots:
                await self._handle(reader, writer)
        except (ConnectionError, _BadMessage, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or sent garbage: just close
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio's stream callback logs a cancelled task as an error)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self._counts["requests"] += 1
            o = self._outage
            if o is not None and (o.match is None or o.match(method, path)):
                now = time.monotonic()
                if o.started is None:
                    o.seen += 1
                    if o.seen > o.after:
                        o.started = now
                if o.active(now):
                    self._counts["outage"] += 1
                    return "outage"
            roll, pick = self._rng.random(), self._rng.choice(self.kinds)  # always draw both: reproducible
            allowed = self.match is None or self.match(method, path)
            under_cap = self.max_faults is None or sum(self._counts[k] for k in ALL_KINDS) < self.max_faults
            kind = pick if allowed and under_cap and roll < self.fault_rate else None
            self._counts[kind or "forwarded"] += 1
            return kind

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await _read_head(reader)
            if head is None:
                return
            start, headers = _parse_head(head)
            body, _ = await _read_body(reader, headers, self.max_message_bytes, until_eof=False)
            parts = start.split(b" ")
            method, path = parts[0].decode("latin-1"), (parts[1].decode("latin-1") if len(parts) > 1 else "")
            kind = self._decide(method, path)
            if kind == "outage":
                assert self._outage is not None
                if self._outage.kind == "refuse":
                    if self._refusing is None or self._refusing.done():
                        self._refusing = asyncio.ensure_future(self._refuse(self._outage))
                    return  # this connection is dropped with the others
                await self._answer_status(writer, int(self._outage.kind), b'{"detail": "Internal Server Error"}')
                continue
            if kind == "drop_before":
                return
            if kind in ("503", "429"):
                text = b"Service Unavailable" if kind == "503" else b"Too Many Requests"
                writer.write(
                    f"HTTP/1.1 {kind} {text.decode()}\r\ncontent-type: text/plain\r\n"
                    f"retry-after: {self.retry_after}\r\ncontent-length: {len(text)}\r\n\r\n".encode() + text
                )
                await writer.drain()
                continue
            if kind == "500":
                await self._answer_status(writer, 500, b'{"detail": "database or disk is full"}')
                continue
            if kind == "stall":
                await asyncio.sleep(self.stall_seconds)
                return
            answer, close_after = await self._forward(method, start, headers, body)
            if answer is None or kind == "drop_after":
                return
            if kind == "stall_after":
                await asyncio.sleep(self.stall_seconds)
                return
            writer.write(answer)
            await writer.drain()
            if close_after:
                return

    @staticmethod
    async def _answer_status(writer: asyncio.StreamWriter, status: int, text: bytes) -> None:
        writer.write(f"HTTP/1.1 {status} Server Error\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(text)}\r\n\r\n".encode() + text)
        await writer.drain()

    async def _refuse(self, outage: _Outage) -> None:
        """Stop listening and drop every connection for the outage's time, then listen on the same port again."""
        task = asyncio.current_task()
        assert task is not None and self._server is not None and outage.started is not None
        self._tasks.add(task)
        try:
            self._server.close()
            for other in list(self._tasks):
                if other is not task:
                    other.cancel()
            await asyncio.sleep(max(0.0, outage.started + outage.seconds - time.monotonic()))
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, limit=64 * 1024)
            with self._lock:
                outage.ended = time.monotonic()
        finally:
            self._tasks.discard(task)

    async def _forward(self, method: str, start: bytes, headers: list[tuple[bytes, bytes]],
                       body: bytes) -> tuple[bytes | None, bool]:
        """Send one request upstream on a fresh connection; the raw answer (None if upstream failed)."""
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=64 * 1024)
        except OSError:
            return None, True  # upstream down: the client sees a dropped connection, as without a proxy
        try:
            up_writer.write(_build_head(start, headers, [(b"connection", b"close")]) + body)
            await up_writer.drain()
            head = await _read_head(up_reader)
            if head is None:
                return None, True
            status_line, resp_headers = _parse_head(head)
            status = int(status_line.split(b" ")[1])
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                resp_body, by_eof = b"", False
            else:
                resp_body, by_eof = await _read_body(up_reader, resp_headers, self.max_message_bytes, until_eof=True)
            extra = [(b"connection", b"close")] if by_eof else []
            return _build_head(status_line, resp_headers, extra) + resp_body, by_eof
        except (ConnectionError, asyncio.IncompleteReadError, _BadMessage, ValueError, IndexError):
            return None, True
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()
