"""The calls of the embedded server's extensions (a real KATO has none), mixed into ``KatoClient``.

``/learn-batches`` (several keyed samples per request), the ``/nodes`` listings and statistics, and the whole
knowledge base for tests and notebooks. ``supports_*`` read the server's advertised extensions (``GET /``).
``/learn-batch`` stays in ``kato.py`` with its part size. The request bodies and answers are ``wire.py``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel

from .. import wire
from ..errors import ProtocolError
from ..patterns import strip_prefix
from .retry import short

M = TypeVar("M", bound=BaseModel)

__all__ = ["EmbeddedExtensions"]


class EmbeddedExtensions:
    """Extension calls; ``KatoClient`` provides the plumbing they use (``info``, ``_get``, ``_post``)."""

    if TYPE_CHECKING:
        base_url: str

        def info(self) -> wire.ServiceInfo: ...

        def _get(self, path: str, model: type[M], *, params: Mapping[str, Any] | None = None,
                 session_id: str | None = None) -> M: ...

        def _post(self, path: str, model: type[M], *, json: Any = None, params: Mapping[str, Any] | None = None,
                  session_id: str | None = None, resend: bool, idempotency_key: str | None = None) -> M: ...

    @cached_property
    def supports_learn_batches(self) -> bool:
        """Whether the server offers ``POST /learn-batches`` (several keyed batches per request; the embedded server
        with idempotency on)."""
        info = self.info()
        return info.idempotency and "learn-batches" in info.extensions

    @cached_property
    def supports_nodes(self) -> bool:
        """Whether the server offers the ``/nodes`` listings (the embedded server's extension; a real KATO has none)."""
        try:
            return "nodes" in self.info().extensions
        except ProtocolError:  # GET / is not a KATO service description: no extension either
            return False

    def nodes(self) -> list[wire.NodeInfo]:
        """Every node with a knowledge base (embedded server extension ``GET /nodes``)."""
        return self._get("/nodes", wire.NodeList).nodes

    def node_patterns(self, node_id: str, page_size: int = 500) -> Iterator[wire.NodePattern]:
        """Every pattern of a node, ordered by name, fetched page by page."""
        offset = 0
        while True:
            page = self._get(f"/nodes/{quote(node_id, safe='')}/patterns", wire.NodePatternsPage,
                             params={"offset": offset, "limit": page_size})
            yield from page.patterns
            offset += len(page.patterns)
            if not page.patterns or offset >= page.total:
                return

    def node_stats(self, node_id: str) -> wire.NodeStats:
        return self._get(f"/nodes/{quote(node_id, safe='')}/stats", wire.NodeStats)

    def learn_batches(
        self, batches: Sequence[tuple[str, Sequence[tuple[str, Sequence[Sequence[str]]]]]]
    ) -> list[list[str]]:
        """Several ``(key, items)`` batches in one request (embedded server extension ``POST /learn-batches``), each
        item ``(node_id, events)`` learned as one pattern, in order, in one transaction; the names of each batch.

        Each batch is applied at most once per key: a batch whose key the server already holds with the same items
        is answered from its store and applies nothing, so the request is resent after any ambiguous failure. A key
        held with other items refuses the whole request: ``KeyAlreadyUsed`` (a ``ProtocolError`` with
        ``status_code`` 422) naming the key, nothing applied; more items than the server's ``--max-batch-items`` in
        all: 413. Use only when ``supports_learn_batches``. The request is ``wire.LearnBatches``."""
        answer = self._post("/learn-batches", wire.LearnBatchesResult, json=wire.learn_batches_body(batches),
                            resend=True)
        keys = [key for key, _items in batches]
        if [r.key for r in answer.results] != keys:
            raise ProtocolError(f"server {self.base_url}: POST /learn-batches answered for the keys "
                                f"{short(str([r.key for r in answer.results]))}, not for {short(str(keys))}")
        return [r.patterns for r in answer.results]

    def export_knowledge_base(self) -> dict[str, dict[str, int]]:
        """node_id -> {pattern name ("PTRN|..."): frequency} for every node (tests and notebooks)."""
        return {
            n.node_id: {"PTRN|" + strip_prefix(p.name): p.frequency for p in self.node_patterns(n.node_id)}
            for n in self.nodes()
        }
