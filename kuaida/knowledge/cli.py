"""`kuaida kb ...`: create a knowledge base, add documents, list, remove, search."""
from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kuaida.errors import InvalidArgumentError

kb_app = typer.Typer(
    help="Knowledge bases a bot answers from: your documents (.md .txt .html .pdf, FAQ .jsonl lines "
         '{"question", "answer"}), chunked, embedded (all-MiniLM-L6-v2, offline) and indexed for hybrid '
         "search (BM25 + vectors). One SQLite file per base, under $KUAIDA_KB_DIR "
         "(default ~/.local/share/kuaida/kb).",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
out = Console()
err = Console(stderr=True)

NAME_HELP = "Knowledge base name (letters, digits, '_', '-', '.')."
ROOT_HELP = "Folder of the bases (default: $KUAIDA_KB_DIR, else ~/.local/share/kuaida/kb)."
ROOT = typer.Option(None, "--dir", help=ROOT_HELP)
PATHS = typer.Argument(..., help="Files or folders (read recursively, hidden files skipped).")


def _user_errors(fn):
    """kuaida.cli's one-line errors; imported at call time, since kuaida.cli imports this module."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kuaida.cli import user_errors

        return user_errors(fn)(*args, **kwargs)
    return wrapper


@kb_app.command()
@_user_errors
def create(name: str = typer.Argument(..., help=NAME_HELP), root: Path | None = ROOT,
           chunk_tokens: int | None = typer.Option(None, help="Tokens per chunk, at most 254 (default 128: "
                                                   "see kuaida/knowledge/chunk.py for the measurements)."),
           overlap: int | None = typer.Option(None, help="Tokens repeated between neighbouring chunks (default 24).")):
    """Create an empty knowledge base (its chunking is fixed at creation)."""
    from kuaida.knowledge import ChunkConfig, create_kb

    given = {"chunk_tokens": chunk_tokens, "overlap": overlap}
    config = ChunkConfig(**{key: value for key, value in given.items() if value is not None})
    with create_kb(name, root, config) as kb:
        out.print(f"created knowledge base {name!r} at {kb.path}", highlight=False)


@kb_app.command()
@_user_errors
def add(name: str = typer.Argument(..., help=NAME_HELP),
        paths: list[Path] = PATHS,
        root: Path | None = ROOT):
    """Add documents (a changed document replaces its old version; an unchanged one is skipped).

    Files that cannot be used are listed with the reason, the others still added; exit status 1 then.
    """
    from kuaida.knowledge import open_kb

    with open_kb(name, root) as kb:
        report = kb.add(paths, progress=err.is_terminal)
    for item, why in report.failed:
        err.print(f"[yellow]skipped[/] {escape(item)}: {escape(why)}", highlight=False)
    out.print(f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
              f"{len(report.failed)} problems; {report.chunks} chunks in {report.seconds:.1f} s "
              f"({report.chunks_per_second:.0f} chunks/s)", highlight=False)
    if report.failed:
        raise typer.Exit(1)


@kb_app.command("list")
@_user_errors
def list_(name: str | None = typer.Argument(None, help="A base: list its documents. None: list the bases."),
          root: Path | None = ROOT):
    """List the knowledge bases, or the documents of one."""
    from kuaida.knowledge import list_kbs, open_kb

    if name is None:
        names = list_kbs(root)
        for base in names:
            out.print(base, highlight=False)
        if not names:
            err.print("no knowledge bases yet: `kuaida kb create NAME`")
        return
    with open_kb(name, root) as kb:
        docs = kb.documents()
    table = Table("document", "chunks", "bytes", "added (UTC)", "sha256", title=f"{name}: {len(docs)} documents")
    for d in docs:
        table.add_row(d.name, str(d.chunks), str(d.bytes), d.added_at, d.sha256[:12])
    out.print(table)


@kb_app.command()
@_user_errors
def remove(name: str = typer.Argument(..., help=NAME_HELP),
           doc: str = typer.Argument(..., help="The document's name as `kuaida kb list NAME` shows it."),
           root: Path | None = ROOT):
    """Remove a document (and its chunks) from a base."""
    from kuaida.knowledge import open_kb

    with open_kb(name, root) as kb:
        removed = kb.remove(doc)
    out.print(f"removed {doc} ({removed} chunks)", highlight=False)


@kb_app.command()
@_user_errors
def delete(name: str = typer.Argument(..., help=NAME_HELP), root: Path | None = ROOT,
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")):
    """Delete a whole knowledge base (its SQLite file)."""
    from kuaida.knowledge import delete_kb, kb_path

    kb_path(name, root, must_exist=True)  # KnowledgeBaseNotFoundError before asking anything
    if not yes and not typer.confirm(f"delete knowledge base {name!r} and all its documents?"):
        raise typer.Exit(1)
    delete_kb(name, root)
    out.print(f"deleted knowledge base {name!r}", highlight=False)


@kb_app.command()
@_user_errors
def search(name: str = typer.Argument(..., help=NAME_HELP), query: str = typer.Argument(..., help="The question."),
           k: int = typer.Option(5, "-k", help="Passages to return."),
           mode: str = typer.Option("hybrid", help="hybrid (BM25 + vectors, fused), keyword or vector."),
           root: Path | None = ROOT):
    """Search a base: the passages a bot would be given to answer `query`."""
    from kuaida.knowledge import open_kb

    if k < 1:
        raise InvalidArgumentError(f"-k must be at least 1, got {k}")
    with open_kb(name, root) as kb:
        passages = kb.search(query, k=k, mode=mode)
    if not passages:
        err.print("no passage matches")
    for p in passages:
        out.print(f"[bold]{escape(f'[{p.id}]')}[/] {escape(p.heading)}  [dim]score {p.score:.4f}[/]",
                  highlight=False)
        out.print(p.text, highlight=False, markup=False)
        out.print()

