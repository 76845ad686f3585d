"""Sections -> chunks of at most `chunk_tokens` WordPiece tokens (the embedder's own tokenizer), with
`overlap` tokens repeated between neighbours so a fact cut by a boundary is whole in one of them.

    chunks = chunk_sections(doc.sections, ChunkConfig(chunk_tokens=200, overlap=40))

A chunk never crosses a section (heading) boundary, and carries its section's heading path, which is
also part of what is embedded and keyword-indexed (`indexed_text`). The heading's tokens count against
the model's 256-token window, so a section under a long heading gets a shorter body budget: nothing is
ever truncated silently by the model. Chunk ends prefer a sentence end in the last quarter of the
window, else a word boundary (never inside a word). A FAQ pair is one chunk, whatever its length.

Defaults (128 tokens, 24 overlap), measured on the homehub sample (61 questions, a hit = the expected
fact in a returned passage), hybrid recall@1 / @3 / @5 and mean body tokens per chunk:

    chunk/overlap   64/12   100/20   128/24   150/30   200/40   254/50
    recall@1        0.72    0.75     0.80     0.82     0.82     0.85
    recall@3        0.87    0.90     0.92     0.93     0.93     0.95
    recall@5        0.92    0.98     0.98     1.00     0.98     1.00
    mean tokens     52      75       84       -        101      -

Below ~100 tokens a chunk loses the context that makes it findable; from 128 up the differences are one
or two questions of 61, i.e. noise. What does grow with the size is the grounded prompt: k passages
are prefilled before the first token, and the default chat model has 2048 tokens of context. And
all-MiniLM-L6-v2 was trained on sequences of at most 128 tokens. So: 128.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kuaida.errors import InvalidArgumentError
from kuaida.knowledge.embed import MAX_TOKENS, wordpiece_tokenizer
from kuaida.knowledge.parse import Section

_PIECE_CHARS = 64 * 1024  # tokenize long sections in pieces: bounded memory, both cores (encode_batch)
_SENTENCE_END = {".", "!", "?", ":", ";"}


@dataclass
class ChunkConfig:
    chunk_tokens: int = 128  # body tokens per chunk (heading excluded); <= 254 = the model's window - 2
    overlap: int = 24  # tokens shared by consecutive chunks of a section

    def __post_init__(self) -> None:
        if not 16 <= self.chunk_tokens <= MAX_TOKENS - 2:
            raise InvalidArgumentError(f"chunk_tokens must be in [16, {MAX_TOKENS - 2}], got {self.chunk_tokens}")
        if not 0 <= self.overlap <= self.chunk_tokens // 2:
            raise InvalidArgumentError(f"overlap must be in [0, chunk_tokens / 2 = {self.chunk_tokens // 2}], "
                                       f"got {self.overlap}")


@dataclass
class Chunk:
    heading: str
    text: str


def indexed_text(heading: str, text: str) -> str:
    """What is embedded for a chunk: its heading path, then its text."""
    return f"{heading}\n{text}" if heading else text


@dataclass
class _Tokens:
    """A text's tokens as arrays: character span [start, end) and word index of each (all int64 [n])."""
    start: np.ndarray
    end: np.ndarray
    word: np.ndarray


def _pieces(text: str) -> list[tuple[int, str]]:
    """(offset, piece) cuts of `text` of about _PIECE_CHARS, cut at whitespace so no word is split."""
    out, pos = [], 0
    while pos < len(text):
        cut = len(text) if len(text) - pos <= _PIECE_CHARS else text.rfind(" ", pos, pos + _PIECE_CHARS)
        cut = cut if cut > pos else min(len(text), pos + _PIECE_CHARS)  # one giant "word": cut anyway
        out.append((pos, text[pos:cut]))
        pos = cut
    return out


def _tokenize(text: str) -> _Tokens:
    pieces = _pieces(text)
    encodings = wordpiece_tokenizer().encode_batch([p for _, p in pieces], add_special_tokens=False)
    starts, ends, words, word_base = [], [], [], 0
    for (offset, _), enc in zip(pieces, encodings):
        spans = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2) + offset
        word = np.asarray([-1 if w is None else w for w in enc.word_ids], dtype=np.int64) + word_base
        starts.append(spans[:, 0])
        ends.append(spans[:, 1])
        words.append(word)
        word_base = int(word.max()) + 1 if len(word) else word_base
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return _Tokens(cat(starts), cat(ends), cat(words))


def _word_start(tokens: _Tokens, i: int, floor: int) -> int:
    """The largest j <= i (and > floor) where a word starts: never cut a word between two chunks."""
    while i > floor + 1 and i < len(tokens.word) and tokens.word[i] == tokens.word[i - 1]:
        i -= 1
    return i


def _breaks_before(text: str, tokens: _Tokens, i: int) -> bool:
    """True when token i starts a sentence or a line: the best place to cut."""
    last = text[tokens.start[i - 1]:tokens.end[i - 1]]
    return last in _SENTENCE_END or "\n" in text[tokens.end[i - 1]:tokens.start[i]]


def _chunk_end(text: str, tokens: _Tokens, start: int, budget: int) -> int:
    """End (exclusive token index) of the chunk that starts at `start`: a sentence or line end in the
    last quarter of the budget, else a word boundary."""
    n = len(tokens.word)
    if start + budget >= n:
        return n
    limit = start + budget
    for i in range(limit, start + (3 * budget) // 4, -1):
        if _breaks_before(text, tokens, i):
            return i
    return _word_start(tokens, limit, start)


def _next_start(text: str, tokens: _Tokens, start: int, end: int, overlap: int) -> int:
    """Start of the chunk after [start, end): `overlap` tokens back, moved forward to a sentence or line
    start if one is in the first half of the overlap, else back to a word start."""
    if not overlap:
        return end
    back = max(end - overlap, start + 1)
    for i in range(back, max(end - overlap // 2, back + 1)):
        if _breaks_before(text, tokens, i):
            return i
    return max(_word_start(tokens, back, start), start + 1)


def _split_section(section: Section, budget: int, overlap: int) -> list[str]:
    text = section.text
    tokens = _tokenize(text)
    n = len(tokens.word)
    if n <= budget:
        return [text.strip()] if text.strip() else []
    out, start = [], 0
    while True:
        end = _chunk_end(text, tokens, start, budget)
        out.append(text[tokens.start[start]:tokens.end[end - 1]].strip())
        if end >= n:
            return out
        start = _next_start(text, tokens, start, end, overlap)


def chunk_sections(sections: list[Section], config: ChunkConfig | None = None) -> list[Chunk]:
    """Every section's chunks, in reading order."""
    config = config or ChunkConfig()
    chunks: list[Chunk] = []
    for section in sections:
        if section.atomic:
            chunks.append(Chunk(section.heading, section.text))
            continue
        heading_tokens = len(wordpiece_tokenizer().encode(section.heading, add_special_tokens=False).ids)
        # The body gets what the model's window leaves after [CLS], [SEP], the heading and its newline;
        # at least half the configured size, so an absurd heading cannot make chunks tiny.
        budget = max(config.chunk_tokens // 2, min(config.chunk_tokens, MAX_TOKENS - 2 - heading_tokens))
        overlap = min(config.overlap, budget // 2)
        chunks.extend(Chunk(section.heading, piece) for piece in _split_section(section, budget, overlap))
    return chunks
