"""What the endpoints do: requests -> prompts -> the shared Scheduler -> replies (JSON or SSE).

Nothing here runs the model: the scheduler's thread does, and we await its stream, so the event loop
stays free. Tokenizing and the session store (SQLite, fsync per turn) run in worker threads for the
same reason. A reply's generation is cancelled as soon as its client disconnects, for a stream and for
a plain request alike, so an abandoned request never holds a batch slot.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kuaida.dialogue.manager import DialogueManager, TurnPlan
from kuaida.dialogue.retrieval import Grounding, Retriever
from kuaida.dialogue.store import Session, SessionStore
from kuaida.dialogue.template import render_prompt, typed_prompt_ids
from kuaida.engine.sampling import SamplingParams
from kuaida.engine.scheduler import Scheduler, Stream
from kuaida.engine.sequence import GenerationStats
from kuaida.errors import BusyError, ContextLengthError, KuaidaError, SessionNotFoundError
from kuaida.serve.metrics import ServerMetrics
from kuaida.serve.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDraftRequest,
    Choice,
    ChunkChoice,
    Delta,
    DraftAccepted,
    DraftRequest,
    ErrorBody,
    ErrorResponse,
    KnowledgeOptions,
    KuaidaStats,
    ModelCard,
    ModelList,
    SessionCreateRequest,
    SessionDeleted,
    SessionHistory,
    SessionMessage,
    SessionMessageRequest,
    SessionObject,
    SessionOptions,
    SourcePassage,
    StoredTurn,
    Usage,
)

log = logging.getLogger(__name__)
DONE_EVENT = "data: [DONE]\n\n"
OnDone = Callable[[str, GenerationStats], Awaitable[None]]


class GenerationError(Exception):
    """The scheduler failed a request (a server fault, already logged there): answered with a 500."""


class Generation:
    """One submitted request seen from the server: its stream, and the bookkeeping done exactly once
    when it ends, however it ends (finished, client gone, error)."""

    def __init__(self, stream: Stream, metrics: ServerMetrics) -> None:
        self.stream, self.metrics = stream, metrics
        self.created = int(time.time())
        self._closed = False
        metrics.active.inc()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stream.cancel()  # a no-op once finished; otherwise frees the slot at the next decode step
        self.metrics.active.dec()
        stats = self.stream.stats
        reason = stats.finish_reason or "cancelled"  # set by the scheduler's thread at its next step
        self.metrics.generation_done(dataclasses.replace(stats, finish_reason=reason))


async def cancel_on_disconnect(receive: Receive, stream: Stream) -> None:
    """Wait for the client to go away, then cancel its generation. The body has been read by then, so
    the only message left to receive is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


class EventStream(StreamingResponse):
    """Server-sent events that end the generation when the response ends, whatever ends it."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], generation: Generation,
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation, self.on_close = generation, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(cancel_on_disconnect(receive, self.generation.stream))
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()
            self.generation.close()
            if self.on_close:
                self.on_close()


def event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def finish_reason(stats: GenerationStats) -> str:
    # A request cancelled at shutdown ends like a stop: OpenAI clients know only "stop" and "length".
    return "length" if stats.finish_reason == "length" else "stop"


def usage(stats: GenerationStats) -> Usage:
    return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                 total_tokens=stats.prompt_tokens + stats.completion_tokens,
                 prompt_tokens_details={"cached_tokens": stats.cached_tokens})


def kuaida_stats(stats: GenerationStats, dropped: int = 0, grounding: Grounding | None = None) -> KuaidaStats:
    knowledge = {}
    if grounding is not None:
        knowledge = {"retrieval_ms": round(grounding.seconds * 1000, 2),
                     "sources": [SourcePassage(id=p.id, doc=p.doc, heading=p.heading, text=p.text,
                                               score=round(p.score, 6)) for p in grounding.passages]}
    return KuaidaStats(ttft_ms=round(stats.ttft_s * 1000, 2), queue_ms=round(stats.queue_s * 1000, 2),
                       tokens_per_s=round(stats.decode_tok_s, 2), cached_tokens=stats.cached_tokens,
                       dropped_messages=dropped, **knowledge)


KNOWLEDGE_KEY = "knowledge"  # where a session's knowledge base is kept among its stored options


def split_options(options: dict) -> tuple[dict, KnowledgeOptions | None]:
    """A session's stored options -> (sampling defaults, knowledge base)."""
    sampling = {k: v for k, v in options.items() if k != KNOWLEDGE_KEY}
    knowledge = options.get(KNOWLEDGE_KEY)
    return sampling, KnowledgeOptions(**knowledge) if knowledge else None


class OpenAIServing:
    def __init__(self, scheduler: Scheduler, tokenizer, store: SessionStore, metrics: ServerMetrics,
                 model_id: str, default_max_tokens: int, retriever: Retriever | None = None) -> None:
        self.scheduler, self.tokenizer, self.store, self.metrics = scheduler, tokenizer, store, metrics
        self.retriever = retriever or Retriever()
        self.model_id, self.created = model_id, int(time.time())
        self.defaults = {"max_new_tokens": default_max_tokens}
        self.manager = DialogueManager(store, partial(render_prompt, tokenizer), scheduler.max_context)
        self._session_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created)])

    # -- generation, shared by both APIs -------------------------------------------------------------
    def _submit(self, prompt_ids: list[int], params: SamplingParams, spans=()) -> Generation:
        stream = self.scheduler.submit(prompt_ids, params, loop=asyncio.get_running_loop(), spans=spans)
        return Generation(stream, self.metrics)

    async def _collect(self, generation: Generation, request: Request) -> str:
        watcher = asyncio.create_task(cancel_on_disconnect(request.receive, generation.stream))
        try:
            return "".join([piece async for piece in generation.stream])
        except KuaidaError as e:
            raise GenerationError(str(e)) from e
        finally:
            watcher.cancel()
            generation.close()

    async def _events(self, generation: Generation, rid: str, include_usage: bool, dropped: int = 0,
                      on_done: OnDone | None = None,
                      grounding: Grounding | None = None) -> AsyncIterator[str]:
        """The SSE body as OpenAI sends it: a role chunk, content deltas, a finish chunk, [usage], [DONE]."""
        chunk = partial(ChatCompletionChunk, id=rid, created=generation.created, model=self.model_id)
        yield event(chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=""))]))
        parts = []
        try:
            async for piece in generation.stream:
                parts.append(piece)
                yield event(chunk(choices=[ChunkChoice(delta=Delta(content=piece))]))
        except KuaidaError as e:  # the 200 is sent: report the failure in-band, the way OpenAI does
            yield event(ErrorResponse(error=ErrorBody(message=str(e), type="server_error")))
            yield DONE_EVENT
            return
        stats = generation.stream.stats
        if on_done:
            await on_done("".join(parts), stats)
        yield event(chunk(choices=[ChunkChoice(delta=Delta(), finish_reason=finish_reason(stats))],
                          kuaida=kuaida_stats(stats, dropped, grounding)))
        if include_usage:
            yield event(chunk(choices=[], usage=usage(stats)))
        yield DONE_EVENT

    # -- /v1/chat/completions ------------------------------------------------------------------------
    async def chat_completion(self, req: ChatCompletionRequest,
                              request: Request) -> ChatCompletion | EventStream:
        params = req.sampling(self.defaults)
        messages, grounding = await self._grounded([m.plain() for m in req.messages], req.knowledge)
        # Rendering is deterministic (same messages -> same ids), so a client resending its history
        # shares a token prefix with its last request and the scheduler reuses that KV cache.
        spans: list[tuple[int, int]] = []  # where the passages are (the scheduler may take them cached)
        prompt_ids = await asyncio.to_thread(render_prompt, self.tokenizer, messages, spans)
        generation = self._submit(prompt_ids, params, spans)
        rid = "chatcmpl-" + secrets.token_hex(12)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self._events(generation, rid, include_usage, grounding=grounding), generation)
        text = await self._collect(generation, request)
        stats = generation.stream.stats
        return ChatCompletion(id=rid, created=generation.created, model=self.model_id,
                              choices=[Choice(message=AssistantMessage(content=text),
                                              finish_reason=finish_reason(stats))],
                              usage=usage(stats), kuaida=kuaida_stats(stats, grounding=grounding))

    def _ground(self, knowledge: KnowledgeOptions | None) -> Callable[..., Grounding] | None:
        """The search of a session's knowledge base (DialogueManager's `ground`), or None without one."""
        return partial(self.retriever.ground, base=knowledge.base, k=knowledge.k) if knowledge else None

    async def _grounded(self, messages: list[dict], knowledge: KnowledgeOptions | None
                        ) -> tuple[list[dict], Grounding | None]:
        """A chat request's messages with the passages found for its last user message (and those its
        earlier turns had), when it names a knowledge base."""
        if not knowledge:
            return messages, None
        grounding = await asyncio.to_thread(self.retriever.ground, messages, knowledge.base, knowledge.k)
        return grounding.messages, grounding

    # -- drafts: the user's message while it is typed -------------------------------------------------
    async def chat_draft(self, req: ChatDraftRequest) -> DraftAccepted:
        """The conversation's next prompt as far as it is typed, written ahead while the server is idle
        (kuaida.engine.scheduler: type_ahead); the completion request that follows reuses it."""
        # With a knowledge base: the passages found for the text typed so far (the sent message may find
        # others).
        messages, _ = await self._grounded([m.plain() for m in req.messages], req.knowledge)
        ids = await asyncio.to_thread(typed_prompt_ids, partial(render_prompt, self.tokenizer), messages)
        return self._type_ahead(ids)

    async def session_draft(self, session_id: str, req: DraftRequest, owner: str | None) -> DraftAccepted:
        session = await asyncio.to_thread(self.store.get, session_id, owner)
        sampling, knowledge = split_options(session.options)
        budget = SessionOptions(**sampling).sampling(self.defaults).max_new_tokens
        # A knowledge base's passages go before the message: those found for the text typed so far.
        ground = self._ground(knowledge)
        if ground and not req.content.strip():
            return DraftAccepted(prompt_tokens=0)
        try:
            ids = await asyncio.to_thread(self.manager.typed_prompt_ids, session, req.content, budget, ground)
        except ContextLengthError:  # the message, when sent, will be refused with the reason
            ids = []
        return self._type_ahead(ids)

    def _type_ahead(self, ids: list[int]) -> DraftAccepted:
        return DraftAccepted(prompt_tokens=len(ids) if self.scheduler.type_ahead(ids) else 0)

    # -- /v1/sessions --------------------------------------------------------------------------------
    async def create_session(self, req: SessionCreateRequest, owner: str | None) -> SessionObject:
        options = req.options.options() if req.options else {}
        if req.options:
            req.options.sampling(self.defaults)  # refuse bad options now, not at the first message
        if req.knowledge:
            await asyncio.to_thread(self.retriever.base, req.knowledge.base)  # a missing base: 404 now
            options[KNOWLEDGE_KEY] = req.knowledge.model_dump()
        session = await asyncio.to_thread(self.store.create, owner, req.system, options)
        return self._session_object(session)

    @staticmethod
    def _session_object(session: Session, cls=SessionObject, **more):
        sampling, knowledge = split_options(session.options)
        return cls(id=session.id, created=session.created, system=session.system, options=sampling,
                   knowledge=knowledge, **more)

    async def session_history(self, session_id: str, owner: str | None) -> SessionHistory:
        session = await asyncio.to_thread(self.store.get, session_id, owner)
        turns = await asyncio.to_thread(self.store.turns, session.id)
        return self._session_object(
            session, SessionHistory,
            messages=[StoredTurn(role=t["role"], content=t["content"], created=t["created"]) for t in turns])

    async def delete_session(self, session_id: str, owner: str | None) -> SessionDeleted:
        await asyncio.to_thread(self.store.delete, session_id, owner)
        return SessionDeleted(id=session_id)

    async def session_message(self, session_id: str, req: SessionMessageRequest, owner: str | None,
                              request: Request) -> SessionMessage | EventStream:
        session = await asyncio.to_thread(self.store.get, session_id, owner)
        sampling, knowledge = split_options(session.options)
        session_defaults = SessionOptions(**sampling).sampling(self.defaults)
        params = req.sampling(dataclasses.asdict(session_defaults))
        # One turn at a time per session: a second message waits for the first reply to be stored.
        lock = self._session_locks.setdefault(session.id, asyncio.Lock())
        await lock.acquire()
        try:
            generation, plan = await self._start_turn(session, req.content, params, knowledge)
        except BaseException:
            lock.release()
            raise
        dropped, grounding = plan.dropped, plan.grounding
        on_done = partial(self._store_reply, session, grounding)
        if req.stream:
            return EventStream(self._events(generation, "msg-" + secrets.token_hex(12), include_usage=True,
                                            dropped=dropped, on_done=on_done, grounding=grounding),
                               generation, lock.release)
        try:
            text = await self._collect(generation, request)
            await on_done(text, generation.stream.stats)
        finally:
            lock.release()
        stats = generation.stream.stats
        return SessionMessage(id="msg-" + secrets.token_hex(12), created=generation.created,
                              session_id=session.id, model=self.model_id,
                              message=AssistantMessage(content=text), finish_reason=finish_reason(stats),
                              usage=usage(stats), kuaida=kuaida_stats(stats, dropped, grounding))

    async def _start_turn(self, session: Session, text: str, params: SamplingParams,
                          knowledge: KnowledgeOptions | None) -> tuple[Generation, TurnPlan]:
        # The user turn is stored before generation starts; refuse a full queue before storing it, so a
        # client retrying after a 429 does not leave the same message twice in the history.
        if self.scheduler.queue_depth >= self.scheduler.max_queue:
            raise BusyError(f"{self.scheduler.queue_depth} requests are already waiting; retry shortly")
        ground = self._ground(knowledge)
        plan = await asyncio.to_thread(self.manager.prepare_turn, session, text, params.max_new_tokens, ground)
        return self._submit(plan.prompt_ids, params, plan.spans), plan

    async def _store_reply(self, session: Session, grounding: Grounding | None, text: str,
                           stats: GenerationStats) -> None:
        """Store a reply that ran to its end; a cancelled one is left out (the user turn stays)."""
        if stats.finish_reason not in ("stop", "length"):
            return
        meta = {"finish_reason": stats.finish_reason, "usage": usage(stats).model_dump(),
                "kuaida": kuaida_stats(stats).model_dump(exclude_none=True)}
        if grounding is not None:
            meta["sources"] = [p.id for p in grounding.passages]
        try:
            await asyncio.to_thread(self.manager.finish_turn, session, text, meta)
        except SessionNotFoundError:  # deleted while the reply was being generated
            log.info("session %s was deleted during its turn; reply not stored", session.id)
