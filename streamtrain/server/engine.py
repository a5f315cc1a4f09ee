"""KATO 3.10.1 semantics over the SQLite store: sessions, observe, auto-learn, learn, knowledge bases.

Sessions are cached in memory and written through to SQLite in the same transaction as the request's
other effects, so a restarted server finds every session (and its STM) as the last answered request
left it. On a rollback the touched cache entries are dropped and re-read from the database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from streamtrain.patterns import PREFIX, kb_id as kato_kb_id, pattern_hash, strip_prefix
from streamtrain.server import session_config as sc
from streamtrain.server.store import Store, dumps

log = logging.getLogger(__name__)

STM_CAP = 1000          # session_manager.py:53-79: STM and accumulators trimmed at save
PERSISTENCE = 5         # global emotive window (the per-session value is ignored by KATO)
DEFAULT_TTL = 3600
SERVICE_NAME = "kato"


@dataclass
class Session:
    session_id: str
    node_id: str
    kb_id: str
    created_at: float
    expires_at: float
    ttl_seconds: int
    metadata: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)      # overrides only
    stm: list[list[str]] = field(default_factory=list)
    emotives_acc: list[dict[str, float]] = field(default_factory=list)
    metadata_acc: list[dict[str, Any]] = field(default_factory=list)
    time: int = 0
    percept: dict[str, Any] = field(default_factory=dict)
    # Predictions computed by the last observe (process_predictions); memory only, for cognition-data.
    predictions: list[dict[str, Any]] = field(default_factory=list)
    persisted_expiry: float = 0.0

    def effective_config(self) -> dict[str, Any]:
        return sc.effective(self.config)

    def state_json(self) -> str:
        return dumps({"metadata": self.metadata, "config": self.config, "stm": self.stm,
                      "emotives_acc": self.emotives_acc, "metadata_acc": self.metadata_acc,
                      "time": self.time, "percept": self.percept})


def iso(ts: float) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def accumulate_metadata(acc: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for md in acc:
        for k, v in md.items():
            out.setdefault(k, set()).add(str(v))
    return {k: sorted(v) for k, v in out.items()}


def average_emotives(acc: list[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for e in acc:
        for k, v in e.items():
            sums.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


class Engine:
    def __init__(self, store: Store, *, service_name: str = SERVICE_NAME) -> None:
        self.store = store
        self.service_name = service_name
        self.sessions: dict[str, Session] = {}
        self._kb_for_node: dict[str, str] = {}
        self._known_kbs: set[str] = set()
        self.started = time.time()
        self._last_sweep = 0.0
        self.kb_version: dict[str, int] = {}     # bumped on every KB change (prediction caches)
        from streamtrain.server.predictions import KBIndexes
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
        now = time.time()
        ttl = ttl_seconds if ttl_seconds is not None else DEFAULT_TTL
        sid = f"session-{uuid.uuid4().hex}-{int(now * 1000)}"
        s = Session(session_id=sid, node_id=node_id, kb_id=self.kb_id(node_id), created_at=now,
                    expires_at=now + ttl, ttl_seconds=ttl, metadata=metadata or {}, config=overrides)
        self._ensure_kb(s.kb_id, node_id)
        self.store.conn.execute(
            "INSERT INTO sessions(session_id,node_id,created_at,expires_at,ttl_seconds,state) VALUES(?,?,?,?,?,?)",
            (sid, node_id, now, s.expires_at, ttl, s.state_json()))
        s.persisted_expiry = s.expires_at
        self.sessions[sid] = s
        return s

    def get_session(self, session_id: str, *, touch: bool = True) -> Session | None:
        """The live session or None (unknown or expired); `touch` slides the expiry like KATO's get_session."""
        now = time.time()
        s = self.sessions.get(session_id)
        if s is None:
            row = self.store.conn.execute(
                "SELECT node_id, created_at, expires_at, ttl_seconds, state FROM sessions WHERE session_id=?",
                (session_id,)).fetchone()
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
        self.store.conn.execute("UPDATE sessions SET expires_at=?, ttl_seconds=?, state=? WHERE session_id=?",
                                (s.expires_at, s.ttl_seconds, s.state_json(), s.session_id))
        s.persisted_expiry = s.expires_at

    def persist_expiry(self, s: Session, *, force: bool = False) -> None:
        """Sliding expiry of read-only requests: written lazily (at most once a minute per session)."""
        if force or abs(s.expires_at - s.persisted_expiry) > 60:
            with self.store.transaction() as c:
                c.execute("UPDATE sessions SET expires_at=? WHERE session_id=?", (s.expires_at, s.session_id))
            s.persisted_expiry = s.expires_at

    def delete_session(self, session_id: str) -> None:
        self.store.conn.execute("DELETE FROM sessions WHERE session_id=?", (session_id,))
        self.sessions.pop(session_id, None)

    def sweep(self, idempotency_ttl: float) -> None:
        """Remove expired sessions and idempotency keys (called now and then, in its own transaction)."""
        now = time.time()
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        with self.store.transaction() as c:
            c.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            c.execute("DELETE FROM idempotency WHERE created_at < ?", (now - idempotency_ttl,))
        for sid in [k for k, s in self.sessions.items() if s.expires_at <= now]:
            del self.sessions[sid]

    # ---------------------------------------------------------------- knowledge base
    def _ensure_kb(self, kb: str, node_id: str) -> None:
        if kb in self._known_kbs:
            return
        self.store.conn.execute("INSERT OR IGNORE INTO kbs(kb_id, node_id) VALUES(?, ?)", (kb, node_id))
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
        c = self.store.conn
        self._ensure_kb(kb, node_id)
        counts: dict[str, int] = {}
        for e in events:
            for sym in e:
                counts[sym] = counts.get(sym, 0) + 1
        cur = c.execute(
            "INSERT INTO patterns(kb_id,name,pattern_data,length,frequency,emotives,metadata) "
            "VALUES(?,?,?,?,1,?,?) ON CONFLICT(kb_id,name) DO NOTHING",
            (kb, name, dumps(events), n, dumps(emotives), dumps(metadata)))
        if cur.rowcount == 1:
            c.executemany("INSERT OR IGNORE INTO symbol_index(kb_id,symbol,name) VALUES(?,?,?)",
                          [(kb, sym, name) for sym in counts])
            c.executemany(
                "INSERT INTO symbols(kb_id,symbol,frequency,pmf) VALUES(?,?,?,1) ON CONFLICT(kb_id,symbol) "
                "DO UPDATE SET frequency=frequency+excluded.frequency, pmf=pmf+1",
                [(kb, sym, k) for sym, k in counts.items()])
            self.kb_index.on_learn(kb, name, events)
            c.execute("UPDATE kbs SET unique_patterns=unique_patterns+1, "
                      "total_pattern_frequencies=total_pattern_frequencies+1, "
                      "total_symbols_in_patterns_frequencies=total_symbols_in_patterns_frequencies+?, "
                      "total_frequency=total_frequency+1 WHERE kb_id=?", (n, kb))
        else:
            if emotives or metadata:
                row = c.execute("SELECT emotives, metadata FROM patterns WHERE kb_id=? AND name=?",
                                (kb, name)).fetchone()
                old_e, old_m = json.loads(row[0]), json.loads(row[1])
                new_e = (old_e + emotives)[-PERSISTENCE:] if emotives else old_e
                for k, vals in metadata.items():
                    old_m[k] = sorted(set(old_m.get(k, [])) | set(vals))
                c.execute("UPDATE patterns SET frequency=frequency+1, emotives=?, metadata=? "
                          "WHERE kb_id=? AND name=?", (dumps(new_e), dumps(old_m), kb, name))
            else:
                c.execute("UPDATE patterns SET frequency=frequency+1 WHERE kb_id=? AND name=?", (kb, name))
            c.executemany("UPDATE symbols SET frequency=frequency+? WHERE kb_id=? AND symbol=?",
                          [(k, kb, sym) for sym, k in counts.items()])
            c.execute("UPDATE kbs SET total_symbols_in_patterns_frequencies=total_symbols_in_patterns_frequencies+?, "
                      "total_frequency=total_frequency+1 WHERE kb_id=?", (n, kb))
        self._bump(kb)
        return name

    def clear_kb(self, kb: str) -> None:
        c = self.store.conn
        for table in ("patterns", "symbols", "symbol_index"):
            c.execute(f"DELETE FROM {table} WHERE kb_id=?", (kb,))
        c.execute("UPDATE kbs SET unique_patterns=0, total_pattern_frequencies=0, "
                  "total_symbols_in_patterns_frequencies=0, total_frequency=0 WHERE kb_id=?", (kb,))
        self.kb_index.drop(kb)
        self._bump(kb)

    def get_pattern(self, kb: str, name: str) -> dict[str, Any] | None:
        row = self.store.conn.execute(
            "SELECT pattern_data, length, frequency, emotives, metadata FROM patterns WHERE kb_id=? AND name=?",
            (kb, strip_prefix(name))).fetchone()
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
    def observe_predictions(self, s: Session) -> list[dict[str, Any]]:
        from streamtrain.server.predictions import predict
        # Observe-time predictions use the global settings (threshold 0.1, 100 predictions).
        preds, _ = predict(self, s.kb_id, s.stm, recall_threshold=0.1, max_predictions=100,
                           use_token_matching=True)
        return preds

    def predictions(self, s: Session) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        from streamtrain.server.predictions import predict
        cfg = s.effective_config()
        return predict(self, s.kb_id, s.stm, recall_threshold=cfg["recall_threshold"],
                       max_predictions=cfg["max_predictions"], use_token_matching=bool(cfg["use_token_matching"]))

    # ---------------------------------------------------------------- extensions
    def nodes(self) -> list[dict[str, Any]]:
        rows = self.store.conn.execute(
            "SELECT kb_id, node_id, unique_patterns, total_frequency FROM kbs ORDER BY kb_id").fetchall()
        return [{"node_id": r[1], "kb_id": r[0], "pattern_count": r[2], "total_frequency": r[3]} for r in rows]

    def node_patterns(self, node_id: str, offset: int, limit: int) -> dict[str, Any]:
        kb = self.kb_id(node_id)
        c = self.store.conn
        total = c.execute("SELECT COUNT(*) FROM patterns WHERE kb_id=?", (kb,)).fetchone()[0]
        rows = c.execute("SELECT name, pattern_data, frequency FROM patterns WHERE kb_id=? ORDER BY name "
                         "LIMIT ? OFFSET ?", (kb, limit, offset)).fetchall()
        return {"node_id": node_id, "kb_id": kb, "total": total, "offset": offset, "limit": limit,
                "patterns": [{"name": PREFIX + r[0], "pattern_data": json.loads(r[1]), "frequency": r[2]}
                             for r in rows]}

    def node_stats(self, node_id: str) -> dict[str, Any]:
        kb = self.kb_id(node_id)
        c = self.store.conn
        row = c.execute("SELECT unique_patterns, total_frequency FROM kbs WHERE kb_id=?", (kb,)).fetchone()
        distinct = c.execute("SELECT COUNT(*) FROM symbols WHERE kb_id=?", (kb,)).fetchone()[0]
        return {"node_id": node_id, "kb_id": kb, "pattern_count": row[0] if row else 0,
                "total_frequency": row[1] if row else 0, "distinct_symbols": distinct}

    def symbol_stats(self, kb: str) -> dict[str, Any]:
        rows = self.store.conn.execute("SELECT symbol, frequency, pmf FROM symbols WHERE kb_id=?", (kb,)).fetchall()
        return {r[0]: {"name": r[0], "frequency": r[1], "pattern_member_frequency": r[2]} for r in rows}


def body_fingerprint(method: str, path: str, body: bytes) -> str:
    h = hashlib.sha256()
    h.update(method.encode())
    h.update(b"\0")
    h.update(path.encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    h.update(body)
    return h.hexdigest()
