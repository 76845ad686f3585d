"""One knowledge base = one SQLite file (WAL): documents, chunks with their vectors, an FTS5 index.

    store = Store(path)                     # creates the schema on a new file
    store.put_document("setup.md", sha, size, chunks, vectors)   # one transaction
    store.keyword("reset hub", 50)          # [(chunk id, bm25 score)], best first

Vectors are float32 blobs in the chunks table, so the file is the whole base (copy it, and search
works). The FTS5 table indexes heading + text with Porter stemming ("resetting" finds "reset"); it is an
external-content index kept in step by triggers. `generation` (in meta) goes up with every write, so a
reader in any process can tell that its cached vector matrix is stale.

Concurrency: one connection per Store, shared by threads behind a lock (each call is short: the slow
part of an ingest, embedding, happens before the write transaction). WAL lets another process (the
CLI adding documents) write while a server reads.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kuaida.errors import KuaidaError

SCHEMA_VERSION = 1
_SCHEMA = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ("CREATE TABLE documents (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL,"
     " bytes INTEGER NOT NULL, added_at TEXT NOT NULL)"),
    ("CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id),"
     " seq INTEGER NOT NULL, heading TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL,"
     " UNIQUE (doc_id, seq))"),
    ("CREATE VIRTUAL TABLE chunks_fts USING fts5(heading, text, content='chunks', content_rowid='id',"
     " tokenize='porter unicode61 remove_diacritics 2')"),
    ("CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN"
     " INSERT INTO chunks_fts (rowid, heading, text) VALUES (new.id, new.heading, new.text); END"),
    ("CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN INSERT INTO chunks_fts (chunks_fts, rowid, heading,"
     " text) VALUES ('delete', old.id, old.heading, old.text); END"),
]


@dataclass(frozen=True)
class DocumentInfo:
    name: str
    chunks: int
    bytes: int
    sha256: str
    added_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class StoredChunk:
    id: int
    doc: str
    seq: int  # 1-based position in its document
    heading: str
    text: str


class Store:
    def __init__(self, path: Path, create: bool = False, meta: dict[str, str] | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; writes are explicit BEGIN IMMEDIATE ... COMMIT.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            if create:
                self._create(meta or {})
            self.meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise KuaidaError(f"{path} is not a kuaida knowledge base ({e}); delete it or pick another name") from None
        if int(self.meta.get("schema", 0)) != SCHEMA_VERSION:
            self._conn.close()
            raise KuaidaError(f"{path} has knowledge-base schema {self.meta.get('schema')!r}, this kuaida reads "
                              f"{SCHEMA_VERSION}; recreate the base")

    def _create(self, meta: dict[str, str]) -> None:
        with self._transaction():
            for statement in _SCHEMA:
                self._conn.execute(statement)
            rows = {"schema": str(SCHEMA_VERSION), "generation": "0", **meta}
            self._conn.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())

    def _transaction(self, mode: str = "IMMEDIATE"):
        return _Transaction(self._conn, mode)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- writes: each is one transaction, so a failure (or a crash) leaves the base as it was ---

    def put_document(self, name: str, sha256: str, size: int, chunks: list[tuple[str, str]],
                     vectors: np.ndarray) -> bool:
        """Insert or replace document `name` with chunks [(heading, text)] and vectors float32 [n, dim].
        Returns True when it replaced an older version."""
        assert len(chunks) == len(vectors), (len(chunks), vectors.shape)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._lock, self._transaction():
            row = self._conn.execute("SELECT id FROM documents WHERE name = ?", (name,)).fetchone()
            if row:
                self._conn.execute("DELETE FROM chunks WHERE doc_id = ?", row)
                self._conn.execute("UPDATE documents SET sha256 = ?, bytes = ?, added_at = ? WHERE id = ?",
                                   (sha256, size, now, row[0]))
                doc_id = row[0]
            else:
                doc_id = self._conn.execute("INSERT INTO documents (name, sha256, bytes, added_at) "
                                            "VALUES (?, ?, ?, ?)", (name, sha256, size, now)).lastrowid
            self._conn.executemany(
                "INSERT INTO chunks (doc_id, seq, heading, text, vector) VALUES (?, ?, ?, ?, ?)",
                ((doc_id, seq, heading, text, vec.astype(np.float32).tobytes())
                 for seq, ((heading, text), vec) in enumerate(zip(chunks, vectors), 1)))
            self._bump_generation()
        return row is not None

    def remove_document(self, name: str) -> int | None:
        """Delete a document and its chunks; the number of chunks removed, None if there is no such name."""
        with self._lock, self._transaction():
            row = self._conn.execute("SELECT id FROM documents WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            removed = self._conn.execute("DELETE FROM chunks WHERE doc_id = ?", row).rowcount
            self._conn.execute("DELETE FROM documents WHERE id = ?", row)
            self._bump_generation()
        return removed

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # --- reads ---

    def sha256_of(self, name: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT sha256 FROM documents WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def documents(self) -> list[DocumentInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT d.name, (SELECT COUNT(*) FROM chunks c WHERE c.doc_id = d.id), d.bytes, d.sha256, "
                "d.added_at FROM documents d ORDER BY d.name").fetchall()
        return [DocumentInfo(*row) for row in rows]

    def generation(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def vectors(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(generation, chunk ids int64 [n], vectors float32 [n, dim]), read in one snapshot."""
        with self._lock, self._transaction("DEFERRED"):  # a read snapshot: generation and rows agree
            gen = int(self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            rows = self._conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        dim = int(self.meta["dim"])
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        # copy(): frombuffer over bytes is read-only, which torch.from_numpy warns about (~3 ms for 10k rows).
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim).copy()
        return gen, ids, matrix

    def keyword(self, fts_query: str, limit: int) -> list[tuple[int, float]]:
        """[(chunk id, score)] best first; score = -bm25 (higher is better). fts_query must be escaped."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT rowid, bm25(chunks_fts) AS rank FROM chunks_fts WHERE chunks_fts MATCH ? "
                "ORDER BY rank LIMIT ?", (fts_query, limit)).fetchall()
        return [(rowid, -rank) for rowid, rank in rows]

    def chunks(self, ids: list[int]) -> dict[int, StoredChunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT c.id, d.name, c.seq, c.heading, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id "
                f"WHERE c.id IN ({marks})", ids).fetchall()
        return {row[0]: StoredChunk(*row) for row in rows}


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK if the block raises (anything, KeyboardInterrupt too). IMMEDIATE takes
    the write lock up front (writes); DEFERRED is a read snapshot that blocks no writer under WAL."""

    def __init__(self, conn: sqlite3.Connection, mode: str) -> None:
        self.conn, self.mode = conn, mode

    def __enter__(self) -> None:
        self.conn.execute(f"BEGIN {self.mode}")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
