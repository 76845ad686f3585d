"""Prompt-lookup drafts: guess the next tokens by copying what followed the last few tokens earlier on.

A grounded answer repeats its passages (names, numbers, passage ids), a chat reply repeats the question;
when the last n tokens (n = max_ngram .. min_ngram) occurred before in the prompt or the reply, the
tokens that followed them there are a cheap draft (Saxena 2023, "prompt lookup decoding"). The engine
verifies a draft in one forward and keeps the longest prefix greedy decoding would have produced
(kuaida.engine.generate), so drafts change speed, never the reply.
"""
from __future__ import annotations

from dataclasses import dataclass

from kuaida.errors import InvalidArgumentError


@dataclass(frozen=True)
class LookupConfig:
    max_ngram: int = 3  # longest tail to match (longer matches first: they predict better)
    min_ngram: int = 2  # shortest (a single token matches too often to be worth verifying)
    draft_tokens: int = 4  # tokens proposed per step (the verify forward grows with them)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram or self.draft_tokens < 1:
            raise InvalidArgumentError(
                "prompt lookup needs 1 <= min_ngram <= max_ngram and draft_tokens >= 1, got "
                f"{self.min_ngram}, {self.max_ngram}, {self.draft_tokens}")


class NgramIndex:
    """The token sequence so far, and for each n-gram (min..max_ngram) the position after its latest
    occurrence that is followed by at least one token. Extending it costs O(new tokens x n-gram sizes)."""

    def __init__(self, config: LookupConfig, ids: list[int] = ()) -> None:
        self.config = config
        self.ids: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.extend(ids)

    def extend(self, ids) -> None:
        for token in ids:
            self.ids.append(token)
            end = len(self.ids) - 1  # the new token follows the n-grams ending just before it
            for n in range(self.config.min_ngram, self.config.max_ngram + 1):
                if end - n >= 0:
                    self._after[tuple(self.ids[end - n:end])] = end

    def draft(self, limit: int | None = None) -> list[int]:
        """Up to draft_tokens (and `limit`) tokens that followed the longest matching tail; [] if none."""
        k = self.config.draft_tokens if limit is None else min(limit, self.config.draft_tokens)
        if k <= 0:
            return []
        for n in range(self.config.max_ngram, self.config.min_ngram - 1, -1):
            if len(self.ids) < n:
                continue
            start = self._after.get(tuple(self.ids[-n:]))
            if start is not None:
                return self.ids[start:start + k]
        return []
