"""Knowledge bases: a customer-service bot answers from its owner's documents.

    from kuaida.knowledge import create_kb, open_kb
    kb = create_kb("homehub")
    kb.add(["manual/", "faq.jsonl"], progress=True)
    passages = kb.search("how do I reset the hub", k=5)

ingest (parse.py: .txt .md .html .pdf .jsonl) -> chunk (chunk.py: WordPiece tokens, heading-aware)
-> embed (embed.py: all-MiniLM-L6-v2, offline) -> index (store.py: SQLite WAL, FTS5, vector blobs)
-> search (search.py: BM25 + exact cosine, reciprocal rank fusion). One SQLite file per base.
"""
from __future__ import annotations

import importlib

# Lazy, like `kuaida`: the CLI imports kuaida.knowledge.cli at start-up, and numpy, SQLite and rich's
# progress load only when a knowledge-base command runs.
_EXPORTS = {
    "KnowledgeBase": "base", "Passage": "base", "create_kb": "base", "open_kb": "base", "list_kbs": "base",
    "delete_kb": "base", "kb_root": "base", "kb_path": "base", "ChunkConfig": "chunk", "IngestReport": "ingest",
    "DocumentInfo": "store",
}
__all__ = ["ChunkConfig", "DocumentInfo", "IngestReport", "KnowledgeBase", "Passage", "create_kb",
           "delete_kb", "kb_path", "kb_root", "list_kbs", "open_kb"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kuaida.knowledge.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kuaida.knowledge' has no attribute {name!r}")
