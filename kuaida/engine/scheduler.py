"""Continuous batching with per-conversation KV-cache reuse, for the server.

One background thread owns the model. Requests wait in a bounded queue; between decode steps the
thread admits them into free cache rows ("slots"), prefilling only what the slot does not already hold;
every step then decodes one token for all active requests in one batched forward. Finished requests
leave their slot's KV behind: a follow-up turn that extends the same token prefix lands on that slot and
prefills only its new tokens. Idle slots are reused least-recently-used first (an eviction).

With `next_turn_ids` (the chat template's tokens between a reply and the next user message, e.g.
`<|im_end|>\n<|im_start|>user\n`), a reply that ends by its end-of-turn token or its length leaves them to
be written after it: once the scheduler has been idle `next_turn_delay_s`, it prefills them into the
idle slot, so that the conversation's next turn prefills only the user's message (and the template's
assistant header). A conversation grounded in a knowledge base (its prompt holds passages) gets
`grounded_next_turn_ids` instead, when given: up to its next turn's first passage (the passages message's
header and instruction), ~45 tokens for the default model. A user reads and types for seconds; a client
that answers at once is not made to wait for it (the delay). A next turn that does not start that way
(a grounded turn without new passages, say) keeps the common prefix, as always.

`type_ahead(ids)` goes further while the user types: `ids` is the conversation's next prompt as far as
it is known (the history, then the user's message up to its last whole word: kuaida.dialogue.template.
typed_prompt_ids). Once idle, the scheduler writes whatever of it the conversation's slot does not hold,
so that when the message is sent only its last words and the assistant header are prefilled. It lands
only on an idle slot whose last prompt it extends: the same conversation (its reply as the history
renders it may differ in a few tokens from the reply as generated; what was written ahead is cut back to
the common prefix where the user changed their text), never another one that merely shares a prefix.
A new conversation's first message (no slot continues it) goes to a slot no request has run in since it
was last emptied (empty, or holding only earlier drafts), after a copy of the longest prefix a request
wrote anywhere (the system prompt): a draft never evicts a conversation. Written ahead in chunks of
`ahead_chunk` tokens, so a request arriving meanwhile waits at most one chunk.

With prompt lookup (`lookup=LookupConfig()`), a greedy request whose reply repeats its prompt (a grounded
answer quoting its passages) gets draft tokens (kuaida.engine.lookup) as extra rows of the same decode
step: each row is its cache row at the next position, so every draft goes through decode's own kernels
and the reply is the one greedy decoding gives without drafts (as in Engine.verify). Decode steps run in
kernels.row_independent(): quantized layers keep the integer kernel at any row count, so a row's logits
never depend on the rows beside it. Drafts fill the step up to `lookup_rows` rows, dealt a token per
request per round: a small batch has time to spare, a full one has none (measured: at 8 streams, extra
draft rows cost about what they save, each re-reading its row's history in attention).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence as Seq  # engine.sequence.Sequence is a request
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from kuaida import kernels
from kuaida.engine.generate import common_prefix, model_step, prefill_prompt
from kuaida.engine.lookup import LookupConfig, NgramIndex
from kuaida.engine.sampling import SamplingParams
from kuaida.engine.sequence import GenerationStats, Sequence, check_fits
from kuaida.engine.threads import release_idle_teams
from kuaida.errors import BusyError, KuaidaError
from kuaida.model.fused import decode_plan

log = logging.getLogger(__name__)
_DONE = object()


class Stream:
    """The caller's side of one request: text pieces as they are produced, then `stats`.

    Iterate it from a thread (`for piece in stream`) or from asyncio (`async for piece in stream`, when
    submitted with `loop=`). `cancel()` (e.g. the client disconnected) frees its slot at the next step.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.id, self.loop = request_id, loop
        self.stats = GenerationStats()
        self.cancelled = threading.Event()
        self._q: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()

    def put(self, item) -> None:
        """Called from the scheduler thread."""
        if self.loop is None:
            self._q.put(item)
            return
        try:
            self.loop.call_soon_threadsafe(self._q.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def _check(self, item):
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[str]:
        while (item := self._q.get()) is not _DONE:
            yield self._check(item)

    async def __aiter__(self) -> AsyncIterator[str]:
        while (item := await self._q.get()) is not _DONE:
            yield self._check(item)


@dataclass
class Slot:
    row: int
    cached_ids: list[int] = field(default_factory=list)  # tokens whose KV sits in this cache row
    last_used: float = 0.0
    busy: bool = False
    # (key, n): positions [0, n) of this row hold bitwise the same keys/values as those of every other slot
    # with the same key, up to the shorter n (copies of one prefix, see _copy_prefix). Decode steps read such
    # a prefix once for all the rows that share it.
    prefix: tuple[int, int] | None = None
    # Tokens to write after cached_ids while the scheduler is idle (the reply's unfed last token and the
    # template's next-turn tokens, or what the user is typing), or None; due at ahead_at (perf_counter).
    ahead: list[int] | None = None
    ahead_at: float = 0.0
    ahead_typed: bool = False  # ahead came from type_ahead (counted apart)
    # cached_ids[:settled] were written by requests (prompts and replies); what follows was written ahead.
    # cached_ids[:turn_start] is the prompt of the last request here (the conversation before its reply).
    settled: int = 0
    turn_start: int = 0

    def keep(self, n: int) -> None:
        """Only the first n cached positions stay valid (what follows will be overwritten)."""
        self.cached_ids = self.cached_ids[:n]
        self.settled, self.turn_start = min(self.settled, n), min(self.turn_start, n)
        if self.prefix is not None and self.prefix[1] > n:
            self.prefix = (self.prefix[0], n) if n > 0 else None


@dataclass
class Active:
    stream: Stream
    seq: Sequence
    slot: Slot
    last_token: int = -1  # sampled but not yet fed back through the model
    index: NgramIndex | None = None  # prompt lookup: the prompt and the reply so far (greedy requests)


@dataclass
class SchedulerMetrics:
    requests: int = 0
    cache_hits: int = 0  # requests that reused a cached prefix
    cached_tokens: int = 0  # prompt tokens not prefilled thanks to reuse
    prefilled_tokens: int = 0
    evictions: int = 0  # idle conversations whose KV was overwritten
    decode_steps: int = 0
    decoded_tokens: int = 0
    drafted_tokens: int = 0  # prompt-lookup drafts verified
    accepted_tokens: int = 0  # ... that greedy decoding kept
    next_turn_tokens: int = 0  # written into idle conversations ahead of their next turn
    typed_tokens: int = 0  # ... of what their users were typing (type_ahead)


class Scheduler:
    def __init__(self, model: torch.nn.Module, tokenizer, eos_ids: set[int], *, max_batch: int = 8,
                 max_context: int | None = None, cache_budget_mb: int = 2048, max_queue: int = 64,
                 enable_prefix_cache: bool = True, passages=None, lookup: LookupConfig | None = None,
                 lookup_rows: int = 8, next_turn_ids: Seq[int] = (), grounded_next_turn_ids: Seq[int] = (),
                 next_turn_delay_s: float = 0.05, ahead_chunk: int = 32) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, set(eos_ids)
        # Written into a finished conversation's slot once idle this long (module docstring); () : off.
        self.next_turn_ids, self.next_turn_delay_s = list(next_turn_ids), next_turn_delay_s
        self.grounded_next_turn_ids = list(grounded_next_turn_ids or next_turn_ids)
        # Tokens written ahead per idle pass: a request arriving meanwhile waits at most this prefill.
        self.ahead_chunk = max(1, ahead_chunk)
        self._typed: deque[list[int]] = deque(maxlen=64)  # type_ahead prompts not yet placed
        # Decode steps without module calls where the model allows (kuaida.model.fused.DecodePlan).
        self.decode_step = decode_plan(model) or functools.partial(model_step, model)
        # Prompt lookup: drafts for greedy requests, up to lookup_rows rows per decode step (rows of the
        # integer kernels: their per-row sums do not depend on the row count, which keeps replies exact;
        # ~1.5 ms a row for the default int8 model, against ~3.6 ms for a whole one-row step).
        self.lookup, self.lookup_rows = lookup, lookup_rows
        self.passages = passages  # a kuaida.engine.passages.PassageCache, or None: passages are prefilled
        self.enable_prefix_cache = enable_prefix_cache  # off: every prompt is prefilled whole (baselines)
        self.max_context = min(max_context or model.args.max_seq_len, model.args.max_seq_len)
        row_bytes = model.new_cache(batch=1, max_seq=self.max_context).nbytes()  # the model picks the dtype
        n_slots = max(1, cache_budget_mb * 2**20 // max(1, row_bytes))
        self.max_batch = min(max_batch, n_slots)
        self.cache = model.new_cache(batch=n_slots, max_seq=self.max_context)
        self.slots = [Slot(row=i) for i in range(n_slots)]
        self.max_queue = max_queue
        self.waiting: deque[tuple[Stream, Sequence]] = deque()
        self.active: list[Active] = []
        self.metrics = SchedulerMetrics()
        self._ids = itertools.count()
        self._prefix_keys = itertools.count()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kuaida-scheduler", daemon=True)
        log.info("scheduler: %d cache slots of %d tokens, batch up to %d", n_slots, self.max_context,
                 self.max_batch)

    # -- the caller's side -----------------------------------------------------------------------
    def start(self) -> "Scheduler":
        # The calling thread built the model and this cache: its idle OpenMP workers would make every op
        # of the scheduler thread ~1.7x slower (kuaida.engine.threads); they come back if it computes again.
        release_idle_teams()
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None, spans=()) -> Stream:
        """Queue a request; raises ContextLengthError (prompt too long) or BusyError (queue full).
        `spans`: the knowledge-base passages in the prompt (kuaida.engine.generate.prefill_prompt)."""
        check_fits(len(prompt_ids), self.max_context)
        stream = Stream(f"req-{next(self._ids)}", loop)
        seq = Sequence(prompt_ids, params, self.eos_ids, self.max_context, self.tokenizer, stream.stats,
                       spans)
        with self._wake:
            if self._stopping:
                raise BusyError("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise BusyError(f"{len(self.waiting)} requests are already waiting; retry shortly")
            self.waiting.append((stream, seq))
            self.metrics.requests += 1
            self._wake.notify()
        return stream

    def type_ahead(self, prompt_ids: list[int]) -> bool:
        """A conversation's next prompt as far as it is known (its user still typing): written into the
        slot whose conversation it extends while the scheduler is idle (module docstring). Returns whether
        it was queued: not without prefix caching, for an empty prompt, or one that leaves no room in the
        context. A queued prompt is still dropped where no idle slot can take it."""
        if not self.enable_prefix_cache or not prompt_ids or len(prompt_ids) >= self.max_context:
            return False
        with self._wake:
            self._typed.append(list(prompt_ids))
            self._wake.notify()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, cancel queued ones, let active ones finish for up to `timeout` s."""
        with self._wake:
            self._stopping = True
            while self.waiting:
                stream, seq = self.waiting.popleft()
                seq.finish("cancelled")
                stream.put(_DONE)
            self._wake.notify()
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        for a in list(self.active):
            a.stream.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # -- the scheduler thread --------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                ahead = None
                with self._wake:
                    while not self.waiting and not self.active and not self._stopping:
                        self._place_typed()
                        ahead = self._next_ahead()
                        if ahead is not None and ahead[1] <= 0:
                            break
                        self._wake.wait(None if ahead is None else ahead[1])
                    if self._stopping and not self.active:
                        return
                    idle = not self.waiting and not self.active
                try:
                    if idle and ahead is not None:
                        self._write_ahead(ahead[0])
                        continue
                    self._admit()
                    if self.active:
                        self._step()
                except Exception as e:  # never die silently: fail the requests in flight, keep serving
                    log.exception("scheduler step failed")
                    for a in list(self.active):
                        a.slot.keep(0)
                        self._finish(a, KuaidaError(f"generation failed: {e}"))

    def _next_ahead(self) -> tuple[Slot, float] | None:
        """The idle slot whose next-turn tokens are due first, and the seconds until they are."""
        pending = [s for s in self.slots if s.ahead is not None and not s.busy]
        if not pending:
            return None
        slot = min(pending, key=lambda s: s.ahead_at)
        return slot, slot.ahead_at - time.perf_counter()

    def _place_typed(self) -> None:
        """Give each type_ahead prompt to the idle slot whose conversation it extends (under the lock)."""
        while self._typed:
            ids = self._typed.popleft()
            idle = [s for s in self.slots if not s.busy]
            # The slot whose last prompt this extends, holding the most of it.
            fits = [(n, s) for s in idle if s.turn_start > 0
                    and (n := common_prefix(s.cached_ids, ids)) >= s.turn_start]
            found = max(fits, key=lambda f: f[0]) if fits else self._spare_slot(ids, idle)
            if found is None:
                continue
            n, slot = found
            slot.keep(n)  # what was written ahead and the user has since changed (or a re-tokenized reply)
            slot.last_used = time.perf_counter()
            if ids[n:]:
                slot.ahead, slot.ahead_at, slot.ahead_typed = ids[n:], time.perf_counter(), True
            else:
                slot.ahead = None

    def _spare_slot(self, ids: list[int], idle: list[Slot]) -> tuple[int, Slot] | None:
        """For a new conversation's draft: the idle slot holding nothing a request ran in (empty, a copied
        prefix, earlier drafts), the longest prefix a request wrote anywhere copied in first where that is
        more than it shares with the draft already -> (tokens of the draft it holds, the slot); None when
        every slot holds a conversation."""
        shared = {s.row: common_prefix(s.cached_ids, ids) for s in idle if s.turn_start == 0}
        if not shared:
            return None
        # This draft's own earlier one first (it shares more than the prefix it was copied after), else an
        # empty slot, else the least recently used spare one.
        slot = max((s for s in idle if s.row in shared),
                   key=lambda s: (shared[s.row] > s.settled, not s.cached_ids, -s.last_used))
        src = max(self.slots, key=lambda s: common_prefix(s.cached_ids[:s.settled], ids))
        if (m := common_prefix(src.cached_ids[:src.settled], ids)) <= shared[slot.row]:
            return shared[slot.row], slot
        slot.keep(0)
        self._copy_prefix(src, slot, m)
        slot.turn_start = 0  # no request ran here: still spare, and no conversation's own slot
        return m, slot

    def _write_ahead(self, slot: Slot) -> None:
        """Prefill up to ahead_chunk of the slot's pending tokens after its cached ones (the scheduler is
        idle); the rest waits for the next idle pass."""
        chunk, rest = slot.ahead[:self.ahead_chunk], slot.ahead[self.ahead_chunk:]
        ids, slot.ahead = slot.cached_ids + chunk, rest or None
        if len(ids) >= self.max_context:  # no room for a next turn anyway
            slot.ahead = None
            return
        try:
            prefill_prompt(self.model, self.cache, ids, len(slot.cached_ids), slot.row)
        except Exception:  # a failure here must not stop the server; the next turn prefills them itself
            log.exception("writing the next turn's tokens failed")
            slot.ahead = None
            return
        if slot.ahead_typed:
            self.metrics.typed_tokens += len(chunk)
        else:
            self.metrics.next_turn_tokens += len(chunk)
        slot.cached_ids = ids

    def _pick_slot(self, prompt_ids: list[int]) -> tuple[Slot, int] | None:
        """An idle slot for `prompt_ids` and how many of its tokens are already cached there.

        The idle slot whose cached tokens the prompt extends (the same conversation's next turn) is taken
        as is. A slot that shares only part of its tokens with the prompt (another conversation with the
        same system prompt, idle or still generating) is not overwritten: the shared prefix is copied into
        the least recently used idle slot (an empty one first), and the other conversation keeps its cache.
        Without any shared prefix, the least recently used idle slot is taken. Overwriting a slot that held
        a conversation counts as an eviction."""
        idle = [s for s in self.slots if not s.busy]
        if not idle:
            return None
        if not self.enable_prefix_cache:
            best, n = min(idle, key=lambda s: (len(s.cached_ids) > 0, s.last_used)), 0
        else:
            best = max(idle, key=lambda s: (common_prefix(s.cached_ids, prompt_ids), -s.last_used))
            n = common_prefix(best.cached_ids, prompt_ids)
            if n > 0 and n >= best.settled:
                # The prompt extends this slot's conversation (all its tokens, or all but some written ahead
                # that the prompt does not continue: those are cut back, nothing is lost).
                return best, n
            # A busy slot may hold a longer shared prefix (conversations that start together): the KV of its
            # cached tokens is final, it only writes past them.
            busy = [s for s in self.slots if s.busy]
            if busy:
                longest = max(busy, key=lambda s: common_prefix(s.cached_ids, prompt_ids))
                if (n_busy := common_prefix(longest.cached_ids, prompt_ids)) > n:
                    best, n = longest, n_busy
            victim = min(idle, key=lambda s: (len(s.cached_ids) > 0, s.last_used))
            if n > 0 and victim is not best:
                self._copy_prefix(best, victim, n)
                best = victim
            elif n == 0:
                best = victim
        if best.settled > n:  # a conversation lost (tokens written ahead only are not one)
            self.metrics.evictions += 1
        return best, n

    def _copy_prefix(self, src: Slot, dst: Slot, n: int) -> None:
        """Copy the first n cached positions of src's KV row into dst's row (a shared system prompt:
        ~10 MB for 400 tokens of the default model, far less than prefilling it again)."""
        dst.ahead = None
        if dst.settled:
            self.metrics.evictions += 1
        for kc, vc in zip(self.cache.k, self.cache.v):
            kc[dst.row, :, :n] = kc[src.row, :, :n]
            vc[dst.row, :, :n] = vc[src.row, :, :n]
        dst.cached_ids = list(src.cached_ids[:n])
        dst.settled = dst.turn_start = n  # a real prompt's first n tokens
        if src.prefix is None or src.prefix[1] < n:  # src's tag cannot grow: others share only its first part
            src.prefix = (next(self._prefix_keys), n)
        dst.prefix = (src.prefix[0], n)

    def _admit(self) -> None:
        while len(self.active) < self.max_batch:
            with self._wake:
                if not self.waiting or (picked := self._pick_slot(self.waiting[0][1].prompt_ids)) is None:
                    return
                stream, seq = self.waiting.popleft()
            if stream.cancelled.is_set():
                seq.finish("cancelled")
                stream.put(_DONE)
                continue
            slot, n_cached = picked
            self._start(stream, seq, slot, n_cached)

    def _start(self, stream: Stream, seq: Sequence, slot: Slot, n_cached: int) -> None:
        slot.busy, slot.ahead = True, None
        seq.stats.queue_s = time.perf_counter() - seq.t0
        seq.stats.cached_tokens = n_cached
        self.metrics.cache_hits += n_cached > 0
        self.metrics.cached_tokens += n_cached
        self.metrics.prefilled_tokens += len(seq.prompt_ids) - n_cached
        slot.keep(n_cached)
        slot.turn_start = len(seq.prompt_ids)
        index = NgramIndex(self.lookup, seq.prompt_ids) if self.lookup and seq.params.greedy else None
        active = Active(stream, seq, slot, index=index)
        self.active.append(active)
        logits = prefill_prompt(self.model, self.cache, seq.prompt_ids, n_cached, slot.row, seq.spans,
                                self.passages)
        slot.cached_ids = list(seq.prompt_ids)
        self._advance(active, logits)

    def _step(self) -> None:
        """One token for every active request (more where drafts hold), in one batched forward."""
        for a in [a for a in self.active if a.stream.cancelled.is_set()]:
            a.seq.finish("cancelled")
            self._finish(a)
        if not self.active:
            return
        batch = list(self.active)
        drafts = self._drafts(batch)
        # Rows: each request's last token, then its drafts, its cache row at consecutive positions.
        tokens, positions, rows = [], [], []
        for a, d in zip(batch, drafts):
            pos = len(a.slot.cached_ids)
            tokens += [a.last_token, *d]
            positions += range(pos, pos + 1 + len(d))
            rows += [a.slot.row] * (1 + len(d))
        # A row's logits do not depend on the rows beside it (integer kernels; attention reads shared
        # prefixes once, with the same arithmetic as reading each row).
        with kernels.row_independent(), self._sharing(batch, drafts):
            logits = self.decode_step(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None],
                                      self.cache, torch.tensor(rows))[:, -1]  # [rows, V]
        self.metrics.decode_steps += 1
        first = 0
        for a, d in zip(batch, drafts):
            self.metrics.drafted_tokens += len(d)
            try:
                self._accept(a, d, logits[first:first + 1 + len(d)])
            except Exception as e:  # one request's failure (e.g. in sampling) must not end the others
                log.exception("request %s failed", a.stream.id)
                self._finish(a, KuaidaError(f"generation failed: {e}"))
            first += 1 + len(d)

    def _sharing(self, batch: list[Active], drafts: list[list[int]]):
        """The step's KVCache.sharing context: per row of the step, the cache row to read its shared prefix
        from and that prefix's length (0: its own row only). Requests whose slots hold copies of one prefix
        read it from the first one's row. A no-op where nothing is shared or the cache cannot share."""
        groups: dict[int, list[Active]] = {}
        for a in batch:
            if a.slot.prefix is not None:
                groups.setdefault(a.slot.prefix[0], []).append(a)
        src: dict[int, tuple[int, int]] = {}
        for members in groups.values():
            if len(members) > 1:
                n = min(a.slot.prefix[1] for a in members)
                src.update((id(a), (members[0].slot.row, n)) for a in members)
        if not src or not hasattr(self.cache, "sharing"):
            return contextlib.nullcontext()
        srcs, shared = [], []
        for a, d in zip(batch, drafts):
            row, n = src.get(id(a), (a.slot.row, 0))
            srcs += [row] * (1 + len(d))
            shared += [n] * (1 + len(d))
        return self.cache.sharing(torch.tensor(srcs), torch.tensor(shared))

    def _drafts(self, batch: list[Active]) -> list[list[int]]:
        """Prompt-lookup drafts per request, within the step's spare rows: dealt one token per request per
        round (a draft's first tokens are the likeliest to be kept), oldest requests first in each round."""
        spare = self.lookup_rows - len(batch)
        full: list[list[int]] = []
        for a in batch:
            d: list[int] = []
            if a.index is not None and spare > 0:
                # Room for the drafts and the token after them, in the reply's budget and the context.
                left = min(a.seq.budget - len(a.seq.tokens), self.max_context - len(a.slot.cached_ids) - 1)
                d = a.index.draft(min(left - 1, spare))
            full.append(d)
        take = [0] * len(batch)
        while spare > 0:
            dealt = 0
            for i, d in enumerate(full):
                if spare > 0 and take[i] < len(d):
                    take[i] += 1
                    spare -= 1
                    dealt += 1
            if not dealt:
                break
        return [d[:n] for d, n in zip(full, take)]

    def _accept(self, a: Active, drafts: list[int], logits: torch.Tensor) -> None:
        """logits [1 + len(drafts), V]: after the last token, then after each draft. Keep the drafts greedy
        decoding reproduces; the first one it does not is replaced by its own token, fed next step."""
        a.slot.cached_ids.append(a.last_token)
        self.metrics.decoded_tokens += 1
        for j in range(len(drafts) + 1):
            self._advance(a, logits[j:j + 1])
            if a.seq.finished or j == len(drafts) or a.last_token != drafts[j]:
                return
            a.slot.cached_ids.append(drafts[j])  # its KV, written by this step, is what decode would write
            self.metrics.accepted_tokens += 1
            self.metrics.decoded_tokens += 1

    def _advance(self, a: Active, logits: torch.Tensor) -> None:
        token = a.seq.next_token(logits)
        if token is not None:
            if piece := a.seq.text(token):
                a.stream.put(piece)
            a.last_token = token
            if a.index is not None:
                a.index.extend([token])
        if a.seq.finished:
            self._finish(a)

    def _finish(self, a: Active, error: BaseException | None = None) -> None:
        tail = a.seq.text_tail() if error is None else ""  # may find a stop string
        reason = a.seq.stats.finish_reason
        # Before _DONE: the server cancels every stream it has read to the end (a no-op for the scheduler).
        if (self.next_turn_ids and self.enable_prefix_cache and error is None and reason in ("stop", "length")
                and not a.seq.stopper.stopped and not a.stream.cancelled.is_set()):
            # The history the next turn resends: the reply as generated (its last token is not in the cache
            # yet after a length stop; an end-of-turn token never is), then the template's next-turn tokens.
            following = self.grounded_next_turn_ids if a.seq.spans else self.next_turn_ids
            a.slot.ahead = ([a.last_token] if reason == "length" else []) + following
            a.slot.ahead_at, a.slot.ahead_typed = time.perf_counter() + self.next_turn_delay_s, False
        if tail:
            a.stream.put(tail)
        if error is not None:
            a.seq.finish("error")
            a.stream.put(error)
        a.stream.put(_DONE)
        a.slot.busy, a.slot.last_used = False, time.perf_counter()
        if error is None:
            a.slot.settled = len(a.slot.cached_ids)
        else:
            a.slot.settled = a.slot.turn_start = 0
        self.active.remove(a)
