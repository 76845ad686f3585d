"""KnowledgeBase: a named base on disk, and the functions that create, open, list and delete bases.

    kb = create_kb("homehub")                        # <kb_root()>/homehub.sqlite
    report = kb.add(["manual/", "faq.jsonl"], progress=True)
    for p in kb.search("how do I reset the hub", k=5):   # hybrid: BM25 + vectors, fused by RRF
        print(p.id, p.heading, p.score)

Search cost at 10,138 chunks (p50 / p95), CPU time: hybrid 15.2 / 18.1 ms = embedding the query 7.7 /
8.6 + BM25 5.9 / 7.5 + the vector product 1.5 / 1.7; wall time on this 2-core machine shared with ~7
other busy processes (load 7-8): hybrid 25-28 / 37-40 ms, keyword 9-11 / 15-19, vector 15-17 / 19-23.
Hybrid runs BM25 on a second thread while the query is embedded, which saves its ~6 ms when a core is
free (on the busy machine none was).

Passage ids ("setup.md#3": document name, 1-based chunk number) are stable until that document changes.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kuaida.errors import InvalidArgumentError, KnowledgeBaseNotFoundError, KuaidaError
from kuaida.knowledge.chunk import ChunkConfig
from kuaida.knowledge.embed import Embedder, default_embedder
from kuaida.knowledge.ingest import IngestReport, ingest
from kuaida.knowledge.search import MODES, VectorIndex, fts_query, rrf
from kuaida.knowledge.store import DocumentInfo, Store

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the project supports 3.10
    from typing_extensions import Self

SUFFIX = ".sqlite"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CANDIDATES = 50  # each ranking's depth before fusion: deep enough that RRF sees both lists' agreement


@dataclass(frozen=True)
class Passage:
    id: str  # "<document>#<chunk number>", e.g. "setup.md#3"
    doc: str
    heading: str  # heading path, e.g. "Setup > Wi-Fi" ("" when the text has none)
    text: str
    score: float  # hybrid: RRF score; keyword: -bm25; vector: cosine. Higher is better in every mode.


def kb_root() -> Path:
    """$KUAIDA_KB_DIR, else ~/.local/share/kuaida/kb."""
    return Path(os.environ.get("KUAIDA_KB_DIR") or Path.home() / ".local" / "share" / "kuaida" / "kb")


def kb_path(name: str, root: Path | str | None = None, must_exist: bool = False) -> Path:
    """<root>/<name>.sqlite (InvalidArgumentError for a bad name; KnowledgeBaseNotFoundError when
    must_exist and there is no such base)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(f"bad knowledge-base name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
                                   "starting with a letter or digit")
    path = Path(root or kb_root()) / f"{name}{SUFFIX}"
    if must_exist and not path.is_file():
        raise KnowledgeBaseNotFoundError(f"no knowledge base named {name!r} in {path.parent}; "
                                         f"create it with `kuaida kb create {name}`")
    return path


class KnowledgeBase:
    """Use `create_kb` / `open_kb`; close it (or use `with`) when done."""

    def __init__(self, name: str, store: Store, embedder: Embedder | None = None) -> None:
        self.name, self._store = name, store
        self.embedder = embedder or default_embedder()
        built_with = (store.meta.get("model"), store.meta.get("dim"))
        if built_with != (self.embedder.name, str(self.embedder.dim)):
            store.close()
            raise KuaidaError(f"knowledge base {name!r} was built with embeddings {built_with[0]} "
                              f"(dim {built_with[1]}), not {self.embedder.name} (dim {self.embedder.dim}): "
                              f"its vectors cannot be compared; recreate it and add the documents again")
        self.config = ChunkConfig(int(store.meta["chunk_tokens"]), int(store.meta["overlap"]))
        self._vectors = VectorIndex(store)
        # Hybrid search runs BM25 here while the query is embedded: SQLite and torch both release the GIL.
        self._keyword_pool = ThreadPoolExecutor(1, thread_name_prefix="kuaida-bm25")

    @property
    def path(self) -> Path:
        return self._store.path

    def add(self, paths: list[str | Path] | str | Path, progress: bool = False) -> IngestReport:
        """Ingest files and folders (recursively). Unchanged documents are skipped, changed ones replaced;
        each document is one transaction. Per-file problems are in the report's `failed`."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        return ingest(self._store, self.embedder, self.config, paths, progress)

    def remove(self, doc: str) -> int:
        """Remove a document by its stored name; returns the number of chunks removed."""
        removed = self._store.remove_document(doc)
        if removed is None:
            raise InvalidArgumentError(f"no document named {doc!r} in knowledge base {self.name!r}; "
                                       f"`kuaida kb list {self.name}` shows its documents")
        return removed

    def documents(self) -> list[DocumentInfo]:
        return self._store.documents()

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Passage]:
        """The k passages that best answer `query`. mode: "hybrid" (reciprocal rank fusion of BM25 and
        vector rankings), "keyword" (BM25 only) or "vector" (cosine only)."""
        if mode not in MODES:
            raise InvalidArgumentError(f"unknown search mode {mode!r}: choose one of {', '.join(MODES)}")
        if not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        if not isinstance(query, str) or not query.strip():
            return []
        depth = max(CANDIDATES, k)
        if mode == "keyword":
            return self._passages(self._keyword(query, depth)[:k])
        keyword = self._keyword_pool.submit(self._keyword, query, depth) if mode == "hybrid" else None
        vector = self._vectors.top(self.embedder.embed([query])[0], depth)
        if keyword is not None:
            ranked = rrf([[i for i, _ in keyword.result()], [i for i, _ in vector]])[:k]
        else:
            ranked = vector[:k]
        return self._passages(ranked)

    def _passages(self, ranked: list[tuple[int, float]]) -> list[Passage]:
        chunks = self._store.chunks([i for i, _ in ranked])
        return [Passage(f"{c.doc}#{c.seq}", c.doc, c.heading, c.text, score)
                for i, score in ranked if (c := chunks.get(i)) is not None]

    def _keyword(self, query: str, depth: int) -> list[tuple[int, float]]:
        fts = fts_query(query)
        return self._store.keyword(fts, depth) if fts else []

    def close(self) -> None:
        self._keyword_pool.shutdown()
        self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KnowledgeBase({self.name!r}, path={str(self.path)!r})"


def create_kb(name: str, root: Path | str | None = None, config: ChunkConfig | None = None,
              embedder: Embedder | None = None) -> KnowledgeBase:
    """A new, empty base (InvalidArgumentError if the name is bad or taken). `config` fixes its chunking."""
    path = kb_path(name, root)
    if path.exists():
        raise InvalidArgumentError(f"knowledge base {name!r} already exists ({path}); add documents to it with "
                                   f"`kuaida kb add {name} PATH`, or pick another name")
    config = config or ChunkConfig()
    embedder = embedder or default_embedder()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": embedder.name, "dim": str(embedder.dim), "chunk_tokens": str(config.chunk_tokens),
            "overlap": str(config.overlap)}
    return KnowledgeBase(name, Store(path, create=True, meta=meta), embedder)


def open_kb(name: str, root: Path | str | None = None, embedder: Embedder | None = None) -> KnowledgeBase:
    """An existing base (KnowledgeBaseNotFoundError, naming it, if there is none)."""
    return KnowledgeBase(name, Store(kb_path(name, root, must_exist=True)), embedder)


def list_kbs(root: Path | str | None = None) -> list[str]:
    """Names of the bases under `root` (default kb_root()), sorted."""
    folder = Path(root or kb_root())
    return sorted(p.name[:-len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}") if _NAME.fullmatch(p.name[:-len(SUFFIX)]))


def delete_kb(name: str, root: Path | str | None = None) -> None:
    """Delete a base's file (and its WAL side files). KnowledgeBaseNotFoundError if there is none."""
    path = kb_path(name, root, must_exist=True)
    for side in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        side.unlink(missing_ok=True)
