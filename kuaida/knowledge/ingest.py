"""Paths -> documents in a base: find the files, read, chunk, embed, write one transaction per document.

A file a user must fix (unsupported, empty, binary, too big, broken) is reported in
`IngestReport.failed` and the rest of the batch goes on. Every document is written in one transaction,
so a failure (an embedding error raises) or a crash leaves each document either wholly new or exactly
as it was. Everything slow (parsing, embedding) happens before a document's write transaction, so the
write lock is held for milliseconds and readers never wait on the model.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kuaida.errors import IngestError
from kuaida.knowledge.chunk import Chunk, ChunkConfig, chunk_sections, indexed_text
from kuaida.knowledge.embed import Embedder
from kuaida.knowledge.parse import read_document
from kuaida.knowledge.store import Store

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the project supports 3.10
    from typing_extensions import Self

log = logging.getLogger(__name__)

EMBED_BATCH = 64  # chunks embedded per call, across small files (the model batches 32 inside)


@dataclass
class IngestReport:
    added: int = 0  # documents new to the base
    updated: int = 0  # documents whose content changed: old chunks replaced
    unchanged: int = 0  # same content (sha256) as stored: nothing done
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file or "doc: line N" owner, why)
    chunks: int = 0  # chunks written
    seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)


def discover(paths: list[str | Path], report: IngestReport) -> Iterator[tuple[str, Path]]:
    """(document name, file) for every file under `paths`: a folder's files recursively (hidden ones
    skipped), named by their path from the folder's parent ("manual/setup.md"); a file by its name.
    Missing paths and duplicate names go to report.failed."""
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            base = path.resolve()
            found = sorted(p for p in base.rglob("*") if p.is_file() and not _hidden(p.relative_to(base).parts))
            items = [(p.relative_to(base.parent).as_posix(), p) for p in found]
        elif path.is_file():
            items = [(path.name, path)]
        else:
            report.failed.append((str(raw), "no such file or folder"))
            continue
        for name, file in items:
            if name in seen:
                why = f"another file in this batch is already named {name!r}; add them in separate folders"
                report.failed.append((str(file), why))
                continue
            seen.add(name)
            yield name, file


@dataclass
class _Prepared:
    """A file read and chunked, waiting for its vectors."""
    name: str
    sha256: str
    size: int
    chunks: list[Chunk]


def prepare_file(store: Store, config: ChunkConfig, name: str, file: Path,
                 report: IngestReport) -> _Prepared | None:
    """Read and chunk one file; None when its content is already stored (IngestError on problems a
    user must fix)."""
    doc = read_document(file)
    report.failed.extend((name, problem) for problem in doc.problems)
    if store.sha256_of(name) == doc.sha256:
        report.unchanged += 1
        return None
    return _Prepared(name, doc.sha256, doc.bytes, chunk_sections(doc.sections, config))


class _Writer:
    """Embeds prepared files together (small files fill a batch: the model runs ~2x faster on full
    batches than on a file's 5-10 chunks), then writes each file in its own transaction. If embedding
    raises, the files waiting in the batch are not written at all."""

    def __init__(self, store: Store, embedder: Embedder, report: IngestReport,
                 advance: Callable[[int], None]) -> None:
        self.store, self.embedder, self.report, self.advance = store, embedder, report, advance
        self.waiting: list[_Prepared] = []

    def add(self, item: _Prepared) -> None:
        self.waiting.append(item)
        if sum(len(w.chunks) for w in self.waiting) >= EMBED_BATCH:
            self.flush()

    def flush(self) -> None:
        texts = [indexed_text(c.heading, c.text) for w in self.waiting for c in w.chunks]
        parts = []
        for i in range(0, len(texts), EMBED_BATCH):
            parts.append(self.embedder.embed(texts[i:i + EMBED_BATCH]))  # [<= EMBED_BATCH, dim]
            self.advance(len(parts[-1]))
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.embedder.dim), dtype=np.float32)
        offset = 0
        for w in self.waiting:
            rows = vectors[offset:offset + len(w.chunks)]
            offset += len(w.chunks)
            replaced = self.store.put_document(w.name, w.sha256, w.size,
                                               [(c.heading, c.text) for c in w.chunks], rows)
            self.report.updated += replaced
            self.report.added += not replaced
            self.report.chunks += len(w.chunks)
            log.info("%s %s: %d chunks", "updated" if replaced else "added", w.name, len(w.chunks))
        self.waiting = []


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)


def ingest(store: Store, embedder: Embedder, config: ChunkConfig, paths: list[str | Path],
           progress: bool = False) -> IngestReport:
    report = IngestReport()
    start = time.perf_counter()
    files = list(discover(paths, report))
    with _progress() if progress else _NoProgress() as bar:
        files_task = bar.add_task("files read", total=len(files))
        chunk_task = bar.add_task("chunks embedded", total=None)
        writer = _Writer(store, embedder, report, lambda n: bar.advance(chunk_task, n))
        chunks = 0
        for name, file in files:
            bar.update(files_task, description=f"files read ({_short(name)})")
            try:
                prepared = prepare_file(store, config, name, file, report)
            except IngestError as e:
                report.failed.append((name, str(e)))
                prepared = None
            except OSError as e:  # unreadable: permissions, a file removed while we walk
                report.failed.append((name, f"cannot read it ({e.strerror or e})"))
                prepared = None
            if prepared is not None:
                chunks += len(prepared.chunks)
                bar.update(chunk_task, total=chunks)  # exact once every file is read
                writer.add(prepared)
            bar.advance(files_task)
        writer.flush()
    report.seconds = time.perf_counter() - start
    return report


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


class _NoProgress:
    """Progress's interface, doing nothing (progress=False: library calls, tests, the server)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None

    def advance(self, *args, **kwargs) -> None:
        return None

