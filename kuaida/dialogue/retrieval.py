"""Knowledge lookup for a conversation: which passages answer its latest user turn, and the messages
that carry them into the prompt (kuaida.dialogue.grounding decides the query and the placement).

    retriever = Retriever()                       # bases under kb_root() (or `root`), opened on first use
    grounding = retriever.ground(messages, "homehub", k=3)
    grounding.messages  # -> render with the chat template;  grounding.passages -> the reply's sources

Each turn's passages stay in the prompt on later turns (see grounding), so a later turn must place the
same passages before the same earlier user messages. A session stores them with its user turns and
passes them in (`earlier`); a client of /v1/chat/completions resends only its messages, so the
Retriever remembers which passages it put before each user message, keyed by the conversation up to
that message and the base (an LRU of `memory` entries). A forgotten turn (the server restarted) is
rendered without its passages: the prompt then differs from the cached one from that turn on, which
costs a longer prefill once, not a wrong answer.

Bases stay open for the life of the Retriever (a search is one SQLite read plus one query embedding),
and are shared by the server's worker threads: KnowledgeBase serializes its own connection.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kuaida.dialogue.grounding import (
    grounded_messages,
    new_passages,
    passage_text,
    retrieval_query,
    shown_ids,
)
from kuaida.engine.threads import side_work


@dataclass
class Grounding:
    messages: list[dict]  # the conversation with every turn's passages before its user message
    passages: list = field(default_factory=list)  # kuaida.knowledge.Passage for the latest turn, best first
    texts: list[str] = field(default_factory=list)  # passage_text of those not shown before: new in this turn
    query: str = ""
    seconds: float = 0.0  # retrieval time: query embedding + keyword and vector search + fusion


def last_user(messages: Sequence[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)


def ground(kb, messages: list[dict], k: int, earlier: Mapping[int, Sequence[str]] | None = None) -> Grounding:
    """Search the open base `kb` (kuaida.knowledge.KnowledgeBase) for the latest user turn of `messages`;
    -> the messages with its new passages before it and `earlier` ({index of an earlier user message:
    its passage texts}) before theirs."""
    t0 = time.perf_counter()
    last = last_user(messages)
    earlier = {i: list(t) for i, t in (earlier or {}).items() if i != last and t}
    query = retrieval_query(messages)
    found = kb.search(query, k=k) if query else []
    texts = [passage_text(p) for p in new_passages(found, shown_ids(earlier))]
    grounded = grounded_messages(messages, {**earlier, last: texts} if last >= 0 else earlier)
    return Grounding(grounded, found, texts, query, time.perf_counter() - t0)


class Retriever:
    def __init__(self, root: str | Path | None = None, memory: int = 10_000) -> None:
        self.root = Path(root) if root else None
        self._bases: dict[str, object] = {}
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, list[str]] = OrderedDict()  # conversation prefix -> passage texts
        self._memory_size = memory

    def base(self, name: str):
        """The open base `name`; KnowledgeBaseNotFoundError (naming it) if there is none."""
        from kuaida.knowledge import open_kb  # numpy, SQLite, the embedder: only once a base is used

        with self._lock:
            if name not in self._bases:
                self._bases[name] = open_kb(name, self.root)
            return self._bases[name]

    def warm(self, name: str) -> None:
        """Open `name` and load the embedding model now, not inside the first request's TTFT."""
        with side_work():
            self.base(name).search("warm-up", k=1)

    def ground(self, messages: list[dict], base: str, k: int,
               earlier: Mapping[int, Sequence[str]] | None = None) -> Grounding:
        """Search `base` for the latest user turn; -> the messages with every turn's passages in place.

        `earlier`: index of an earlier user message -> the passage texts it had (a session's stored
        turns); None: the ones this Retriever remembers for the same conversation."""
        kb = self.base(base)
        t0 = time.perf_counter()
        last = last_user(messages)
        keys = self._keys(messages[:last + 1], base)  # one hash per prefix, up to the latest user message
        if earlier is None:
            earlier = self._recall(messages[:max(last, 0)], keys)
        with side_work():  # the query's embedding runs torch in this (worker) thread
            grounding = ground(kb, messages, k, earlier)
        if last >= 0:
            self._remember(keys[-1], grounding.texts)
        grounding.seconds = time.perf_counter() - t0
        return grounding

    # -- which passages each earlier turn had --------------------------------------------------------
    @staticmethod
    def _keys(messages: Sequence[dict], base: str) -> list[str]:
        """Key of each prefix messages[:i + 1]: one running hash, so a long conversation costs O(n)."""
        h, keys = hashlib.sha256(json.dumps(base).encode()), []
        for m in messages:
            h.update(json.dumps([m.get("role"), m.get("content")], ensure_ascii=False).encode() + b"\n")
            keys.append(h.copy().hexdigest())
        return keys

    def _remember(self, key: str, texts: list[str]) -> None:
        with self._lock:
            self._memory[key] = texts
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_size:
                self._memory.popitem(last=False)

    def _recall(self, prefix: Sequence[dict], keys: Sequence[str]) -> dict[int, list[str]]:
        """{index of a user message in `prefix`: its remembered passages}; keys[i]: prefix[:i + 1]'s key."""
        with self._lock:
            return {i: texts for i, m in enumerate(prefix)
                    if m.get("role") == "user" and (texts := self._memory.get(keys[i]))}

    def close(self) -> None:
        with self._lock:
            for kb in self._bases.values():
                kb.close()
            self._bases.clear()
