"""Sessions and their turns in one SQLite file.

Durability: WAL journal with `synchronous=FULL`, so a turn is on disk once `append` returns; a kill -9
(or a power cut) right after loses nothing. One connection is shared by every thread behind a lock:
SQLite serializes writers anyway, and a turn is a few hundred bytes, so the fsync, not the lock, is
the cost.

Ownership: a session belongs to an opaque `owner` string (the server passes a hash of the API key,
None when it runs without keys). Reading or deleting another owner's session fails exactly like a
missing one, so session ids cannot be probed across keys.
"""
from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kuaida.dialogue.template import ROLES
from kuaida.errors import InvalidArgumentError, KuaidaError, SessionNotFoundError

log = logging.getLogger(__name__)

# Schema version n is reached by running _MIGRATIONS[n - 1] on version n - 1 (0 = empty file).
_MIGRATIONS = [
    (
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT, system TEXT, options TEXT NOT NULL,"
        " created INTEGER NOT NULL)",
        "CREATE TABLE turns (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,"
        " role TEXT NOT NULL, content TEXT NOT NULL, created INTEGER NOT NULL, meta TEXT NOT NULL)",
        "CREATE INDEX turns_by_session ON turns (session_id, id)",
    ),
]
SCHEMA_VERSION = len(_MIGRATIONS)


@dataclass
class Session:
    id: str
    owner: str | None
    system: str | None
    options: dict
    created: int  # unix seconds


class SessionStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; each statement commits on its own unless
        # wrapped in an explicit BEGIN (the migration).
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            self._configure()
            self._migrate()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise KuaidaError(f"{self.path} is not a usable session database ({e}); "
                              "point the server at a new file or move this one away") from e

    def _configure(self) -> None:
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":  # e.g. a filesystem without shared memory: still correct, just slower
            log.warning("session store %s: journal mode is %s, not WAL", self.path, mode)
        self._conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit
        self._conn.execute("PRAGMA foreign_keys=ON")  # deleting a session deletes its turns

    def _migrate(self) -> None:
        # BEGIN IMMEDIATE takes the write lock before reading the version, so two processes opening a
        # new file at once cannot both create the tables.
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise KuaidaError(f"{self.path} has session schema {version}, newer than this kuaida "
                                      f"({SCHEMA_VERSION}): upgrade kuaida or use another file")
                for statements in _MIGRATIONS[version:]:
                    for sql in statements:
                        self._conn.execute(sql)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        if version < SCHEMA_VERSION:
            log.info("session store %s: schema %d -> %d", self.path, version, SCHEMA_VERSION)

    def create(self, owner: str | None, system: str | None = None, options: dict | None = None) -> Session:
        session = Session(id="sess_" + secrets.token_hex(12), owner=owner, system=system,
                          options=dict(options or {}), created=int(time.time()))
        with self._lock:
            self._conn.execute(
                "INSERT INTO sessions (id, owner, system, options, created) VALUES (?, ?, ?, ?, ?)",
                (session.id, owner, system, json.dumps(session.options), session.created),
            )
        return session

    def get(self, session_id: str, owner: str | None) -> Session:
        with self._lock:
            row = self._conn.execute(
                "SELECT id, owner, system, options, created FROM sessions WHERE id = ? AND owner IS ?",
                (session_id, owner),
            ).fetchone()
        if row is None:
            raise _not_found(session_id)
        return Session(id=row[0], owner=row[1], system=row[2], options=json.loads(row[3]), created=row[4])

    def append(self, session_id: str, role: str, content: str, meta: dict | None = None) -> int:
        """Store one turn; -> its id. It is committed (fsynced) when this returns."""
        if role not in ROLES:
            raise InvalidArgumentError(f"role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidArgumentError("a turn's content must be a string")
        row = (session_id, role, content, int(time.time()), json.dumps(meta or {}))
        try:
            with self._lock:
                cursor = self._conn.execute(
                    "INSERT INTO turns (session_id, role, content, created, meta) VALUES (?, ?, ?, ?, ?)", row
                )
        except sqlite3.IntegrityError as e:  # the foreign key: no such session (or deleted meanwhile)
            raise _not_found(session_id) from e
        return cursor.lastrowid

    def turns(self, session_id: str) -> list[dict]:
        """The session's turns in order: [{"role", "content", "created", "meta"}]."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT role, content, created, meta FROM turns WHERE session_id = ? ORDER BY id",
                (session_id,),
            ).fetchall()
        return [{"role": r, "content": c, "created": t, "meta": json.loads(m)} for r, c, t, m in rows]

    def delete(self, session_id: str, owner: str | None) -> None:
        with self._lock:
            cursor = self._conn.execute("DELETE FROM sessions WHERE id = ? AND owner IS ?",
                                        (session_id, owner))
        if cursor.rowcount == 0:
            raise _not_found(session_id)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _not_found(session_id: str) -> SessionNotFoundError:
    return SessionNotFoundError(f"session {session_id} not found")
