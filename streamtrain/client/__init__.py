"""The client side of the wire: everything that talks to a KATO server (a real one or the embedded one).

    from streamtrain.client import KatoClient
    with KatoClient("http://127.0.0.1:8000") as client:
        client.info()

* ``kato.py``: ``KatoClient``, one HTTP call per method, retried when that is safe; the only module that catches
  httpx's errors. ``extensions.py``: the embedded server's extension calls, mixed into it.
* ``retry.py``: which failed attempts are sent again; ``outage.py``: the server's outage, whose budget bounds the
  retries of every client of a run; ``tls.py``: the one SSL context.
* ``exactly_once.py``: learning a unit exactly once on top of the client (``NodeSession``).

It imports nothing of the server (``streamtrain/server/``): what both sides read (the request and answer models,
the limits) is in ``wire.py`` and ``limits.py`` (``tests/test_layering.py``). The argument for the retries and the
exactly-once protocols is docs/client.md.
"""

from __future__ import annotations

from .kato import KatoClient

__all__ = ["KatoClient"]
