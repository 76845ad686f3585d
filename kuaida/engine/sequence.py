"""One reply being generated: sampling state, its limits, end of turn, and its text with stop strings.

The single-stream Engine and the batching Scheduler both drive Sequences, so sampling, limits and
stopping behave the same everywhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kuaida.engine.detok import IncrementalDetokenizer, StopMatcher
from kuaida.engine.sampling import SamplingParams, make_generator, sample
from kuaida.errors import ContextLengthError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused instead of prefilled
    completion_tokens: int = 0
    queue_s: float = 0.0  # waiting for a batch slot (server only)
    ttft_s: float = 0.0  # request start -> first token sampled
    decode_s: float = 0.0  # first token -> last token
    finish_reason: str | None = None  # "stop" (end of turn or stop string) | "length" | "cancelled"

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def check_fits(n_prompt: int, max_context: int) -> None:
    if n_prompt >= max_context:
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens but the context holds {max_context}: "
            "shorten the conversation or start a new one"
        )


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int], max_context: int,
                 tokenizer=None, stats: GenerationStats | None = None, spans=()) -> None:
        check_fits(len(prompt_ids), max_context)
        self.prompt_ids, self.params, self.eos_ids = prompt_ids, params, eos_ids
        self.spans = tuple(spans)  # knowledge-base passages in the prompt: [start, end) token positions
        self.stats = stats if stats is not None else GenerationStats()
        self.stats.prompt_tokens = len(prompt_ids)
        self.budget = min(params.max_new_tokens, max_context - len(prompt_ids))
        self.generator = make_generator(params.seed)
        self.seen = torch.tensor([prompt_ids]) if params.repetition_penalty != 1.0 else None  # [1, S]
        self.tokens: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stopper = StopMatcher(params.stop)
        self.t0 = time.perf_counter()
        self.t_first = 0.0

    @property
    def finished(self) -> bool:
        return self.stats.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.stats.finish_reason is None:
            self.stats.finish_reason = reason

    def next_token(self, logits: torch.Tensor) -> int | None:
        """Sample from `logits` [1, V]; -> the new token, or None when the reply is over."""
        token = int(sample(logits, self.params, self.generator, self.seen)[0])
        now = time.perf_counter()
        if not self.tokens:
            self.stats.ttft_s, self.t_first = now - self.t0, now
        if token in self.eos_ids:
            self.finish("stop")  # the end-of-turn token itself is not part of the reply
            return None
        self.tokens.append(token)
        self.stats.completion_tokens += 1
        self.stats.decode_s = now - self.t_first
        if self.seen is not None:
            self.seen = torch.cat([self.seen, torch.tensor([[token]])], dim=1)
        if len(self.tokens) >= self.budget:
            self.finish("length")
        return token

    def text(self, token: int) -> str:
        """The text `token` completes (maybe ""), stop strings cut; a stop string finishes the reply."""
        piece, stopped = self.stopper.push(self.detok.push(token))
        if stopped:
            self.finish("stop")
        return piece

    def text_tail(self) -> str:
        """What detokenizer and stop matcher still hold once the reply is over."""
        if self.stopper.stopped:
            return ""
        piece, stopped = self.stopper.push(self.detok.flush())
        return piece if stopped else piece + self.stopper.flush()
