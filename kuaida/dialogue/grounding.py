"""Grounding glue between a conversation and a knowledge base: what to search for, and where the
passages found go in the prompt. Pure functions: no model, no I/O.

    query = retrieval_query(messages)                       # -> kb.search(query, k=3)
    prompt_messages = grounded_messages(messages, passages)  # -> render with the chat template
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

# A follow-up this short, or one that points back ("does it...", "what about that one?"), rarely names
# its subject: the previous user turn supplies it.
SHORT_FOLLOW_UP_WORDS = 6
_BACK_REFERENCES = frozenset(
    ["it", "its", "it's", "this", "that", "these", "those", "they", "them", "their", "there", "one", "ones", "he", "she", "him", "her", "same", "also", "too", "else", "other", "another", "former", "latter"])
_WORD = re.compile(r"[\w']+")

INSTRUCTION = ("Answer from the passages below and cite the id of each passage you use in brackets, "
               "like [{example}]. If they do not contain the answer, say you do not know.")


class PassageLike(Protocol):
    """What grounding reads of kuaida.knowledge.Passage (any object with these attributes works)."""
    id: str
    heading: str
    text: str


def _user_turns(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)
            and m["content"].strip()]


def _needs_context(text: str) -> bool:
    words = [w.lower() for w in _WORD.findall(text)]
    return len(words) < SHORT_FOLLOW_UP_WORDS or any(w in _BACK_REFERENCES for w in words)


def retrieval_query(messages: list[dict]) -> str:
    """The text to search the knowledge base with, for the reply to the last user turn.

    Rule: the latest user message; when it is short (fewer than SHORT_FOLLOW_UP_WORDS words) or refers
    back (it, that, they, this one, ...), the previous user message is put before it, so "how long does
    it take?" after "how do I factory reset the hub?" searches for both. Only user turns are used: the
    assistant's replies are the model's words, not the customer's need, and would pull retrieval toward
    whatever was retrieved before. Returns "" when there is no user text.
    """
    turns = _user_turns(messages)
    if not turns:
        return ""
    latest = turns[-1].strip()
    if len(turns) > 1 and _needs_context(latest):
        return f"{turns[-2].strip()}\n{latest}"
    return latest


def passages_block(passages: Sequence[PassageLike]) -> str:
    """The instruction and the passages, each as "[id] heading" then its text, ordered by id.

    Ordered by (document, chunk number), not by score: the same passages found again on a later turn,
    in any rank order, render to the same text, hence the same tokens (see grounded_messages)."""
    ordered = sorted(passages, key=_id_key)
    lines = [INSTRUCTION.format(example=ordered[0].id)]
    for p in ordered:
        lines.append(f"\n[{p.id}] {p.heading}".rstrip())
        lines.append(p.text.strip())
    return "\n".join(lines)


def _id_key(p: PassageLike) -> tuple[str, int, str]:
    doc, _, seq = p.id.rpartition("#")
    return (doc, int(seq), p.id) if seq.isdigit() else (p.id, 0, p.id)


def grounded_messages(messages: list[dict], passages: Sequence[PassageLike]) -> list[dict]:
    """A new message list whose system message carries the passages (the input is not modified).

    Placement, chosen for prefix-cache reuse: the engine reuses the longest cached token prefix of a
    conversation, and everything after the first token that differs is prefilled again. So the parts
    that change least come first: the existing system prompt (the persona: identical on every turn and
    in every session), then the passages block (the same while the customer stays on one topic, and
    rendered in id order so it does not depend on scores), then the conversation. Putting the passages
    before the persona would make every change of passages re-prefill the persona too.

    With no passages the messages are returned unchanged (copied): no instruction to answer from
    nothing.
    """
    out = [dict(m) for m in messages]
    if not passages:
        return out
    block = passages_block(passages)
    if out and out[0].get("role") == "system":
        persona = (out[0].get("content") or "").rstrip()
        out[0]["content"] = f"{persona}\n\n{block}" if persona else block
    else:
        out.insert(0, {"role": "system", "content": block})
    return out
