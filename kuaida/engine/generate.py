"""The one token generator: prefill, decode_one, sample — shared by the Python API, the CLI, the server
and the benchmarks.

An Engine owns a model and one preallocated KV-cache row. It remembers which tokens that row holds, so a
prompt that extends the previous one (the next turn of the same conversation) prefills only its new
tokens.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from kuaida.engine.detok import IncrementalDetokenizer, StopMatcher
from kuaida.engine.sampling import SamplingParams, make_generator, sample
from kuaida.errors import ContextLengthError

log = logging.getLogger(__name__)

# Prefill long prompts in chunks: bounds the attention mask and activations ([T, S] per head).
PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused instead of prefilled
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first token sampled
    decode_s: float = 0.0  # first token -> last token
    finish_reason: str | None = None  # "stop" (end of turn or stop string) | "length"

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Engine:
    def __init__(self, model: torch.nn.Module, eos_ids: set[int], max_context: int | None = None) -> None:
        self.model = model
        self.eos_ids = set(eos_ids)
        limit = model.args.max_seq_len
        self.max_context = min(max_context or limit, limit)
        self.cache = model.new_cache(batch=1, max_seq=self.max_context)
        self.cached_ids: list[int] = []  # tokens whose keys/values sit in cache row 0, in order

    # -- the three steps -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[int], start: int) -> torch.Tensor:
        """Run `ids` at positions start.. through the model, filling the cache; -> last logits [1, V]."""
        logits = None
        for lo in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[lo:lo + PREFILL_CHUNK]])  # [1, T]
            pos = torch.arange(start + lo, start + lo + chunk.shape[1])[None]  # [1, T]
            logits = self.model(chunk, pos, self.cache, last_only=True)[:, -1]
        return logits

    @torch.inference_mode()
    def decode_one(self, token: int, pos: int) -> torch.Tensor:
        """One new token at position `pos` -> logits [1, V]."""
        return self.model(torch.tensor([[token]]), torch.tensor([[pos]]), self.cache)[:, -1]

    # -- the loop --------------------------------------------------------------------------------
    def reuse_prefix(self, prompt_ids: list[int]) -> int:
        """Length of the cached prefix shared with `prompt_ids`, leaving at least one token to prefill
        (its logits start the reply)."""
        n, limit = 0, min(len(self.cached_ids), len(prompt_ids) - 1)
        while n < limit and self.cached_ids[n] == prompt_ids[n]:
            n += 1
        return n

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens but the context holds {self.max_context}: "
                "shorten the conversation or start a new one"
            )

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield sampled token ids until an end-of-turn token, max_new_tokens or the context is full.
        The end-of-turn token itself is not yielded. `stats` (if given) is filled in as it goes."""
        stats = stats if stats is not None else GenerationStats()
        t0 = time.perf_counter()
        self.check_fits(len(prompt_ids))
        n_cached = self.reuse_prefix(prompt_ids)
        stats.prompt_tokens, stats.cached_tokens = len(prompt_ids), n_cached
        self.cached_ids = self.cached_ids[:n_cached]
        logits = self.prefill(prompt_ids[n_cached:], n_cached)
        self.cached_ids = list(prompt_ids)
        gen = make_generator(params.seed)
        seen = torch.tensor([prompt_ids]) if params.repetition_penalty != 1.0 else None
        budget = min(params.max_new_tokens, self.max_context - len(prompt_ids))
        stats.finish_reason = "length"
        for i in range(budget):
            token = int(sample(logits, params, gen, seen)[0])
            if i == 0:
                stats.ttft_s = time.perf_counter() - t0
                t_first = time.perf_counter()
            if token in self.eos_ids:
                stats.finish_reason = "stop"
                break
            stats.completion_tokens += 1
            stats.decode_s = time.perf_counter() - t_first
            yield token
            if i + 1 == budget:
                break
            logits = self.decode_one(token, len(self.cached_ids))
            self.cached_ids.append(token)
            if seen is not None:
                seen = torch.cat([seen, torch.tensor([[token]])], dim=1)

    def stream(self, prompt_ids: list[int], params: SamplingParams, tokenizer,
               stats: GenerationStats | None = None) -> Iterator[str]:
        """Text pieces of the reply: valid UTF-8 always, stop strings cut (not included)."""
        stats = stats if stats is not None else GenerationStats()
        detok = IncrementalDetokenizer(tokenizer)  # no prompt context: a chat reply starts clean
        stopper = StopMatcher(params.stop)
        tokens = self.generate(prompt_ids, params, stats)
        for token in tokens:
            text, stopped = stopper.push(detok.push(token))
            if text:
                yield text
            if stopped:
                stats.finish_reason = "stop"
                tokens.close()
                return
        text, stopped = stopper.push(detok.flush())
        tail = text + ("" if stopped else stopper.flush())
        if tail:
            yield tail
        if stopped:
            stats.finish_reason = "stop"
