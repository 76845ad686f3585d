"""Streaming text out of a stream of token ids, and cutting it at stop strings.

IncrementalDetokenizer follows vLLM/TGI: decode a short window of recent tokens twice — up to the last
emitted token (prefix) and up to the newest one — and emit the difference. Decoding from the same
window start on both sides cancels what a decoder does at the start of a string (SentencePiece strips
the leading space of "▁Hello"), and a text that ends in U+FFFD is an unfinished UTF-8 character (byte-
level BPE and byte fallback split 中 or 👩 over several tokens), so it waits for the next token.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded before the first generated one (vLLM uses the same)


class IncrementalDetokenizer:
    """push(token_id) -> newly completed text; flush() -> the rest. Without prompt_ids the pieces add up
    to tokenizer.decode(generated, skip_special_tokens=...). With prompt_ids the first tokens are decoded
    after the prompt's last ones, as a continuation of it: identical for byte-level BPE, while a
    SentencePiece tokenizer then keeps the leading space a standalone decode strips."""

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Skipped tokens never enter the window, so a run of them cannot grow it (decode drops them too).
        self._skipped = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        self._tokens = [t for t in (prompt_ids or []) if t not in self._skipped][-PROMPT_CONTEXT:]
        self._prefix_offset = 0  # window start
        self._read_offset = len(self._tokens)  # end of what has been emitted
        self._prefix_text = self._decode(self._tokens)

    def push(self, token_id: int) -> str:
        if token_id in self._skipped:
            return ""
        self._tokens.append(token_id)
        text = self._decode(self._tokens[self._prefix_offset :])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character still missing its last bytes
        return self._advance(text)

    def flush(self) -> str:
        """What is left at the end: a truly unfinished character comes out as U+FFFD, as decode gives."""
        if self._read_offset == len(self._tokens):
            return ""
        return self._advance(self._decode(self._tokens[self._prefix_offset :]))

    def _advance(self, text: str) -> str:
        """Emit `text` (the window decoded to the newest token) past the prefix; slide the window on so
        the next decode covers only the tokens just emitted plus the new ones."""
        new = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        # Drop tokens before the window: keeps push O(1) in memory as well as in time.
        del self._tokens[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        self._prefix_text = self._decode(self._tokens[: self._read_offset])
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids that decode(..., skip_special_tokens=True) drops: added tokens flagged special."""
    return frozenset(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)


class StopMatcher:
    """Cuts a text stream at the first stop string. push(text) -> (text safe to emit, stopped).

    "First" is where the stream first contains a stop string (earliest end; at equal ends the one that
    starts earlier), so the result does not depend on how the text was split into pieces. A tail that
    could still grow into a stop string is held back until it cannot."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(stop)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return text, False
        buffer = self._held + text
        cut = self._first_stop(buffer)
        if cut is not None:
            self._held, self.stopped = "", True
            return buffer[:cut], True
        keep = self._partial_stop_len(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Held-back text at the end of generation (never a stop string: those were cut)."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buffer: str) -> int | None:
        """Start of the stop string that ends first in buffer, or None."""
        hits = [(i + len(s), i) for s in self.stop if (i := buffer.find(s)) >= 0]
        return min(hits)[1] if hits else None

    def _partial_stop_len(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        longest = min(len(buffer), max(len(s) for s in self.stop) - 1)
        for n in range(longest, 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
