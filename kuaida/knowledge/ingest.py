"""Paths -> documents in a base: find the files, read, chunk, embed, write one transaction per document.

A file that fails (unsupported, empty, binary, broken, an embedding error) is reported in
`IngestReport.failed` and leaves the base exactly as it was for that document; the rest of the batch
goes on. Everything slow (parsing, embedding) happens before the document's write transaction, so the
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
from kuaida.knowledge.chunk import ChunkConfig, chunk_sections, indexed_text
from kuaida.knowledge.embed import Embedder
from kuaida.knowledge.parse import read_document
from kuaida.knowledge.store import Store

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the project supports 3.10
    from typing_extensions import Self

log = logging.getLogger(__name__)

EMBED_BATCH = 64  # chunks embedded per call: progress granularity (the model batches 32 inside)


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


def _embed(embedder: Embedder, texts: list[str], advance: Callable[[int], None]) -> np.ndarray:
    parts = []
    for i in range(0, len(texts), EMBED_BATCH):
        parts.append(embedder.embed(texts[i:i + EMBED_BATCH]))
        advance(len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)


def ingest_file(store: Store, embedder: Embedder, config: ChunkConfig, name: str, file: Path,
                report: IngestReport, advance: Callable[[int], None]) -> None:
    """Read, chunk, embed and store one file (IngestError for problems a user must fix)."""
    doc = read_document(file)
    report.failed.extend((name, problem) for problem in doc.problems)
    if store.sha256_of(name) == doc.sha256:
        report.unchanged += 1
        return
    chunks = chunk_sections(doc.sections, config)
    vectors = _embed(embedder, [indexed_text(c.heading, c.text) for c in chunks], advance)
    replaced = store.put_document(name, doc.sha256, doc.bytes, [(c.heading, c.text) for c in chunks], vectors)
    report.updated += replaced
    report.added += not replaced
    report.chunks += len(chunks)
    log.info("%s %s: %d chunks", "updated" if replaced else "added", name, len(chunks))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)


def ingest(store: Store, embedder: Embedder, config: ChunkConfig, paths: list[str | Path],
           progress: bool = False) -> IngestReport:
    report = IngestReport()
    start = time.perf_counter()
    files = list(discover(paths, report))
    with _progress() if progress else _NoProgress() as bar:
        files_task = bar.add_task("files", total=len(files))
        chunk_task = bar.add_task("chunks embedded", total=None)
        for name, file in files:
            bar.update(files_task, description=f"files ({_short(name)})")
            try:
                ingest_file(store, embedder, config, name, file, report,
                            lambda n: bar.advance(chunk_task, n))
            except IngestError as e:
                report.failed.append((name, str(e)))
            except OSError as e:  # unreadable: permissions, a file removed while we walk
                report.failed.append((name, f"cannot read it ({e.strerror or e})"))
            bar.advance(files_task)
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

