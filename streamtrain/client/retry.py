"""How ``KatoClient`` reads a failed exchange: which attempts are sent again, Retry-After, error codes.

An attempt that failed in a way worth another is a :class:`Transient`; ``ambiguous`` says the request may have
been applied (then only reads, idempotent writes and keyed calls are resent), ``outage`` says in words what the
server is doing ("answering 500", "refusing connections") for the run's outage tracker. Everything else (an answer,
a programming error) is final. The table is in docs/client.md ("Retry policy").
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable
from datetime import datetime, timezone

import httpx

__all__ = [
    "AMBIGUOUS_STATUS", "SAFE_STATUS", "SAFE_TRANSPORT", "Transient", "error_code", "is_retryable", "parse_retry_after",
    "short", "transport_outage",
]


class Transient(Exception):
    """One failed attempt that may be worth another. ``ambiguous``: the request may have been applied;
    ``outage``: what the server does, in words after "server" ("answering 500", "refusing connections")."""

    def __init__(self, cause: str, *, ambiguous: bool, retry_after: float | None = None,
                 exc: BaseException | None = None, outage: str = "failing") -> None:
        super().__init__(cause)
        self.cause = cause
        self.ambiguous = ambiguous
        self.retry_after = retry_after
        self.exc = exc
        self.outage = outage


SAFE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # never sent
SAFE_STATUS = {429, 503}  # answered before the application ran
# 500: the application failed, maybe after a write (KATO stores a pattern before it saves the session); 502/504: a
# proxy gave up, upstream may have applied it. Every other 5xx is final: 501 and 505 will not change on a resend,
# 507 (a full disk) needs a person.
AMBIGUOUS_STATUS = {500, 502, 504}


def transport_outage(exc: httpx.TransportError) -> str:
    """What a transport error says the server does, in words after "server"."""
    if isinstance(exc, httpx.TimeoutException):
        return "timing out"
    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        while cause is not None:  # httpx -> httpcore -> the OSError
            if isinstance(cause, ConnectionRefusedError):
                return "refusing connections"
            cause = cause.__cause__ or cause.__context__
        return "not reachable"
    return "dropping connections"


def is_retryable(exc: BaseException, *, resend_ambiguous: bool) -> bool:
    """Whether a failed attempt may be sent again.

    Args:
        exc: the failed attempt, as raised inside the retry loop.
        resend_ambiguous: true for reads, idempotent writes and keyed calls, which may be resent even when
            the first copy could have been applied.
    """
    if not isinstance(exc, Transient):
        return False  # answers (4xx, 501, 505, 507, bad bodies) and programming errors are final
    return resend_ambiguous or not exc.ambiguous


def parse_retry_after(value: str | None, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds (fractions accepted) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - now()).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def short(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit`` characters (for messages)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def error_code(response: httpx.Response) -> str | None:
    """The code of a structured error body, ``{"error": {"code": ...}}`` (KATO's and the embedded server's), or None."""
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None
