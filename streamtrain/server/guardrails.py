"""The ASGI middleware every request passes first: the bearer token (every route but /health), the request body
size limit, UTF-8 JSON bodies, and the lock that serializes requests.

Requests are serialized: one lock is held from the moment a request is let in until its answer starts (a client slow
to read its answer holds nobody up). Handlers run on the event loop, except learn-batch and learn-batches, which are
parsed and applied in a worker thread while the lock is held, so `GET /health` (its own SQLite connection, no lock)
answers meanwhile. After this middleware every request goes through the app's routes: there is no other path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any


def render(payload: Any) -> bytes:
    """JSON as the server sends it (the same encoding as Starlette's JSONResponse)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


# Routes that take no lock: they touch no state a request changes (/health reads through its own connection).
UNLOCKED_PATHS = frozenset({"/health", "/"})


def bearer_ok(header: bytes, token: bytes) -> bool:
    """`Authorization: Bearer <token>`, the scheme name in any case (RFC 7235), compared in constant time."""
    scheme, _, credentials = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


class Guardrails:
    """ASGI middleware: bearer token (every route but /health), the request body size limit, and the lock that
    serializes requests (see the module docstring)."""

    def __init__(self, app, *, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body_bytes
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:   # in-process tests may run several loops in turn
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def _call_locked(self, scope, receive, send):
        """The app under the lock, released as soon as the answer starts (a client slow to read its answer must
        not hold every other request up)."""
        lock = self.lock()
        await lock.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                lock.release()

        async def send_and_release(message):
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            return await self.app(scope, receive, send_and_release)
        finally:
            release()

    async def _send_json(self, send, status: int, payload: Any, headers: list | None = None) -> None:
        body = render(payload)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())] + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] != "/health":
            if not bearer_ok(headers.get(b"authorization", b""), self.token):
                return await self._send_json(
                    send, 401, {"detail": "Missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                                          "with the token the server was started with (--token)"},
                    [(b"www-authenticate", b"Bearer")])
        too_big = {"detail": f"Request body exceeds the server limit of {self.max_body} bytes (--max-body-bytes); "
                             "send smaller batches"}
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    return await self._send_json(send, 413, too_big)
            except ValueError:
                return await self._send_json(send, 400, {"detail": "Invalid Content-Length header"})
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            # Buffer the (bounded) body so a chunked upload is limited too, then replay it to the app.
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    return await self._send_json(send, 413, too_big)
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
            # Every body this server takes is JSON, whatever content type it was sent with (a body that is not
            # UTF-8 under another content type used to reach FastAPI's error encoder and fail there with a 500).
            if body:
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as e:
                    return await self._send_json(send, 400, {
                        "detail": f"Request body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 4]!r}); "
                                  "send JSON encoded as UTF-8"})
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self._call_locked(scope, replay, send)
        if scope["path"] in UNLOCKED_PATHS:
            return await self.app(scope, receive, send)
        return await self._call_locked(scope, receive, send)


