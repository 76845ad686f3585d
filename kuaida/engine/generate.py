"""The single-stream generator: prefill, decode_one, sample — used by the Python API, the CLI and the
benchmarks (the server batches the same Sequences in kuaida.engine.scheduler).

An Engine owns a model and one preallocated KV-cache row. It remembers which tokens that row holds, so a
prompt that extends the previous one (the next turn of the same conversation) prefills only its new
tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator
from typing import Sequence as Seq

import torch

from kuaida.engine.lookup import LookupConfig, NgramIndex
from kuaida.engine.sampling import SamplingParams
from kuaida.engine.sequence import GenerationStats, Sequence
from kuaida.model.fused import decode_plan
from kuaida.model.kv_cache import KVCache

# Prefill long prompts in chunks: bounds the attention mask and activations ([T, S] per head).
PREFILL_CHUNK = 512


def common_prefix(cached: list[int], prompt: list[int]) -> int:
    """Length of the cached prefix shared with `prompt`, leaving at least one prompt token to prefill
    (its logits start the reply)."""
    limit = max(0, min(len(cached), len(prompt) - 1))
    # List slices compare in C: halve the range holding the first difference, then step through the last
    # few tokens (a Python loop over a 2,000-token history, for every idle slot, costs milliseconds).
    lo, hi = 0, limit  # cached[:lo] == prompt[:lo]; the first difference, if any, is in [lo, hi)
    if cached[:limit] == prompt[:limit]:
        return limit
    while hi - lo > 32:
        mid = (lo + hi) // 2
        if cached[lo:mid] == prompt[lo:mid]:
            lo = mid
        else:
            hi = mid
    while lo < hi and cached[lo] == prompt[lo]:
        lo += 1
    return lo


@torch.inference_mode()
def prefill(model: torch.nn.Module, cache, ids: list[int], start: int, row: int = 0) -> torch.Tensor:
    """Run `ids` at positions start.. through the model into cache row `row`; -> last logits [1, V]."""
    rows = slice(row, row + 1)
    logits = None
    for lo in range(0, len(ids), PREFILL_CHUNK):
        chunk = torch.tensor([ids[lo:lo + PREFILL_CHUNK]])  # [1, T]
        pos = torch.arange(start + lo, start + lo + chunk.shape[1])[None]  # [1, T]
        logits = model(chunk, pos, cache, rows=rows, last_only=True)[:, -1]
    return logits


@torch.inference_mode()
def prefill_prompt(model: torch.nn.Module, cache, prompt: list[int], n_cached: int, row: int = 0,
                   spans: Seq[tuple[int, int]] = (), passages=None) -> torch.Tensor:
    """Fill cache row `row` with `prompt` from position n_cached on (the rest is cached); -> the logits of
    its last token [1, V].

    With a PassageCache (kuaida.engine.passages), the passage `spans` ([start, end) token positions,
    ascending) are written from it first, then every other new token goes through the model in one
    forward at its own position (positions with gaps; each token attends to every cache slot up to its
    position, passages included), so a prompt costs one forward however many passages it holds. A span
    the cached prefix ends inside is written whole (its first tokens are the same either way: a
    passage's encoding depends on nothing before it); a span that reaches the prompt's last token is
    prefilled (that token's logits start the reply). The passage cache's anchor (the passages message's
    header and instruction), where the new tokens hold it right before a passage written from the cache,
    is written from the cache too (see kuaida.engine.passages)."""
    if passages is None or not spans:
        return prefill(model, cache, prompt[n_cached:], n_cached, row)
    written = []
    a = len(passages.anchor)
    for s, e in spans:
        if e <= n_cached or e >= len(prompt) or not passages.fits(e - s):
            continue
        if s - a >= n_cached and prompt[s - a:s] == passages.anchor:
            passages.write_anchor(cache, row, s - a)
            written.append((s - a, s))
        passages.write(cache, row, s, prompt[s:e])
        written.append((s, e))
    todo = [p for p in range(n_cached, len(prompt)) if not any(s <= p < e for s, e in written)]
    logits = None
    for lo in range(0, len(todo), PREFILL_CHUNK):
        pos = todo[lo:lo + PREFILL_CHUNK]
        logits = model(torch.tensor([[prompt[p] for p in pos]]), torch.tensor([pos]), cache,
                       rows=slice(row, row + 1), last_only=True)[:, -1]
    return logits


def model_step(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache,
                rows) -> torch.Tensor:
    """A decode step through the model's forward: tokens, positions [B, 1] -> logits [B, 1, V]."""
    return model(tokens, positions, cache, rows=rows, last_only=True)


@dataclass
class LookupStats:
    """Prompt lookup so far: verify steps, tokens drafted, drafted tokens that greedy decoding kept."""
    steps: int = 0
    drafted: int = 0
    accepted: int = 0


class Engine:
    def __init__(self, model: torch.nn.Module, eos_ids: set[int], max_context: int | None = None) -> None:
        self.model = model
        self.eos_ids = set(eos_ids)
        limit = model.args.max_seq_len
        self.max_context = min(max_context or limit, limit)
        self.cache = model.new_cache(batch=1, max_seq=self.max_context)
        self.cached_ids: list[int] = []  # tokens whose keys/values sit in the cache row, in order
        self.passages = None  # a kuaida.engine.passages.PassageCache: passage spans come from it
        self.lookup: LookupConfig | None = None  # prompt-lookup drafts (use_prompt_lookup), off by default
        self.lookup_stats = LookupStats()
        # Decode steps without module calls where the model allows (kuaida.model.fused.DecodePlan): the
        # model is final once an Engine runs it.
        self.decode_step = decode_plan(model) or functools.partial(model_step, model)

    @torch.inference_mode()
    def decode_one(self, token: int, pos: int) -> torch.Tensor:
        """One new token at position `pos` -> logits [1, V]."""
        tokens, positions = torch.tensor([[token]]), torch.tensor([[pos]])
        return self.decode_step(tokens, positions, self.cache, slice(0, 1))[:, -1]

    def start(self, seq: Sequence) -> torch.Tensor:
        """Prefill what the cache lacks of the prompt; -> the logits of its last token."""
        n_cached = common_prefix(self.cached_ids, seq.prompt_ids)
        # A recurrent state (kuaida.model.rnn) sums up every token it has seen: it cannot be cut back to
        # a shorter prefix, only extended (the next turn of a chat), or restarted at position 0.
        extend_only = getattr(self.cache, "extend_only", False)
        if extend_only and n_cached < len(self.cached_ids):
            n_cached = 0
        seq.stats.cached_tokens = n_cached
        # Stays true if the prefill fails midway: a KV cache still holds the common prefix, a recurrent
        # state holds nothing reusable.
        self.cached_ids = [] if extend_only else self.cached_ids[:n_cached]
        logits = prefill_prompt(self.model, self.cache, seq.prompt_ids, n_cached, 0, seq.spans, self.passages)
        self.cached_ids = list(seq.prompt_ids)
        return logits

    def run(self, seq: Sequence) -> Iterator[int]:
        logits = self.start(seq)
        index = self._ngram_index(seq)
        token = seq.next_token(logits)
        while token is not None:
            yield token
            if seq.finished:
                return
            drafts = []
            if index is not None:
                index.extend([token])
                # Room for the drafts and the token after them, in the reply's budget and the context.
                room = min(seq.budget - len(seq.tokens), self.max_context - len(self.cached_ids) - 1) - 1
                drafts = index.draft(room)
            if not drafts:
                logits = self.decode_one(token, len(self.cached_ids))
                self.cached_ids.append(token)
                token = seq.next_token(logits)
                continue
            logits = self.verify([token] + drafts, len(self.cached_ids))  # [1 + k, V]
            self.cached_ids.append(token)
            self.lookup_stats.steps += 1
            self.lookup_stats.drafted += len(drafts)
            for j, draft in enumerate(drafts):
                token = seq.next_token(logits[j:j + 1])
                if token != draft:
                    break  # greedy decoding goes elsewhere here: the rest of the draft is dropped
                self.lookup_stats.accepted += 1
                yield token
                if seq.finished:
                    return
                index.extend([token])
                self.cached_ids.append(token)
            else:  # the whole draft held: the last position's logits give one more token
                token = seq.next_token(logits[len(drafts):])

    def use_prompt_lookup(self, config: LookupConfig | None = LookupConfig()) -> None:
        """Draft tokens from the prompt and the reply (kuaida.engine.lookup) and verify them in one
        forward, for greedy replies (temperature 0): the same tokens as without, fewer forward passes
        when the reply copies. None: off."""
        self.lookup = config

    def _ngram_index(self, seq: Sequence) -> NgramIndex | None:
        # Verifying needs kuaida's KV cache (rows, per-token positions): not a recurrent state, not a model
        # run through transformers (batch 1).
        if self.lookup is None or not seq.params.greedy or not isinstance(self.cache, KVCache):
            return None
        return NgramIndex(self.lookup, seq.prompt_ids)

    @torch.inference_mode()
    def verify(self, ids: list[int], pos: int) -> torch.Tensor:
        """Feed `ids` at positions pos.. -> the logits after each [len(ids), V].

        Run as a batched decode step whose rows are the same cache row at consecutive positions: each
        token writes its key/value, then attends up to its own position through the decode kernel. So
        every row computes what decode_one would for that token (the same matmul kernel per row, the
        same attention), and a verified draft gives the reply greedy decoding gives. A prefill forward
        would take another attention kernel (bf16), whose rounding can flip a close argmax."""
        n = len(ids)
        tokens = torch.tensor(ids)[:, None]  # [n, 1]
        positions = torch.arange(pos, pos + n)[:, None]  # [n, 1]
        rows = torch.zeros(n, dtype=torch.long)  # all on cache row 0
        return self.decode_step(tokens, positions, self.cache, rows)[:, -1]

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 stats: GenerationStats | None = None, spans: Seq[tuple[int, int]] = ()) -> Iterator[int]:
        """Yield sampled token ids until an end-of-turn token, max_new_tokens or the context is full.
        The end-of-turn token itself is not yielded. `stats` (if given) is filled in as it goes.
        `spans`: the prompt's passages (see prefill_prompt)."""
        yield from self.run(Sequence(prompt_ids, params, self.eos_ids, self.max_context, stats=stats,
                                     spans=spans))

    def stream(self, prompt_ids: list[int], params: SamplingParams, tokenizer,
               stats: GenerationStats | None = None, spans: Seq[tuple[int, int]] = ()) -> Iterator[str]:
        """Text pieces of the reply: valid UTF-8 always, stop strings cut (not included)."""
        seq = Sequence(prompt_ids, params, self.eos_ids, self.max_context, tokenizer, stats, spans)
        tokens = self.run(seq)
        for token in tokens:
            if piece := seq.text(token):
                yield piece
            if seq.finished:
                tokens.close()
                break
        if tail := seq.text_tail():
            yield tail
