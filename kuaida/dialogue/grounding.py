"""Grounding glue between a conversation and a knowledge base: what to search for, and where the
passages found go in the prompt. Pure functions: no model, no I/O.

    query = retrieval_query(messages)                                    # -> kb.search(query, k=3)
    texts = [passage_text(p) for p in new_passages(found, shown)]
    prompt_messages = grounded_messages(messages, {len(messages) - 1: texts, **earlier_turns})

Placement, chosen so that a conversation's prompt only ever grows at its end (the engine reuses the KV
cache of the longest token prefix it shares with the previous turn's prompt; everything after the
first difference is prefilled again): each turn's passages go in a system message of their own, right
before that turn's user message, opened by the instruction to answer from them, and they stay there on
later turns, the way a tool result stays in a transcript. So turn n's prompt is turn n-1's prompt plus
the reply plus the new turn: only the new turn (its passages and its question) is ever prefilled. A
passage already shown earlier in the conversation is not repeated (it is still in the context); a turn
with no new passage gets no system message. (Measured on the default 135M model: passages in a system
message before the question are used far more often than passages inside the user message, and than a
system message after the question: 61 sample questions, replies with the fact 31.1 % / 45.9 % (passage
cache / full attention) before the question, 18.0 % / 26.2 % after it.)

Each passage is wrapped in PASSAGE_START / PASSAGE_END (Unicode private-use characters).
kuaida.dialogue.template tokenizes a wrapped passage on its own and reports its token span, so the
engine can take the passage's keys and values from a cache of independently encoded passages
(kuaida.engine.passages) instead of prefilling it. The markers never reach the model.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

# A follow-up this short, or one that points back ("does it...", "what about that one?"), rarely names
# its subject: the previous user turn supplies it.
SHORT_FOLLOW_UP_WORDS = 6
_BACK_REFERENCES = frozenset(
    ["it", "its", "it's", "this", "that", "these", "those", "they", "them", "their", "there", "one", "ones", "he", "she", "him", "her", "same", "also", "too", "else", "other", "another", "former", "latter"])
_WORD = re.compile(r"[\w']+")

PASSAGE_START, PASSAGE_END = "\ue002", "\ue003"
PASSAGE = re.compile(f"{PASSAGE_START}(.*?){PASSAGE_END}", re.DOTALL)

INSTRUCTION = ("Answer from the passages below and cite the id of each passage you use in brackets, like "
               "[manual.md#3]. If they do not contain the answer, say you do not know.")


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


def passage_text(p: PassageLike) -> str:
    """One passage as the model reads it: "[id] heading", its text, a blank line. Self-contained (it
    ends with its own separator), so it tokenizes the same wherever it is placed."""
    return f"{f'[{p.id}] {p.heading}'.rstrip()}\n{p.text.strip()}\n\n"


def passage_id(text: str) -> str:
    """The id a passage_text starts with ("" if none)."""
    return text[1:text.index("]")] if text.startswith("[") and "]" in text else ""


def _id_key(p: PassageLike) -> tuple[str, int, str]:
    doc, _, seq = p.id.rpartition("#")
    return (doc, int(seq), p.id) if seq.isdigit() else (p.id, 0, p.id)


def new_passages(passages: Sequence[PassageLike], shown: Iterable[str]) -> list[PassageLike]:
    """The passages not already shown (by id), in (document, chunk number) order: the order of a
    document, and independent of scores, so the same passages found again render the same way."""
    seen = set(shown)
    return sorted((p for p in passages if p.id not in seen), key=_id_key)


def shown_ids(turn_passages: Mapping[int, Sequence[str]]) -> set[str]:
    return {passage_id(t) for texts in turn_passages.values() for t in texts}


def strip_markers(text: str) -> str:
    return text.replace(PASSAGE_START, "").replace(PASSAGE_END, "")


def passages_message(texts: Sequence[str]) -> dict:
    """The system message that carries a turn's passages: the instruction, then the passages, each
    wrapped. The instruction is plain text, prefilled: a passage encoded on its own is encoded after it
    (measured: passages encoded without the instruction before them were used in 32.8 % of answers
    against 45.9 % under full attention)."""
    return {"role": "system",
            "content": f"{INSTRUCTION}\n\n" + "".join(f"{PASSAGE_START}{t}{PASSAGE_END}" for t in texts)}


def grounded_messages(messages: list[dict], turn_passages: Mapping[int, Sequence[str]]) -> list[dict]:
    """A new message list (the input is not modified) with, before each user message i in
    `turn_passages`, a system message holding its passages (passage_text strings): passages_message.

    Marker characters a client typed are removed first, so only grounding makes passage spans.
    """
    out = []
    for i, m in enumerate(messages):
        if turn_passages.get(i) and m.get("role") == "user":
            out.append(passages_message(turn_passages[i]))
        text = m.get("content")
        out.append({**m, "content": strip_markers(text)} if isinstance(text, str) else dict(m))
    return out
