"""Knowledge bases: create/open/list/delete, idempotent and transactional ingest, update and removal,
FTS escaping, hybrid ranking with the real MiniLM, and the `kuaida kb` CLI round trip."""
import hashlib
import json
import re
import sqlite3
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kuaida.cli import app
from kuaida.errors import InvalidArgumentError, KnowledgeBaseNotFoundError, KuaidaError
from kuaida.knowledge import ChunkConfig, create_kb, delete_kb, kb_root, list_kbs, open_kb
from kuaida.knowledge.embed import _workers, default_embedder, on_one_thread
from kuaida.knowledge.search import fts_query, rrf
from kuaida.knowledge.store import Store


class HashEmbedder:
    """A deterministic bag-of-words embedder (no model): tests of ingest logic run in milliseconds."""
    dim, name = 384, "hash"

    def __init__(self):
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "manual"
    (folder / "sub").mkdir(parents=True)
    (folder / "setup.md").write_text("# Setup\nPlug in the hub.\n\n## Wi-Fi\nJoin the network with the app.\n")
    (folder / "sub" / "reset.txt").write_text("Hold the reset pinhole for twelve seconds to factory reset.")
    (folder / ".hidden.md").write_text("# Secret\nnot to be indexed")
    (folder / "photo.png").write_bytes(b"\x89PNG")
    faq = tmp_path / "faq.jsonl"
    faq.write_text(json.dumps({"question": "What does the hub cost?", "answer": "It costs 129 euros."}) + "\n")
    return folder, faq


@pytest.fixture
def kb(tmp_path):
    with create_kb("test", root=tmp_path / "kb", embedder=HashEmbedder()) as base:
        yield base


def test_lifecycle_names_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("KUAIDA_KB_DIR", str(tmp_path / "env"))
    assert kb_root() == tmp_path / "env"
    create_kb("alpha", embedder=HashEmbedder()).close()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        create_kb("alpha", embedder=HashEmbedder())
    for bad in ("", "../x", "a b", ".hidden", "x" * 65):
        with pytest.raises(InvalidArgumentError, match="bad knowledge-base name"):
            create_kb(bad, embedder=HashEmbedder())
    with pytest.raises(KnowledgeBaseNotFoundError, match="'beta'"):
        open_kb("beta")
    assert list_kbs() == ["alpha"]
    with open_kb("alpha", embedder=HashEmbedder()) as kb:
        assert kb.documents() == [] and kb.search("anything") == []
    with pytest.raises(KuaidaError, match="built with embeddings hash"):
        open_kb("alpha")  # the default embedder (MiniLM) cannot search vectors of another model
    delete_kb("alpha")
    assert list_kbs() == [] and not list((tmp_path / "env").iterdir())


def test_add_folder_and_file_then_readd_is_noop(kb, docs):
    folder, faq = docs
    report = kb.add([folder, faq, folder.parent / "missing.md"])
    assert (report.added, report.updated, report.unchanged) == (3, 0, 0)
    assert report.chunks == 4  # setup.md: 2 sections; reset.txt: 1; faq: 1
    failed = dict(report.failed)
    assert "unsupported file type '.png'" in failed["manual/photo.png"]
    assert "no such file" in failed[str(folder.parent / "missing.md")]
    assert [d.name for d in kb.documents()] == ["faq.jsonl", "manual/setup.md", "manual/sub/reset.txt"]
    assert [d.chunks for d in kb.documents()] == [1, 2, 1]
    calls = kb.embedder.calls
    again = kb.add([folder, faq])
    assert (again.added, again.updated, again.unchanged, again.chunks) == (0, 0, 3, 0)
    assert kb.embedder.calls == calls  # nothing re-embedded


def test_changed_document_replaces_its_chunks_and_remove(kb, docs):
    folder, _ = docs
    kb.add([folder])
    assert kb.search("network", mode="keyword")[0].id == "manual/setup.md#2"
    (folder / "setup.md").write_text("# Setup\nPlug in the hub.\n\n## Ethernet\nUse the cable instead.\n")
    report = kb.add([folder])
    assert (report.added, report.updated, report.unchanged) == (0, 1, 1)
    assert kb.search("network", mode="keyword") == []  # the old Wi-Fi chunk is gone from FTS5 ...
    hits = kb.search("ethernet cable", mode="vector", k=10)
    assert "Wi-Fi" not in {p.heading.split(" > ")[-1] for p in hits}  # ... and from the vectors
    assert hits[0].id == "manual/setup.md#2" and hits[0].heading == "Setup > Ethernet"
    assert kb.remove("manual/setup.md") == 2
    assert [d.name for d in kb.documents()] == ["manual/sub/reset.txt"]
    assert all(p.doc != "manual/setup.md" for p in kb.search("cable plug hub", k=10))
    with pytest.raises(InvalidArgumentError, match="no document named 'manual/setup.md'"):
        kb.remove("manual/setup.md")


class FailingEmbedder(HashEmbedder):
    """Embeds `ok_calls` batches, then raises: a crash in the middle of a document."""

    def __init__(self, ok_calls):
        super().__init__()
        self.ok_calls = ok_calls

    def embed(self, texts):
        if self.calls >= self.ok_calls:
            raise RuntimeError("embedder crashed")
        return super().embed(texts)


def test_embedding_failure_mid_document_leaves_base_unchanged(tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(" ".join(f"fact{i} about the hub." for i in range(400)))
    with create_kb("t", root=tmp_path / "kb", config=ChunkConfig(16, 0), embedder=HashEmbedder()) as kb:
        kb.add([doc])
        before = (kb.documents(), kb.search("fact7", k=3))
        doc.write_text(" ".join(f"changed{i} text." for i in range(400)))  # ~125 chunks: 2 batches
        kb.embedder = FailingEmbedder(ok_calls=1)
        with pytest.raises(RuntimeError, match="embedder crashed"):
            kb.add([doc])
        assert kb.embedder.calls == 1  # it did fail mid-document, after a batch
        kb.embedder = HashEmbedder()
        assert (kb.documents(), kb.search("fact7", k=3)) == before
        assert kb.add([doc]).updated == 1 and kb.search("changed7", mode="keyword")[0].doc == "long.txt"


def test_write_failure_rolls_back_the_document(tmp_path):
    store = Store(tmp_path / "s.sqlite", create=True, meta={"dim": "2"})
    vectors = np.ones((2, 2), dtype=np.float32)
    store.put_document("a.md", "sha1", 10, [("H", "one"), ("H", "two")], vectors)
    with pytest.raises(sqlite3.Error):  # the second row cannot be bound: fails after the old rows' delete
        store.put_document("a.md", "sha2", 10, [("H", "three"), ("H", object())], vectors)
    assert [(d.sha256, d.chunks) for d in store.documents()] == [("sha1", 2)]
    assert len(store.keyword('"one"', 5)) == 1 and store.keyword('"three"', 5) == []
    store.close()


@pytest.mark.parametrize("text", ['"what\'s AND (x', "NEAR(a b)", "col:umn*", "^", "OR", '""', "ÉCRAN café"])
def test_fts_escaping_never_crashes(kb, docs, text):
    kb.add([docs[0]])
    for mode in ("hybrid", "keyword"):
        assert isinstance(kb.search(text, mode=mode), list)


def test_fts_query_quotes_words_and_drops_stopwords():
    assert fts_query("How do I reset THE hub?") == '"reset" OR "hub"'
    assert fts_query("what is it") == '"what" OR "is" OR "it"'  # nothing but stopwords: keep them
    assert fts_query("?!") is None


def test_rrf_prefers_agreement():
    fused = rrf([[1, 2, 3], [4, 2, 5]])
    assert fused[0][0] == 2 and fused[0][1] == pytest.approx(2 / 62)
    assert {i for i, _ in fused} == {1, 2, 3, 4, 5}


def test_search_arguments_are_checked(kb):
    with pytest.raises(InvalidArgumentError, match="search mode"):
        kb.search("x", mode="semantic")
    with pytest.raises(InvalidArgumentError, match="k must be"):
        kb.search("x", k=0)


HYBRID_DOCS = {
    # Shares the query's words, but is about something else: keyword search likes it best.
    "dropping.md": "# Dropping the hub\nDropping the hub keeps the warranty only if the internet order "
                   "receipt is kept. Dropping it twice keeps nothing.",
    # Means the same as the query without sharing a word: vector search likes it best.
    "wireless.md": "# Wireless link\nThe Wi-Fi signal disconnects now and then: the hub goes offline for "
                   "a few seconds several times a day.",
    # Both: the words and the meaning.
    "connection.md": "# Connection problems\nIf the internet connection keeps dropping, move the hub "
                     "closer to the router and restart it.",
    "billing.md": "# Billing\nInvoices are sent monthly by email. Change your card in the account page.",
    "colors.md": "# Colours\nThe hub comes in chalk white and slate grey.",
    "voice.md": "# Voice\nAsk your voice assistant to turn the lights on in the kitchen.",
}


def test_hybrid_puts_the_passage_both_rankings_like_on_top(tmp_path):
    for name, text in HYBRID_DOCS.items():
        (tmp_path / name).write_text(text)
    query = "my internet keeps dropping"
    with create_kb("h", root=tmp_path / "kb") as kb:  # the real MiniLM embedder
        assert kb.add([tmp_path / n for n in HYBRID_DOCS]).added == len(HYBRID_DOCS)
        keyword = [p.doc for p in kb.search(query, k=6, mode="keyword")]
        vector = [p.doc for p in kb.search(query, k=6, mode="vector")]
        hybrid = kb.search(query, k=3, mode="hybrid")
    assert keyword[0] == "dropping.md" and "wireless.md" not in keyword  # the rankings disagree
    assert vector.index("wireless.md") < vector.index("dropping.md")
    assert hybrid[0].doc == "connection.md" and hybrid[0].id == "connection.md#1"
    assert hybrid[0].heading == "Connection problems" and hybrid[0].score == pytest.approx(
        1 / (60 + keyword.index("connection.md") + 1) + 1 / (60 + vector.index("connection.md") + 1))


def test_real_embedder_vectors_are_unit_float32():
    vectors = default_embedder().embed(["how do I reset the hub", "the price of the hub"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    assert default_embedder() is default_embedder()  # one model per process


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_text_forward_matches_sentence_transformers(precision):
    from kuaida.knowledge.embed import Embedder, OneText

    embedder = Embedder(precision)
    embedder._ensure_loaded(1)
    st_model = embedder._replicas[0]
    one = OneText.of(st_model)
    assert one is not None and embedder._one_text[0] is not None
    texts = ["how do I reset the hub", "E19?", "the hub " * 400]  # the last is truncated to 256 tokens
    with torch.inference_mode():
        want = st_model.encode(texts, convert_to_tensor=True, normalize_embeddings=True).float()
    got = torch.nn.functional.normalize(torch.cat([one(t) for t in texts]).float(), dim=-1)
    tol = 1e-5 if precision == "fp32" else 5e-3
    assert (got - want).abs().max() < tol
    assert np.allclose(embedder.embed(texts[:1])[0], want[0].numpy(), atol=tol)  # one text takes OneText
    # Anything but a BERT with mean pooling goes through encode.
    pooling = st_model[1]
    mode, pooling.pooling_mode = pooling.pooling_mode, "cls"
    try:
        assert OneText.of(st_model) is None
    finally:
        pooling.pooling_mode = mode


def test_queries_embed_on_one_thread_without_changing_other_threads():
    threads = torch.get_num_threads()
    embedder = default_embedder()
    query = embedder.embed(["how do I reset the hub"])  # <= SMALL_BATCH texts: the one-thread worker
    assert on_one_thread(torch.get_num_threads) == 1
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == threads and later == [threads]  # this thread, and threads started later
    texts = ["how do I reset the hub"] + [f"filler text number {i}" for i in range(40)]
    batch = embedder.embed(texts)  # split across the workers, one replica each
    assert len(embedder._replicas) == len(_workers()) == torch.get_num_threads()
    assert np.allclose(batch[0], query[0], atol=2e-3)
    assert np.allclose(batch[-1], embedder.embed(texts[-1:])[0], atol=2e-3)  # order kept across shards


def test_cli_round_trip(tmp_path, docs):
    folder, faq = docs
    runner, root = CliRunner(), ["--dir", str(tmp_path / "cli")]
    result = runner.invoke(app, ["kb", "create", "shop", *root])
    assert result.exit_code == 0 and "created knowledge base 'shop'" in result.output
    result = runner.invoke(app, ["kb", "add", "shop", str(folder), str(faq), *root])
    assert result.exit_code == 1  # photo.png was skipped: reported, the rest added
    assert "photo.png" in result.output and "3 added, 0 updated, 0 unchanged" in result.output
    result = runner.invoke(app, ["kb", "list", *root])
    assert result.exit_code == 0 and result.output.split() == ["shop"]
    result = runner.invoke(app, ["kb", "list", "shop", *root])
    assert result.exit_code == 0 and "manual/setup.md" in result.output and "faq.jsonl" in result.output
    result = runner.invoke(app, ["kb", "search", "shop", "how much does it cost", "-k", "1", *root])
    assert result.exit_code == 0 and "[faq.jsonl#1]" in result.output and "129 euros" in result.output
    result = runner.invoke(app, ["kb", "remove", "shop", "faq.jsonl", *root])
    assert result.exit_code == 0 and "removed faq.jsonl (1 chunks)" in result.output
    for args, message in [(["search", "nope", "x"], "no knowledge base named 'nope'"),
                          (["remove", "shop", "faq.jsonl"], "no document named 'faq.jsonl'"),
                          (["search", "shop", "x", "--mode", "fuzzy"], "unknown search mode"),
                          (["create", "shop"], "already exists")]:
        result = runner.invoke(app, ["kb", *args, *root])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert runner.invoke(app, ["kb", "delete", "shop", *root], input="n\n").exit_code == 1  # declined
    result = runner.invoke(app, ["kb", "delete", "shop", "--yes", *root])
    assert result.exit_code == 0 and "deleted knowledge base 'shop'" in result.output
    assert "no knowledge bases yet" in runner.invoke(app, ["kb", "list", *root]).output


def test_duplicate_names_in_one_batch_and_bad_faq_lines_are_reported(kb, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder / "docs").mkdir(parents=True)
        (tmp_path / folder / "docs" / "same.md").write_text(f"# {folder}\ntext of {folder}")
    faq = tmp_path / "faq.jsonl"
    faq.write_text('{"question": "Q1?", "answer": "A1."}\nnot json\n{"question": "Q2?", "answer": "A2."}\n')
    report = kb.add([tmp_path / "a" / "docs", tmp_path / "b" / "docs", faq])
    assert report.added == 2 and report.chunks == 3
    assert any("already named 'docs/same.md'" in why for _, why in report.failed)
    assert ("faq.jsonl", "line 2: not JSON (Expecting value)") in report.failed


def test_the_sqlite_file_is_the_whole_base(kb, docs, tmp_path):
    kb.add(list(docs))
    expected = kb.search("reset pinhole", k=2)
    kb.close()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "moved.sqlite").write_bytes(kb.path.read_bytes())  # closed: the WAL is checkpointed into it
    with open_kb("moved", root=copy, embedder=HashEmbedder()) as moved:
        assert moved.search("reset pinhole", k=2) == expected
        assert moved._store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
