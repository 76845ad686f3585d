"""The dialogue manager: a session's stored turns -> the next prompt, and the reply back into the store.

    plan = manager.prepare_turn(session, "Hi!", max_new_tokens=256)   # stores the user turn
    ... generate from plan.prompt_ids ...
    manager.finish_turn(session, reply, {"usage": ..., "finish_reason": "stop"})

If generation fails between the two calls, the user turn stays stored without a reply, and the next
turn simply follows it: two user messages in a row. ChatML and most templates render that as is; for a
template that insists on alternating roles (it raises), consecutive user messages are joined with a
blank line instead, from then on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from jinja2 import TemplateError

from kuaida.dialogue.history import fit_history, kept_messages
from kuaida.dialogue.retrieval import Grounding
from kuaida.dialogue.store import Session, SessionStore
from kuaida.dialogue.template import typed_prompt_ids
from kuaida.errors import InvalidArgumentError

log = logging.getLogger(__name__)


@dataclass
class TurnPlan:
    prompt_ids: list[int]
    dropped: int  # oldest messages left out of the prompt (see kuaida.dialogue.history)
    messages: list[dict]  # what the prompt was rendered from: the kept messages, ending with the user's
    grounding: Grounding | None = None  # the knowledge-base passages in the prompt, when the turn has a base
    spans: list[tuple[int, int]] = field(default_factory=list)  # their token spans in prompt_ids


class DialogueManager:
    def __init__(self, store: SessionStore, render: Callable[[list[dict]], list[int]],
                 max_context: int) -> None:
        self.store, self.render, self.max_context = store, render, max_context
        self._merge_users = False  # set once the template has refused consecutive user messages

    def messages(self, session: Session) -> list[dict]:
        """The conversation so far as OpenAI messages: the system prompt (if any), then the turns."""
        return self._history(session)[0]

    def _history(self, session: Session) -> tuple[list[dict], dict[int, list[str]]]:
        """-> (messages, {index of a user message: the knowledge-base passages it was given})."""
        system = [{"role": "system", "content": session.system}] if session.system else []
        turns = self.store.turns(session.id)
        passages = {len(system) + i: t["meta"]["passages"] for i, t in enumerate(turns)
                    if t["role"] == "user" and t.get("meta", {}).get("passages")}
        return system + [{"role": t["role"], "content": t["content"]} for t in turns], passages

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Tokens the prompt may take: what the reply leaves of the context, but at least half of it,
        so that asking for a reply as long as the context still sends the recent conversation (the reply
        is then cut short where the context ends, finish_reason "length")."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens is {max_new_tokens!r}; use a positive integer")
        return max(self.max_context - max_new_tokens, self.max_context // 2)

    def prepare_turn(self, session: Session, user_text: str, max_new_tokens: int,
                     ground: Callable[..., Grounding] | None = None) -> TurnPlan:
        """Store the user's message and build the prompt for the reply.

        `ground(messages, earlier=...)` (a session with a knowledge base) puts the retrieved passages
        before the new user message, and every earlier turn's stored passages before its own, before
        the history is fitted (so the oldest turns make room). The new turn's passages are stored with
        it: later turns render them again in the same place, so their prompts extend this one.

        The prompt is built first, so a message that could never fit (ContextLengthError) is refused
        without being stored and cannot wedge the session; otherwise the user turn is durable before
        this returns, i.e. before any generation starts."""
        if not isinstance(user_text, str) or not user_text.strip():
            raise InvalidArgumentError("the user message must be a non-empty string")
        messages, grounding, prompt_ids, dropped = self._fitted(session, user_text, max_new_tokens, ground)
        spans: list[tuple[int, int]] = []
        if grounding is not None:  # the same render again, now noting where the passages are
            prompt_ids = self._render(kept_messages(messages, dropped), spans)
        self.store.append(session.id, "user", user_text, {"passages": grounding.texts} if grounding else None)
        if dropped:
            log.info("session %s: %d oldest messages left out of the prompt (%d tokens)",
                     session.id, dropped, len(prompt_ids))
        return TurnPlan(prompt_ids=prompt_ids, dropped=dropped, messages=kept_messages(messages, dropped),
                        grounding=grounding, spans=spans)

    def typed_prompt_ids(self, session: Session, typed_text: str, max_new_tokens: int,
                         ground: Callable[..., Grounding] | None = None) -> list[int]:
        """The next turn's prompt as far as it is known while the user is typing `typed_text` (nothing is
        stored): the history fitted as prepare_turn will fit it, then the typed text up to its last whole
        word (kuaida.dialogue.template.typed_prompt_ids). With `ground` (a session with a knowledge base),
        the passages found for the text typed so far go before it, as prepare_turn puts the sent message's:
        where the sent message finds the same ones, they are written already."""
        if not isinstance(typed_text, str):
            raise InvalidArgumentError("the typed text must be a string")
        messages, _, _, dropped = self._fitted(session, typed_text, max_new_tokens, ground)
        return typed_prompt_ids(self._render, kept_messages(messages, dropped))

    def _fitted(self, session: Session, user_text: str, max_new_tokens: int,
                ground: Callable[..., Grounding] | None
                ) -> tuple[list[dict], Grounding | None, list[int], int]:
        """The history and the new user message, grounded (with `ground`) and fitted to the prompt budget:
        -> (messages, grounding, prompt ids, oldest messages dropped)."""
        history, earlier = self._history(session)
        messages = history + [{"role": "user", "content": user_text}]
        grounding = ground(messages, earlier=earlier) if ground else None
        if grounding is not None:
            messages = grounding.messages
        prompt_ids, dropped = fit_history(self._render, messages, self.prompt_budget(max_new_tokens))
        return messages, grounding, prompt_ids, dropped

    def finish_turn(self, session: Session, reply_text: str, meta: dict) -> None:
        """Store the assistant's reply with its meta (usage, timings, finish_reason)."""
        self.store.append(session.id, "assistant", reply_text, meta)

    def _render(self, messages: list[dict], spans: list | None = None) -> list[int]:
        kwargs = {} if spans is None else {"spans": spans}
        if not self._merge_users:
            try:
                return self.render(messages, **kwargs)
            except TemplateError as e:
                if not _has_consecutive_users(messages):
                    raise
                log.info("the chat template refuses consecutive user messages (%s): merging them", e)
                self._merge_users = True
        return self.render(merge_consecutive_users(messages), **kwargs)


def merge_consecutive_users(messages: list[dict]) -> list[dict]:
    """Join runs of user messages into one (blank line between), for templates that need alternation."""
    merged: list[dict] = []
    for m in messages:
        if merged and m["role"] == "user" and merged[-1]["role"] == "user":
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    return merged


def _has_consecutive_users(messages: list[dict]) -> bool:
    return any(a["role"] == b["role"] == "user" for a, b in zip(messages, messages[1:]))
