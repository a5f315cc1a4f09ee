"""The embedded server's SQLite store: knowledge bases, sessions and idempotency keys in one WAL file.

One connection, used by one thread at a time (the server serializes requests: see app.py); each mutating
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

from streamtrain.errors import StreamtrainError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

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


class StoreError(StreamtrainError):
    """The server's database file cannot be opened or used."""


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


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
            # A large page cache and fewer, larger checkpoints: learns touch random B-tree pages (sha1 keys),
            # and each checkpoint costs an fsync.
            self.conn.execute("PRAGMA cache_size=-65536")
            self.conn.execute("PRAGMA wal_autocheckpoint=8192")
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
        except sqlite3.DatabaseError as e:
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
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._depth = 0

    # ---------------------------------------------------------------- idempotency keys
    def get_key(self, key: str) -> tuple[str, str, int, bytes, float] | None:
        """(fingerprint, request, status, compressed body, created_at) stored under an idempotency key, or None."""
        return self.conn.execute("SELECT fingerprint, request, status, body, created_at FROM idempotency WHERE key=?",
                                 (key,)).fetchone()

    def put_key(self, key: str, fingerprint: str, request: str, status: int, body: bytes, now: float) -> None:
        """Store an answer under a key (in the caller's transaction); the body is stored zlib-compressed: with
        keys on every request this table holds a day of answers."""
        self.conn.execute("INSERT OR REPLACE INTO idempotency(key,fingerprint,request,status,body,created_at) "
                          "VALUES(?,?,?,?,?,?)", (key, fingerprint, request, status, zlib.compress(body, 1), now))

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
