"""KATO 3.10.1 semantics over the SQLite store: sessions, observe, auto-learn, learn, knowledge bases.

Sessions are cached in memory and written through to SQLite in the same transaction as the request's
other effects, so a restarted server finds every session (and its STM) as the last answered request
left it. On a rollback the touched cache entries are dropped and re-read from the database.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from itertools import chain
from typing import Any

from streamtrain.patterns import PREFIX, list_hash, pattern_hash, strip_prefix
from streamtrain.patterns import kb_id as kato_kb_id
from streamtrain.server.kbindex import KBIndexes
from streamtrain.server.predictions import predict
from streamtrain.server.session import (
    DEFAULT_TTL,
    PERSISTENCE,
    STM_CAP,
    Session,
    accumulate_metadata,
    average_emotives,
)
from streamtrain.server.store import Store, events_json

log = logging.getLogger(__name__)

SERVICE_NAME = "kato"

__all__ = ["SERVICE_NAME", "Engine", "Session"]


class Engine:
    """Sessions, observations, learning and predictions over a Store. `clock` gives the time in seconds since the
    epoch (time.time by default; tests inject their own to move through TTLs without waiting)."""

    def __init__(self, store: Store, *, service_name: str = SERVICE_NAME,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.service_name = service_name
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self._kb_for_node: dict[str, str] = {}
        self._known_kbs: set[str] = set()
        self.started = clock()
        self._last_sweep = 0.0
        self.kb_version: dict[str, int] = {}     # bumped on every KB change (prediction caches)
        self.kb_index = KBIndexes()

    # ---------------------------------------------------------------- helpers
    def kb_id(self, node_id: str) -> str:
        kid = self._kb_for_node.get(node_id)
        if kid is None:
            kid = kato_kb_id(node_id, self.service_name)
            if len(self._kb_for_node) > 100_000:
                self._kb_for_node.clear()
            self._kb_for_node[node_id] = kid
        return kid

    def forget(self, session_id: str | None = None, *, knowledge: bool = True) -> None:
        """Drop cached state after a rollback: it may hold effects that were not committed.

        knowledge=False keeps the knowledge-base caches: for error answers given before anything was learned."""
        if session_id is None:
            self.sessions.clear()
        else:
            self.sessions.pop(session_id, None)
        if knowledge:
            self._known_kbs.clear()
            self.kb_version.clear()
            self.kb_index.drop()

    def _bump(self, kb: str) -> None:
        self.kb_version[kb] = self.kb_version.get(kb, 0) + 1

    # ---------------------------------------------------------------- sessions
    def create_session(self, node_id: str, metadata: dict[str, Any] | None, ttl_seconds: int | None,
                       overrides: dict[str, Any]) -> Session:
        now = self.clock()
        ttl = ttl_seconds if ttl_seconds is not None else DEFAULT_TTL
        sid = f"session-{uuid.uuid4().hex}-{int(now * 1000)}"
        s = Session(session_id=sid, node_id=node_id, kb_id=self.kb_id(node_id), created_at=now,
                    expires_at=now + ttl, ttl_seconds=ttl, metadata=metadata or {}, config=overrides)
        self._ensure_kb(s.kb_id, node_id)
        self.store.insert_session(sid, node_id, now, s.expires_at, ttl, s.state_json())
        s.persisted_expiry = s.expires_at
        self.sessions[sid] = s
        return s

    def get_session(self, session_id: str, *, touch: bool = True) -> Session | None:
        """The live session or None (unknown or expired); `touch` slides the expiry like KATO's get_session."""
        now = self.clock()
        s = self.sessions.get(session_id)
        if s is None:
            row = self.store.get_session(session_id)
            if row is None:
                return None
            st = json.loads(row[4])
            s = Session(session_id=session_id, node_id=row[0], kb_id=self.kb_id(row[0]), created_at=row[1],
                        expires_at=row[2], ttl_seconds=row[3], metadata=st["metadata"], config=st["config"],
                        stm=st["stm"], emotives_acc=st["emotives_acc"], metadata_acc=st["metadata_acc"],
                        time=st["time"], percept=st.get("percept", {}), persisted_expiry=row[2])
            self.sessions[session_id] = s
        if s.expires_at <= now:
            return None
        if touch:
            s.expires_at = now + s.ttl_seconds
        return s

    def session_exists(self, session_id: str) -> bool:
        return self.get_session(session_id, touch=False) is not None

    def save_session(self, s: Session) -> None:
        """Write the session (in the caller's transaction), trimming STM and accumulators like KATO's save."""
        if len(s.stm) > STM_CAP:
            del s.stm[:-STM_CAP]
        if len(s.emotives_acc) > STM_CAP:
            del s.emotives_acc[:-STM_CAP]
        if len(s.metadata_acc) > STM_CAP:
            del s.metadata_acc[:-STM_CAP]
        self.store.update_session(s.session_id, s.expires_at, s.ttl_seconds, s.state_json())
        s.persisted_expiry = s.expires_at

    def extend_session(self, s: Session, ttl_seconds: int) -> None:
        s.expires_at = self.clock() + ttl_seconds     # once; the next access slides back to the session ttl
        self.save_session(s)

    def persist_expiry(self, s: Session, *, force: bool = False) -> None:
        """Sliding expiry of read-only requests: written lazily (at most once a minute per session)."""
        if force or abs(s.expires_at - s.persisted_expiry) > 60:
            self.store.update_expiry(s.session_id, s.expires_at)
            s.persisted_expiry = s.expires_at

    def delete_session(self, session_id: str) -> None:
        self.store.delete_session(session_id)
        self.sessions.pop(session_id, None)

    def active_sessions(self) -> int:
        return self.store.active_sessions(self.clock())

    def sweep(self, idempotency_ttl: float) -> None:
        """Remove expired sessions and idempotency keys (called now and then, in its own transaction)."""
        now = self.clock()
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        self.store.sweep(now, idempotency_ttl)
        for sid in [k for k, s in self.sessions.items() if s.expires_at <= now]:
            del self.sessions[sid]

    # ---------------------------------------------------------------- knowledge base
    def _ensure_kb(self, kb: str, node_id: str) -> None:
        if kb in self._known_kbs:
            return
        self.store.ensure_kb(kb, node_id)
        self._known_kbs.add(kb)

    def learn_events(self, s: Session, events: list[list[str]], *, with_context: bool) -> str:
        """Store `events` as a pattern of the session's KB; the bare sha1, or "" when < 2 symbols.

        with_context: manual learns attach the session's emotives/metadata accumulators; auto-learns
        (max_pattern_length) do not, as in KATO 3.10.1."""
        emotives = s.emotives_acc[-PERSISTENCE:] if with_context else []
        metadata = accumulate_metadata(s.metadata_acc) if with_context else {}
        return self.learn_pattern(s.kb_id, s.node_id, events, emotives, metadata)

    def learn_pattern(self, kb: str, node_id: str, events: list[list[str]], emotives: list[dict[str, Any]],
                      metadata: dict[str, list[str]]) -> str:
        """Store sorted `events` as a pattern of knowledge base `kb` (first created by `node_id`): a new row, or
        one more on its frequency. The bare sha1, or "" when the events hold fewer than 2 symbols."""
        n = sum(len(e) for e in events)
        if n < 2:
            return ""
        name = pattern_hash(events)
        self._ensure_kb(kb, node_id)
        counts: dict[str, int] = {}
        for e in events:
            for sym in e:
                counts[sym] = counts.get(sym, 0) + 1
        if self.store.add_pattern(kb, name, events, n, counts, emotives, metadata):
            self.kb_index.on_learn(kb, name, events)
        else:
            context = None
            if emotives or metadata:
                old_e, old_m = self.store.pattern_context(kb, name)
                new_e = (old_e + emotives)[-PERSISTENCE:] if emotives else old_e
                for k, vals in metadata.items():
                    old_m[k] = sorted(set(old_m.get(k, [])) | set(vals))
                context = (new_e, old_m)
            self.store.relearn_pattern(kb, name, n, counts, context)
        self._bump(kb)
        return name

    def learn_patterns(self, items: list[tuple[str, list[list[str]]]]) -> list[str]:
        """Learn each (node_id, sorted events) item as learn_pattern would, in order, with no emotives or metadata
        (learn-batch items): the bare sha1 of each, "" under 2 symbols. The same database state as the learns one by
        one, written with one statement per table for the whole list: the counts are added up here first."""
        names: list[str] = []
        todo: list[tuple[str, str, list[list[str]], int]] = []      # (kb, name, events, length)
        by_kb: dict[str, set[str]] = {}
        for node_id, events in items:
            n = sum(map(len, events))
            if n < 2:
                names.append("")
                continue
            name = list_hash(events)  # lists of sorted lists (service._sorted_items)
            kb = self.kb_id(node_id)
            self._ensure_kb(kb, node_id)
            names.append(name)
            todo.append((kb, name, events, n))
            by_kb.setdefault(kb, set()).add(name)
        if not todo:
            return names
        known = {kb: self.store.existing_patterns(kb, sorted(ns)) for kb, ns in by_kb.items()}
        new: dict[tuple[str, str], list[Any]] = {}         # (kb, name) -> [kb, name, pattern_data, length, frequency]
        relearned: dict[tuple[str, str], int] = {}
        symbols: dict[str, list[str]] = {}                  # kb -> every symbol learned (its frequency increments)
        firsts: dict[str, list[str]] = {}                   # kb -> each new pattern's distinct symbols (pmf)
        totals: dict[str, list[int]] = {}                   # kb -> [new patterns, symbols, learns]
        learned: list[tuple[str, str, list[list[str]]]] = []
        for kb, name, events, n in todo:
            t = totals.get(kb)
            if t is None:
                t = totals[kb] = [0, 0, 0]
                symbols[kb], firsts[kb] = [], []
            t[1] += n
            t[2] += 1
            symbols[kb].extend(chain.from_iterable(events))
            row = new.get((kb, name))
            if row is not None:
                row[4] += 1
            elif name in known[kb]:
                relearned[(kb, name)] = relearned.get((kb, name), 0) + 1
            else:
                new[(kb, name)] = [kb, name, events_json(events), n, 1]
                t[0] += 1
                firsts[kb].extend(set(chain.from_iterable(events)))
                learned.append((kb, name, events))
        new_symbols: list[tuple[str, str, int, int]] = []
        old_symbols: list[tuple[int, str, str]] = []
        for kb, syms in symbols.items():  # Counter counts in C: a learn-batches request has ~50,000 symbols
            pmf = Counter(firsts[kb])
            for sym, k in Counter(syms).items():
                if sym in pmf:
                    new_symbols.append((kb, sym, k, pmf[sym]))
                else:
                    old_symbols.append((k, kb, sym))
        self.store.write_learns(
            [(kb, name, data, n, k) for kb, name, data, n, k in new.values()],
            [(k, kb, name) for (kb, name), k in relearned.items()],
            new_symbols, old_symbols, [(t[0], t[1], t[2], kb) for kb, t in totals.items()])
        for kb, name, events in learned:
            self.kb_index.on_learn(kb, name, events)
        for kb, t in totals.items():
            self.kb_version[kb] = self.kb_version.get(kb, 0) + t[2]
        return names

    def clear_kb(self, kb: str) -> None:
        self.store.clear_kb(kb)
        self.kb_index.drop(kb)
        self._bump(kb)

    def kb_known(self, node_id: str) -> bool:
        """Whether the node's knowledge base exists (a session was created or a pattern learned for it)."""
        return self.store.kb_exists(self.kb_id(node_id))

    def get_pattern(self, kb: str, name: str) -> dict[str, Any] | None:
        row = self.store.get_pattern(kb, strip_prefix(name))
        if row is None:
            return None
        return {"name": PREFIX + strip_prefix(name), "pattern_data": json.loads(row[0]), "length": row[1],
                "frequency": row[2], "emotives": json.loads(row[3]), "metadata": json.loads(row[4])}

    # ---------------------------------------------------------------- observe / learn
    def observe(self, s: Session, strings: list[str], vectors: list[list[float]], emotives: dict[str, float],
                metadata: dict[str, Any], cfg: dict[str, Any], *, predict: bool) -> str | None:
        """One observation (observation_processor.process_observation + KatoProcessor.observe).

        Returns the auto-learned pattern name ("PTRN|..") or None. `predict` says whether to compute the
        observe-time predictions (only the last observation of a request needs them)."""
        symbols = sorted(strings)     # global SORT_SYMBOLS=true: the session's sort_symbols is ignored
        auto = None
        if strings or vectors:
            if symbols:
                s.stm.append(symbols)
            if predict and cfg.get("process_predictions"):
                s.predictions = self.observe_predictions(s)
            mpl = cfg.get("max_pattern_length") or 0
            if isinstance(mpl, int) and mpl > 0 and len(s.stm) >= mpl:
                stm = s.stm
                name = self.learn_events(s, stm, with_context=False)
                auto = (PREFIX + name) if name else None
                if cfg.get("stm_mode") == "ROLLING" and len(stm) > 1:
                    window = mpl - 1
                    s.stm = list(stm[-window:]) if len(stm) > window else list(stm[1:])
                else:
                    s.stm = []
        s.time += 1
        if emotives:
            s.emotives_acc.append(dict(emotives))
        if metadata:
            s.metadata_acc.append(dict(metadata))
        s.percept = {"strings": symbols, "vectors": vectors, "emotives": average_emotives(s.emotives_acc),
                     "path": [], "metadata": dict(metadata)}
        return auto

    def learn(self, s: Session) -> str:
        """Manual learn of the whole STM; the STM is always cleared. Returns "PTRN|.." or ""."""
        events, s.stm = s.stm, []
        name = self.learn_events(s, events, with_context=True)
        return PREFIX + name if name else ""

    def clear_stm(self, s: Session) -> None:
        s.stm = []
        s.emotives_acc = []
        s.metadata_acc = []
        s.time = 0
        s.percept = {}
        s.predictions = []

    # ---------------------------------------------------------------- predictions (see predictions.py)
    def predict(self, kb: str, stm: list[list[str]], **options: Any
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """predictions.predict against knowledge base `kb` (its in-memory index loaded on first use)."""
        return predict(self.store, self.kb_index.get(self.store, kb), kb, stm, **options)

    def observe_predictions(self, s: Session) -> list[dict[str, Any]]:
        # Observe-time predictions use the global settings (threshold 0.1, 100 predictions).
        preds, _ = self.predict(s.kb_id, s.stm, recall_threshold=0.1, max_predictions=100, use_token_matching=True)
        return preds

    def predictions(self, s: Session) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        cfg = s.effective_config()
        return self.predict(s.kb_id, s.stm, recall_threshold=cfg["recall_threshold"],
                            max_predictions=cfg["max_predictions"], use_token_matching=bool(cfg["use_token_matching"]))

    # ---------------------------------------------------------------- extensions
    def nodes(self) -> list[dict[str, Any]]:
        return [{"node_id": node, "kb_id": kb, "pattern_count": count, "total_frequency": total}
                for kb, node, count, total in self.store.nodes()]

    def node_patterns(self, node_id: str, offset: int, limit: int) -> dict[str, Any]:
        kb = self.kb_id(node_id)
        total, rows = self.store.node_patterns(kb, offset, limit)
        return {"node_id": node_id, "kb_id": kb, "total": total, "offset": offset, "limit": limit,
                "patterns": [{"name": PREFIX + r[0], "pattern_data": json.loads(r[1]), "frequency": r[2]}
                             for r in rows]}

    def node_stats(self, node_id: str) -> dict[str, Any]:
        kb = self.kb_id(node_id)
        count, total, distinct = self.store.node_stats(kb)
        return {"node_id": node_id, "kb_id": kb, "pattern_count": count, "total_frequency": total,
                "distinct_symbols": distinct}

    def symbol_stats(self, kb: str) -> dict[str, Any]:
        return {r[0]: {"name": r[0], "frequency": r[1], "pattern_member_frequency": r[2]}
                for r in self.store.symbol_stats(kb)}
