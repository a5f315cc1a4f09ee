"""The embedded server's SQLite store: knowledge bases, sessions and idempotency keys in one WAL file.

All of the server's SQL is here: the engine and the routes call these methods. One connection, used by one thread
at a time (the server serializes requests: see app.py); each mutating
request runs inside :meth:`Store.transaction`, which commits once at the end, so a crash leaves either all of a
request's effects or none. A second, read-only connection (:meth:`Store.reader`) serves `GET /health`, which
takes no lock: in WAL mode it reads the last commit while a write transaction is open on the first.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamtrain.disk import describe_disk
from streamtrain.jsonbytes import compact_json
from streamtrain.server.walcheckpoint import BACKSTOP_PAGES, WalCheckpointer

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SQL_CHUNK = 500      # host parameters of one IN (...) query

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kbs (
    kb_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,                 -- the node id that first created this knowledge base
    unique_patterns INTEGER NOT NULL DEFAULT 0,
    total_pattern_frequencies INTEGER NOT NULL DEFAULT 0,   -- KATO: only counts NEW patterns
    total_symbols_in_patterns_frequencies INTEGER NOT NULL DEFAULT 0,
    total_frequency INTEGER NOT NULL DEFAULT 0               -- sum of pattern frequencies
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS patterns (
    kb_id TEXT NOT NULL,
    name TEXT NOT NULL,                    -- bare sha1
    pattern_data TEXT NOT NULL,            -- JSON list of sorted events
    length INTEGER NOT NULL,               -- total number of symbols
    frequency INTEGER NOT NULL,
    emotives TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (kb_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS symbols (
    kb_id TEXT NOT NULL,
    symbol TEXT NOT NULL,
    frequency INTEGER NOT NULL,            -- occurrences in learned patterns, re-learns included
    pmf INTEGER NOT NULL,                  -- number of distinct patterns holding the symbol
    PRIMARY KEY (kb_id, symbol)
) WITHOUT ROWID;
-- No longer written or read (a knowledge base's symbol index is built in memory from its patterns, kbindex.py):
-- kept so that files written before still open, and cleared with their knowledge bases.
CREATE TABLE IF NOT EXISTS symbol_index (
    kb_id TEXT NOT NULL,
    symbol TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (kb_id, symbol, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    ttl_seconds INTEGER NOT NULL,
    state TEXT NOT NULL                    -- JSON: metadata, config, stm, accumulators, time
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,             -- sha256 of method, path and body
    request TEXT NOT NULL,                 -- "METHOD /path" for error messages
    status INTEGER NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at);
"""


class StoreError(Exception):
    """The server's database file cannot be opened or used; ``storage``: because of its disk (full, read-only,
    a failed write), not its content or settings. The server's own error, not one of the trainer's
    (``streamtrain.errors``): ``streamtrain serve`` turns it into a message and an exit code."""

    def __init__(self, message: str, *, storage: bool = False) -> None:
        super().__init__(message)
        self.storage = storage


# SQLite's primary result codes of a write the disk refused, and the error code of the server's 507 answer.
_STORAGE_CODES = {"SQLITE_FULL": "INSUFFICIENT_STORAGE", "SQLITE_READONLY": "STORAGE_READ_ONLY",
                  "SQLITE_IOERR": "STORAGE_IO_ERROR", "SQLITE_CANTOPEN": "STORAGE_CANNOT_OPEN"}
_STORAGE_TEXTS = {"database or disk is full": "SQLITE_FULL", "readonly database": "SQLITE_READONLY",
                  "disk i/o error": "SQLITE_IOERR", "unable to open database file": "SQLITE_CANTOPEN"}
_STORAGE_CAUSES = {"INSUFFICIENT_STORAGE": "no room is left (the disk is full, or the database reached a size limit)",
                   "STORAGE_READ_ONLY": "the database file or its disk is read-only",
                   "STORAGE_IO_ERROR": "a write to its disk failed (full, a file-size limit, or a failing disk)",
                   "STORAGE_CANNOT_OPEN": "a file of the database cannot be created or opened there"}


def storage_code(exc: BaseException) -> str | None:
    """The 507 error code of a SQLite error of the disk (full, read-only, a failed write), else None."""
    if not isinstance(exc, sqlite3.Error):
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""  # SQLITE_IOERR_WRITE ... (Python 3.11+)
    for primary, code in _STORAGE_CODES.items():
        if name == primary or name.startswith(primary + "_"):
            return code
    text = str(exc).lower()
    for fragment, primary in _STORAGE_TEXTS.items():
        if fragment in text:
            return _STORAGE_CODES[primary]
    return None


def storage_failure(exc: sqlite3.Error, db: Path, code: str, *, request: bool = True) -> str:
    """What a 507 answer (``request``) or a server that cannot start says: the database, why, its disk, and what
    to do."""
    again = ("Nothing of the request was applied. What to do: free space on that disk or make it writable, then send "
             "the request again (a streamtrain run: run the same command again; it resumes exactly)." if request else
             "What to do: free space on that disk or make it writable, then start the server again (a streamtrain "
             "run: run the same command again).")
    return f"the server cannot write its database {db}: {_STORAGE_CAUSES[code]} (SQLite: {exc}; {describe_disk(db)}). {again}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def events_json(events: list[list[str]]) -> str:
    """``dumps(events)``: a pattern's pattern_data (thousands per request: jsonbytes is the fast way)."""
    return compact_json(events).decode("utf-8", "surrogatepass")


class Store:
    """A SQLite database in WAL mode; `sync` is "normal" (survives process kills) or "full" (power loss)."""

    def __init__(self, path: str | os.PathLike[str], *, sync: str = "normal") -> None:
        self.path = Path(path)
        if sync not in ("normal", "full"):
            raise StoreError(f"sync must be 'normal' or 'full', got {sync!r}")
        if self.path.is_dir():
            raise StoreError(f"database path {self.path} is a directory; give a file path")
        if not self.path.parent.is_dir():
            raise StoreError(f"database folder {self.path.parent} does not exist; create it first")
        if self.path.exists() and not self.path.stat().st_mode & 0o222:
            # Checked by mode bits, not os.access: root may write anyway, but a file made read-only is a
            # statement that it must not change.
            raise StoreError(f"database file {self.path} is read-only (mode {self.path.stat().st_mode & 0o777:o}); "
                             "make it writable or give another --db path")
        try:
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                        cached_statements=256)
            self.conn.execute("PRAGMA journal_mode=WAL").fetchone()
            self.conn.execute(f"PRAGMA synchronous={sync.upper()}")
            self.conn.execute("PRAGMA busy_timeout=5000")
            # A large page cache: learns touch random B-tree pages (sha1 keys). Checkpoints run in a background
            # thread (walcheckpoint.py); the writer's own auto-checkpoint is only a backstop.
            self.conn.execute("PRAGMA cache_size=-65536")
            self.conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            self.conn.execute("PRAGMA temp_store=MEMORY")
            self.conn.executescript(_SCHEMA)
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(f"{self.path} has schema version {row[0]}, this server reads {SCHEMA_VERSION}; "
                                 "use a new database file")
            # An id made once per database file: a trainer checks it on resume, so a deleted, replaced or
            # swapped database is noticed instead of training on as if it held the run's knowledge base.
            row = self.conn.execute("SELECT value FROM meta WHERE key='database_id'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta(key, value) VALUES('database_id', ?)", (uuid.uuid4().hex,))
                row = self.conn.execute("SELECT value FROM meta WHERE key='database_id'").fetchone()
            self.database_id: str = row[0]
            # Keys created before this time may have been removed by a sweep (of this or an earlier server on the file,
            # whatever its key lifetime); all younger ones are still stored. GET / tells it: a trainer resuming steps
            # in doubt knows whether their keys can still be honoured.
            row = self.conn.execute("SELECT value FROM meta WHERE key='keys_swept_before'").fetchone()
            self.keys_swept_before: float = float(row[0]) if row else 0.0
        except sqlite3.DatabaseError as e:
            code = storage_code(e)
            if code is not None:  # the disk, not the file: say which disk, how full, and what to do
                raise StoreError(storage_failure(e, self.path, code, request=False), storage=True) from e
            msg = str(e)
            if "readonly" in msg or "read-only" in msg or "unable to open" in msg:
                hint = "make the file and its folder writable, or give another --db path"
            elif "not a database" in msg or "malformed" in msg:
                hint = "this file is not a streamtrain server database; give another --db path"
            else:
                hint = "check the path and its permissions"
            raise StoreError(f"cannot use database {self.path}: {msg}; {hint}") from e
        self._depth = 0
        self._closed = False
        self._reader: sqlite3.Connection | None = None
        self.checkpointer = WalCheckpointer(self.path)

    def reader(self) -> sqlite3.Connection:
        """A second connection that only reads (for requests that must answer while a write is in progress)."""
        if self._reader is None:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=2000")
            conn.execute("PRAGMA query_only=1")
            self._reader = conn
        return self._reader

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE .. COMMIT); rolls back on any exception. Not re-entrant."""
        if self._depth:
            raise RuntimeError("nested Store.transaction")
        self._depth = 1
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self.checkpointer.nudge()
        finally:
            self._depth = 0

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite left one open: a failed COMMIT (a full disk) may have rolled it back
        itself (then a ROLLBACK would fail and hide the first error) or not (then the next BEGIN would fail)."""
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("rolling back a failed transaction of %s failed", self.path, exc_info=True)

    def _rows_in(self, select: str, head: tuple[Any, ...], values: list[str]) -> Iterator[Any]:
        """The rows of ``select`` (ending in ``IN``) for ``values``, in queries of at most _SQL_CHUNK of them."""
        for i in range(0, len(values), _SQL_CHUNK):
            part = values[i:i + _SQL_CHUNK]
            yield from self.conn.execute(f"{select} ({','.join('?' * len(part))})", (*head, *part))

    # ---------------------------------------------------------------- idempotency keys
    def get_keys(self, keys: list[str]) -> dict[str, tuple[str, str, int, bytes, float]]:
        """get_key of many keys (those stored)."""
        select = "SELECT key, fingerprint, request, status, body, created_at FROM idempotency WHERE key IN"
        return {row[0]: row[1:] for row in self._rows_in(select, (), keys)}

    def get_key(self, key: str) -> tuple[str, str, int, bytes, float] | None:
        """(fingerprint, request, status, compressed body, created_at) stored under an idempotency key, or None."""
        return self.conn.execute("SELECT fingerprint, request, status, body, created_at FROM idempotency WHERE key=?",
                                 (key,)).fetchone()

    def put_key(self, key: str, fingerprint: str, request: str, status: int, body: bytes, now: float) -> None:
        """Store an answer under a key (in the caller's transaction); the body is stored zlib-compressed: with
        keys on every request this table holds a day of answers."""
        self.conn.execute("INSERT OR REPLACE INTO idempotency(key,fingerprint,request,status,body,created_at) "
                          "VALUES(?,?,?,?,?,?)", (key, fingerprint, request, status, zlib.compress(body, 1), now))

    def put_keys(self, rows: list[tuple[str, str, str, int, bytes, float]]) -> None:
        """put_key for many (key, fingerprint, request, status, body, now) rows."""
        self.conn.executemany("INSERT OR REPLACE INTO idempotency(key,fingerprint,request,status,body,created_at) "
                              "VALUES(?,?,?,?,?,?)", [(k, f, r, s, zlib.compress(b, 1), t) for k, f, r, s, b, t in rows])

    def sweep(self, now: float, idempotency_ttl: float) -> None:
        """Remove expired sessions and idempotency keys, in a transaction of its own; remember the newest bound keys
        were removed below (``keys_swept_before``)."""
        bound = max(self.keys_swept_before, now - idempotency_ttl)
        with self.transaction() as c:
            c.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            c.execute("DELETE FROM idempotency WHERE created_at < ?", (now - idempotency_ttl,))
            if bound > self.keys_swept_before:
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('keys_swept_before', ?)", (repr(bound),))
        self.keys_swept_before = bound

    # ---------------------------------------------------------------- sessions
    def insert_session(self, session_id: str, node_id: str, created_at: float, expires_at: float, ttl: int,
                       state: str) -> None:
        self.conn.execute(
            "INSERT INTO sessions(session_id,node_id,created_at,expires_at,ttl_seconds,state) VALUES(?,?,?,?,?,?)",
            (session_id, node_id, created_at, expires_at, ttl, state))

    def get_session(self, session_id: str) -> tuple[str, float, float, int, str] | None:
        """(node_id, created_at, expires_at, ttl_seconds, state JSON) of a stored session, or None."""
        return self.conn.execute(
            "SELECT node_id, created_at, expires_at, ttl_seconds, state FROM sessions WHERE session_id=?",
            (session_id,)).fetchone()

    def update_session(self, session_id: str, expires_at: float, ttl: int, state: str) -> None:
        self.conn.execute("UPDATE sessions SET expires_at=?, ttl_seconds=?, state=? WHERE session_id=?",
                          (expires_at, ttl, state, session_id))

    def update_expiry(self, session_id: str, expires_at: float) -> None:
        """Write a session's sliding expiry, in a transaction of its own (read-only requests)."""
        with self.transaction() as c:
            c.execute("UPDATE sessions SET expires_at=? WHERE session_id=?", (expires_at, session_id))

    def delete_session(self, session_id: str) -> None:
        self.conn.execute("DELETE FROM sessions WHERE session_id=?", (session_id,))

    def active_sessions(self, now: float) -> int:
        """Sessions not expired, read through the reader connection (no lock needed: GET /health)."""
        return self.reader().execute("SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (now,)).fetchone()[0]

    # ---------------------------------------------------------------- knowledge bases
    def ensure_kb(self, kb: str, node_id: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO kbs(kb_id, node_id) VALUES(?, ?)", (kb, node_id))

    def kb_exists(self, kb: str) -> bool:
        return self.conn.execute("SELECT 1 FROM kbs WHERE kb_id=?", (kb,)).fetchone() is not None

    def add_pattern(self, kb: str, name: str, events: list[list[str]], length: int, counts: dict[str, int],
                    emotives: list[dict[str, Any]], metadata: dict[str, list[str]]) -> bool:
        """Insert a new pattern (frequency 1) with its symbol statistics; False (nothing written)
        when the knowledge base already holds it."""
        c = self.conn
        cur = c.execute(
            "INSERT INTO patterns(kb_id,name,pattern_data,length,frequency,emotives,metadata) "
            "VALUES(?,?,?,?,1,?,?) ON CONFLICT(kb_id,name) DO NOTHING",
            (kb, name, dumps(events), length, dumps(emotives), dumps(metadata)))
        if cur.rowcount != 1:
            return False
        c.executemany(
            "INSERT INTO symbols(kb_id,symbol,frequency,pmf) VALUES(?,?,?,1) ON CONFLICT(kb_id,symbol) "
            "DO UPDATE SET frequency=frequency+excluded.frequency, pmf=pmf+1",
            [(kb, sym, k) for sym, k in counts.items()])
        c.execute("UPDATE kbs SET unique_patterns=unique_patterns+1, "
                  "total_pattern_frequencies=total_pattern_frequencies+1, "
                  "total_symbols_in_patterns_frequencies=total_symbols_in_patterns_frequencies+?, "
                  "total_frequency=total_frequency+1 WHERE kb_id=?", (length, kb))
        return True

    def existing_patterns(self, kb: str, names: list[str]) -> set[str]:
        """Those of `names` the knowledge base holds."""
        return {r[0] for r in self._rows_in("SELECT name FROM patterns WHERE kb_id=? AND name IN", (kb,), names)}

    def write_learns(self, new: list[tuple[str, str, str, int, int]], relearned: list[tuple[int, str, str]],
                     new_symbols: list[tuple[str, str, int, int]],
                     old_symbols: list[tuple[int, str, str]], totals: list[tuple[int, int, int, str]]) -> None:
        """The aggregated effect of many learns (Engine.learn_patterns), one statement per table: `new` patterns
        (kb, name, pattern_data, length, frequency) with no emotives or metadata; frequency increments of stored
        ones (k, kb, name); symbol upserts (kb, symbol, frequency increment, pmf
        increment) for symbols of new patterns, frequency increments (k, kb, symbol) of symbols
        only re-learned; the knowledge bases' totals (new patterns, symbols, learns, kb). Rows are written in
        key order (fewer B-tree page visits); the resulting state is that of the learns one by one."""
        c = self.conn
        if new:
            c.executemany("INSERT INTO patterns(kb_id,name,pattern_data,length,frequency,emotives,metadata) "
                          "VALUES(?,?,?,?,?,'[]','{}')", sorted(new))
        if relearned:
            c.executemany("UPDATE patterns SET frequency=frequency+? WHERE kb_id=? AND name=?", relearned)
        if new_symbols:
            c.executemany(
                "INSERT INTO symbols(kb_id,symbol,frequency,pmf) VALUES(?,?,?,?) ON CONFLICT(kb_id,symbol) "
                "DO UPDATE SET frequency=frequency+excluded.frequency, pmf=pmf+excluded.pmf", sorted(new_symbols))
        if old_symbols:
            c.executemany("UPDATE symbols SET frequency=frequency+? WHERE kb_id=? AND symbol=?", old_symbols)
        c.executemany("UPDATE kbs SET unique_patterns=unique_patterns+?1, "
                      "total_pattern_frequencies=total_pattern_frequencies+?1, "
                      "total_symbols_in_patterns_frequencies=total_symbols_in_patterns_frequencies+?2, "
                      "total_frequency=total_frequency+?3 WHERE kb_id=?4", totals)

    def pattern_context(self, kb: str, name: str) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
        """(emotives, metadata) stored with a pattern."""
        row = self.conn.execute("SELECT emotives, metadata FROM patterns WHERE kb_id=? AND name=?",
                                (kb, name)).fetchone()
        return json.loads(row[0]), json.loads(row[1])

    def relearn_pattern(self, kb: str, name: str, length: int, counts: dict[str, int],
                        context: tuple[list[dict[str, Any]], dict[str, list[str]]] | None) -> None:
        """One more on an existing pattern's frequency and its symbols'; `context` replaces its emotives and
        metadata when given."""
        c = self.conn
        if context is not None:
            c.execute("UPDATE patterns SET frequency=frequency+1, emotives=?, metadata=? WHERE kb_id=? AND name=?",
                      (dumps(context[0]), dumps(context[1]), kb, name))
        else:
            c.execute("UPDATE patterns SET frequency=frequency+1 WHERE kb_id=? AND name=?", (kb, name))
        c.executemany("UPDATE symbols SET frequency=frequency+? WHERE kb_id=? AND symbol=?",
                      [(k, kb, sym) for sym, k in counts.items()])
        c.execute("UPDATE kbs SET total_symbols_in_patterns_frequencies=total_symbols_in_patterns_frequencies+?, "
                  "total_frequency=total_frequency+1 WHERE kb_id=?", (length, kb))

    def clear_kb(self, kb: str) -> None:
        c = self.conn
        for table in ("patterns", "symbols", "symbol_index"):
            c.execute(f"DELETE FROM {table} WHERE kb_id=?", (kb,))
        c.execute("UPDATE kbs SET unique_patterns=0, total_pattern_frequencies=0, "
                  "total_symbols_in_patterns_frequencies=0, total_frequency=0 WHERE kb_id=?", (kb,))

    def get_pattern(self, kb: str, name: str) -> tuple[str, int, int, str, str] | None:
        """(pattern_data, length, frequency, emotives, metadata), the JSON fields as stored, or None."""
        return self.conn.execute(
            "SELECT pattern_data, length, frequency, emotives, metadata FROM patterns WHERE kb_id=? AND name=?",
            (kb, name)).fetchone()

    def iter_patterns(self, kb: str) -> Iterator[tuple[str, str]]:
        """(name, pattern_data JSON) of every pattern of `kb`, by name."""
        return iter(self.conn.execute("SELECT name, pattern_data FROM patterns WHERE kb_id=? ORDER BY name", (kb,)))

    def kb_stats(self, kb: str) -> tuple[int, int, int]:
        """(unique_patterns, total_pattern_frequencies, distinct symbols) of `kb`; zeros when unknown."""
        c = self.conn
        row = c.execute("SELECT unique_patterns, total_pattern_frequencies FROM kbs WHERE kb_id=?", (kb,)).fetchone()
        total_symbols = c.execute("SELECT COUNT(*) FROM symbols WHERE kb_id=?", (kb,)).fetchone()[0]
        return (row[0] if row else 0), (row[1] if row else 0), total_symbols

    def pmf(self, kb: str, symbols: set[str]) -> dict[str, int]:
        """symbol -> number of distinct patterns holding it, for those of `symbols` the knowledge base knows."""
        return dict(self._rows_in("SELECT symbol, pmf FROM symbols WHERE kb_id=? AND symbol IN", (kb,), sorted(symbols)))

    def frequencies_and_emotives(self, kb: str, names: list[str]) -> dict[str, tuple[int, list]]:
        """name -> (frequency, emotives) for those of `names` the knowledge base holds."""
        rows = self._rows_in("SELECT name, frequency, emotives FROM patterns WHERE kb_id=? AND name IN", (kb,), names)
        return {name: (freq, json.loads(emo)) for name, freq, emo in rows}

    def symbol_stats(self, kb: str) -> list[tuple[str, int, int]]:
        """(symbol, frequency, pmf) of every symbol of `kb`."""
        return self.conn.execute("SELECT symbol, frequency, pmf FROM symbols WHERE kb_id=?", (kb,)).fetchall()

    # ---------------------------------------------------------------- the /nodes extensions
    def nodes(self) -> list[tuple[str, str, int, int]]:
        """(kb_id, node_id, unique_patterns, total_frequency) of every knowledge base, by kb_id."""
        return self.conn.execute(
            "SELECT kb_id, node_id, unique_patterns, total_frequency FROM kbs ORDER BY kb_id").fetchall()

    def node_patterns(self, kb: str, offset: int, limit: int) -> tuple[int, list[tuple[str, str, int]]]:
        """(total, [(name, pattern_data JSON, frequency)]) of one page of `kb`'s patterns, by name."""
        c = self.conn
        total = c.execute("SELECT COUNT(*) FROM patterns WHERE kb_id=?", (kb,)).fetchone()[0]
        rows = c.execute("SELECT name, pattern_data, frequency FROM patterns WHERE kb_id=? ORDER BY name "
                         "LIMIT ? OFFSET ?", (kb, limit, offset)).fetchall()
        return total, rows

    def node_stats(self, kb: str) -> tuple[int, int, int]:
        """(unique_patterns, total_frequency, distinct symbols) of `kb`; zeros when unknown."""
        c = self.conn
        row = c.execute("SELECT unique_patterns, total_frequency FROM kbs WHERE kb_id=?", (kb,)).fetchone()
        distinct = c.execute("SELECT COUNT(*) FROM symbols WHERE kb_id=?", (kb,)).fetchone()[0]
        return (row[0] if row else 0), (row[1] if row else 0), distinct

    def close(self) -> None:
        """Fold the WAL into the main file, then close: a stopped server's database file is complete on its own
        (it can be copied without its -wal file)."""
        if self._reader is not None:
            try:
                self._reader.close()
            except sqlite3.Error:
                log.debug("closing the reader of %s failed", self.path, exc_info=True)
            self._reader = None
        if self._closed:
            return
        self._closed = True
        self.checkpointer.stop()
        try:
            busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if busy:
                log.warning("could not fold the WAL of %s into the database file (busy); copy it with its -wal file",
                            self.path)
        except sqlite3.Error:
            log.warning("could not fold the WAL of %s into the database file; copy it with its -wal file", self.path)
        try:
            self.conn.close()
        except sqlite3.Error:  # closing is best effort at shutdown
            log.debug("closing %s failed", self.path, exc_info=True)
