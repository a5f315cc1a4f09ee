"""uvicorn's HTTP protocol (httptools) with a deadline for receiving each request whole.

uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``), but it has no
timeout for a request that is still arriving: a client that opens a connection and sends nothing, or sends its
headers a byte at a time ("slowloris"), or declares a body and never sends it, holds the connection (and a file
descriptor) for ever. Here every request must arrive whole in time:

* its request line and headers within ``header_timeout`` seconds of the connection opening (first request) or of
  the request's first byte (later requests on a keep-alive connection; the idle time before that byte is bounded
  by ``timeout_keep_alive``); otherwise the server answers ``408`` and closes the connection;
* its body within ``header_timeout`` more seconds plus its length at ``min_upload_rate`` bytes per second (a
  chunked body: the largest accepted body at that rate); otherwise the connection is closed.

The time the application takes to answer is not limited: only reading the request is.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from streamtrain.server.defaults import DEFAULT_HEADER_TIMEOUT, MIN_UPLOAD_RATE

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s")


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request does not arrive whole in time (module docstring)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    min_upload_rate: float = MIN_UPLOAD_RATE
    max_body_bytes: int = 32 * 1024 * 1024

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = False

    # -- the deadline
    def _arm(self, seconds: float, in_headers: bool) -> None:
        self._disarm()
        self._in_headers = in_headers
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._in_headers:
            body = (b'{"detail":"Request not received in time: the request line and headers must arrive within '
                    + str(self.header_timeout).encode() + b' s"}')
            transport.write(_REQUEST_TIMEOUT % (len(body), body))
            what = "headers"
        else:
            what = "body"
        log.info("closing connection from %s: request %s not received in time", self.client, what)
        transport.close()

    # -- uvicorn's protocol callbacks
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.header_timeout, True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:      # the first request's deadline runs from the connection's opening
            self._arm(self.header_timeout, True)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        length = None
        for name, value in self.headers or ():
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        size = min(length if length is not None else self.max_body_bytes, self.max_body_bytes)
        self._arm(self.header_timeout + size / self.min_upload_rate, False)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def deadline_protocol(header_timeout: float, max_body_bytes: int,
                      min_upload_rate: float = MIN_UPLOAD_RATE) -> type[DeadlineHttpToolsProtocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) with these limits."""
    return type("DeadlineHttpToolsProtocol", (DeadlineHttpToolsProtocol,),
                {"header_timeout": header_timeout, "max_body_bytes": max_body_bytes,
                 "min_upload_rate": min_upload_rate})
