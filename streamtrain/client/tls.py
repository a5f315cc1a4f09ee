"""The process's one SSL context for its HTTP clients.

httpx.Client makes a new SSL context per client and loads certifi's bundle into it, ~50 ms each, also for an
http:// server; a trainer, its workers and the notebooks' helpers make several clients per call.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """httpx's default SSL context (certifi's bundle, or $SSL_CERT_FILE / $SSL_CERT_DIR as they are when first
    asked), made once."""
    return httpx.create_ssl_context()
