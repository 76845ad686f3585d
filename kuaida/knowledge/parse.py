"""Readers: a file -> its sections (heading path + text), the unit the chunker never crosses.

    doc = read_document(Path("manual/setup.md"))     # ParsedDoc(sections, sha256, bytes, problems)

Supported: .txt, .md/.markdown, .html/.htm, .pdf (pypdf, one section per page), .jsonl FAQ lines
{"question", "answer"} (each pair one atomic section whose heading is the question). Anything a user
can get wrong (unsupported type, empty, binary, not UTF-8, too big, broken PDF, a JSONL file without one
good line) raises IngestError with a message that says what to do; the caller reports it per file.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from kuaida.errors import IngestError

# A sane ceiling: 20 MB of text is ~5 M tokens, ~25 k chunks; bigger files are almost always exports
# or logs that should be split (or are not documentation at all). Files are read in 1 MB blocks and
# refused as soon as they pass it, so memory stays bounded whatever the file's size.
MAX_FILE_BYTES = 20 * 1024 * 1024
_BLOCK = 1 << 20
SUFFIXES = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
            ".pdf": "pdf", ".jsonl": "faq"}
HEADING_SEP = " > "


@dataclass
class Section:
    heading: str  # heading path, e.g. "Setup > Wi-Fi" ("" before the first heading)
    text: str
    atomic: bool = False  # one chunk whatever its length (a FAQ pair)


@dataclass
class ParsedDoc:
    sections: list[Section]
    sha256: str
    bytes: int
    problems: list[str] = field(default_factory=list)  # skipped parts (bad JSONL lines), file still usable


def read_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256, refusing (IngestError) empty, binary and too-big files."""
    digest, blocks, size = hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            size += len(block)
            if size > MAX_FILE_BYTES:
                raise IngestError(f"file is over the {MAX_FILE_BYTES >> 20} MB limit; split it into smaller files")
            digest.update(block)
            blocks.append(block)
    data = b"".join(blocks)
    if not data.strip():
        raise IngestError("file is empty")
    return data, digest.hexdigest()


def decode_text(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise IngestError("file looks binary (it contains NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IngestError(f"file is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None


def _heading_path(stack: list[tuple[int, str]]) -> str:
    return HEADING_SEP.join(title for _, title in stack)


def _push(stack: list[tuple[int, str]], level: int, title: str) -> None:
    """Pop headings at this level or deeper, then push (level, title): the path to the new heading."""
    while stack and stack[-1][0] >= level:
        stack.pop()
    stack.append((level, title))


def _sections_from_lines(items: list[tuple[int, str]]) -> list[Section]:
    """items: (heading level 1-6, title) or (0, body line) in reading order -> sections with text."""
    stack: list[tuple[int, str]] = []
    sections, body = [], []

    def flush() -> None:
        text = "\n".join(body).strip()
        if text:
            sections.append(Section(_heading_path(stack), re.sub(r"\n{3,}", "\n\n", text)))
        body.clear()

    for level, line in items:
        if level:
            flush()
            _push(stack, level, line)
        else:
            body.append(line)
    flush()
    return sections


_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def parse_markdown(text: str) -> list[Section]:
    """ATX (`## Title`) and setext (Title / ===) headings; `#` lines inside fenced code are code."""
    items: list[tuple[int, str]] = []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := _ATX.match(line)):
            items.append((len(m.group(1)), m.group(2)))
            continue
        elif not in_fence and _SETEXT.match(line) and items and items[-1][0] == 0 and items[-1][1].strip():
            title = items.pop()[1].strip()
            items.append((1 if line.strip()[0] == "=" else 2, title))
            continue
        items.append((0, line))
    return _sections_from_lines(items)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; h1-h6 become headings, block elements line breaks."""

    SKIP = frozenset({"script", "style", "noscript", "template", "head", "svg"})
    BLOCK = frozenset({"p", "div", "br", "li", "tr", "section", "article", "table", "ul", "ol", "pre", "blockquote",
             "dt", "dd", "hr", "header", "footer", "main", "nav", "aside", "form", "figure"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.items: list[tuple[int, str]] = []
        self._skip = 0  # depth inside SKIP elements
        self._heading: int | None = None
        self._parts: list[str] = []

    def _end_line(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._parts)).strip()
        self._parts.clear()
        if text or self._heading is None:
            self.items.append((self._heading or 0, text))

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._end_line()
            self._heading = int(tag[1])
        elif tag in self.BLOCK:
            self._end_line()
        elif tag in ("td", "th") and self._parts:
            self._parts.append(" | ")  # table cells on one line, kept apart

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            self._end_line()
            self._heading = None
        elif tag in self.BLOCK:
            self._end_line()

    def handle_data(self, data):
        if not self._skip:
            self._parts.append(data)


def parse_html(text: str) -> list[Section]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    parser._end_line()
    return _sections_from_lines(parser.items)


def parse_pdf(data: bytes) -> list[Section]:
    """One section per page (heading "page N"), so an answer can cite its page."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise IngestError("PDF is encrypted; save an unprotected copy")
        pages = [page.extract_text() or "" for page in reader.pages]
    except IngestError:
        raise
    except Exception as e:  # noqa: BLE001 -- pypdf raises many types (PdfReadError, ValueError, KeyError...) on bad files
        raise IngestError(f"not a readable PDF ({type(e).__name__}: {e}); re-export or repair it") from None
    sections = [Section(f"page {i}", text.strip()) for i, text in enumerate(pages, 1) if text.strip()]
    if not sections:
        raise IngestError("PDF has no extractable text (a scan? run OCR on it first)")
    return sections


def parse_faq(text: str) -> tuple[list[Section], list[str]]:
    """One atomic section per good line; bad lines -> problems ("line 3: ...") and are skipped."""
    sections, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not JSON ({e.msg})")
            continue
        question = item.get("question") if isinstance(item, dict) else None
        answer = item.get("answer") if isinstance(item, dict) else None
        if not (isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip()):
            problems.append(f'line {number}: needs non-empty string fields "question" and "answer"')
            continue
        sections.append(Section(question.strip(), answer.strip(), atomic=True))
    if not sections:
        raise IngestError("no usable FAQ line (each line: {\"question\": ..., \"answer\": ...}); "
                          + "; ".join(problems[:3]))
    return sections, problems


def read_document(path: Path) -> ParsedDoc:
    """Read and parse one file (IngestError on anything a user must fix)."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise IngestError(f"unsupported file type {path.suffix or '(none)'!r}; "
                          f"supported: {', '.join(sorted(SUFFIXES))}")
    data, sha = read_bytes(path)
    problems: list[str] = []
    if kind == "pdf":
        sections = parse_pdf(data)
    else:
        text = decode_text(data)
        if kind == "faq":
            sections, problems = parse_faq(text)
        elif kind == "html":
            sections = parse_html(text)
        elif kind == "markdown":
            sections = parse_markdown(text)
        else:
            sections = [Section("", text.strip())]
    if not sections:
        raise IngestError("no text found in the file")
    return ParsedDoc(sections, sha, len(data), problems)
