"""Knowledge lookup for a conversation: which passages answer its latest user turn, and the messages
that carry them into the prompt (kuaida.dialogue.grounding decides the query and the placement).

    retriever = Retriever()                       # bases under kb_root() (or `root`), opened on first use
    grounding = retriever.ground(messages, "homehub", k=3)
    grounding.messages  # -> render with the chat template;  grounding.passages -> the reply's sources

Bases stay open for the life of the Retriever (a search is one SQLite read plus one query embedding),
and are shared by the server's worker threads: KnowledgeBase serializes its own connection.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kuaida.dialogue.grounding import grounded_messages, retrieval_query


@dataclass
class Grounding:
    messages: list[dict]  # the conversation with the passages in its system message
    passages: list = field(default_factory=list)  # kuaida.knowledge.Passage, best first
    query: str = ""
    seconds: float = 0.0  # retrieval time: query embedding + keyword and vector search + fusion


class Retriever:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else None
        self._bases: dict[str, object] = {}
        self._lock = threading.Lock()

    def base(self, name: str):
        """The open base `name`; KnowledgeBaseNotFoundError (naming it) if there is none."""
        from kuaida.knowledge import open_kb  # numpy, SQLite, the embedder: only once a base is used

        with self._lock:
            if name not in self._bases:
                self._bases[name] = open_kb(name, self.root)
            return self._bases[name]

    def warm(self, name: str) -> None:
        """Open `name` and load the embedding model now, not inside the first request's TTFT."""
        self.base(name).search("warm-up", k=1)

    def ground(self, messages: list[dict], base: str, k: int) -> Grounding:
        kb = self.base(base)
        t0 = time.perf_counter()
        query = retrieval_query(messages)
        passages = kb.search(query, k=k) if query else []
        return Grounding(grounded_messages(messages, passages), passages, query, time.perf_counter() - t0)

    def close(self) -> None:
        with self._lock:
            for kb in self._bases.values():
                kb.close()
            self._bases.clear()
