"""`kuaida bench kb`: the shipped sample's data, recall arithmetic, perturbed copies, and the whole
benchmark on a tiny fixture base (bag-of-words embedder, tiny random model)."""
from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kuaida.bench.kb import (
    QUESTIONS_FILE,
    KbBenchConfig,
    Question,
    build_base,
    first_hits,
    kb_markdown,
    load_questions,
    perturb,
    recall,
    run_kb,
    sample_documents,
    sample_path,
    scale_test,
    write_copy,
)
from kuaida.errors import InvalidArgumentError


def words(path: Path) -> int:
    text = path.read_text()
    if path.suffix == ".html":
        text = re.sub(r"<[^>]+>", " ", text)
    return len(text.split())


# -- the shipped sample ------------------------------------------------------------------------------
def test_sample_questions_are_answerable_from_their_source():
    folder = sample_path()
    questions = load_questions(folder / QUESTIONS_FILE)
    assert len(questions) >= 40
    assert len({q.id for q in questions}) == len(questions)
    for q in questions:
        source = folder / q.source
        assert source.is_file() and q.source != QUESTIONS_FILE, q
        assert q.fact.lower() in source.read_text().lower(), q  # the fact is really in its source
        assert q.fact.lower() not in q.question.lower(), q  # ... and not given away by the question


def test_sample_is_big_varied_and_every_file_is_asked_about():
    folder = sample_path()
    docs = sample_documents(folder)
    assert sum(words(d) for d in docs) >= 10_000
    assert {".md", ".html", ".txt", ".jsonl"} <= {d.suffix for d in docs}
    faq = [json.loads(line) for line in (folder / "faq.jsonl").read_text().splitlines() if line.strip()]
    assert len(faq) >= 25 and all(set(pair) == {"question", "answer"} for pair in faq)
    asked = Counter(q.source for q in load_questions(folder / QUESTIONS_FILE))
    assert {d.name for d in docs} == set(asked)


def test_unknown_sample_and_bad_question_lines_fail_clearly(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no sample"):
        sample_path("nope")
    (tmp_path / "q.jsonl").write_text('{"id": "a", "question": "x"}\n')
    with pytest.raises(InvalidArgumentError, match="q.jsonl:1"):
        load_questions(tmp_path / "q.jsonl")


# -- recall arithmetic -------------------------------------------------------------------------------
def test_first_hits_rank_the_source_document_and_the_fact_separately():
    q = Question("q1", "How long?", "42 Days", "router.md")
    passages = [SimpleNamespace(doc="garden.txt", text="water every 3 days"),
                SimpleNamespace(doc="router.md", text="The router has a teal light."),
                SimpleNamespace(doc="faq.jsonl", text="It restarts every 42 days.")]
    assert first_hits(passages, q) == (2, 3)  # fact match is case-insensitive
    assert first_hits(passages[:1], q) == (None, None)


def test_recall_counts_ranks_within_each_cutoff():
    assert recall([1, 3, None, 5]) == {"@1": 0.25, "@3": 0.5, "@5": 0.75}


def test_config_validates():
    with pytest.raises(InvalidArgumentError):
        KbBenchConfig(k=0)
    with pytest.raises(InvalidArgumentError):
        KbBenchConfig(models=())
    with pytest.raises(InvalidArgumentError):
        KbBenchConfig(dtype="fp64")


# -- perturbed copies (the scale test's synthetic documents) ----------------------------------------
def test_perturb_redraws_numbers_and_renames_the_product():
    text = "The Lumo Hub H2 restarts in 12 seconds; LumOS 4.2.1 by Tessaline."
    out = perturb(text, np.random.default_rng(0))
    assert "Lumo" not in out and "Tessaline" not in out
    assert [len(n) for n in re.findall(r"\d+", out)] == [len(n) for n in re.findall(r"\d+", text)]
    assert out != perturb(text, np.random.default_rng(1))


def test_copies_keep_faq_lines_valid(tmp_path):
    faq = tmp_path / "faq.jsonl"
    faq.write_text(json.dumps({"question": "Lumo price?", "answer": "It costs $149 \u00b0 and 2 years."}) + "\n")
    write_copy([faq], tmp_path / "copy", np.random.default_rng(0))
    pair = json.loads((tmp_path / "copy" / "faq.jsonl").read_text())
    assert set(pair) == {"question", "answer"} and "$149" not in pair["answer"]


# -- the whole benchmark on a tiny fixture -----------------------------------------------------------
class BagOfWords:
    """A deterministic stand-in for MiniLM: hashed word counts, unit length (no model to load)."""
    name, dim = "bag-of-words", 384

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


@pytest.fixture(scope="module")
def fixture_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    (folder / "router.md").write_text("# Router\n\nThe Zephyr router restarts itself every 42 days. "
                                      "Its status light glows teal.\n")
    (folder / "garden.txt").write_text("Greenhouse tomatoes need watering every 3 days. "
                                       "The compost bin holds 120 litres.\n")
    (folder / "faq.jsonl").write_text(json.dumps({"question": "How long is the kettle warranty?",
                                                  "answer": "The kettle warranty lasts 7 years."}) + "\n")
    questions = [("q1", "When does the Zephyr router restart itself?", "42 days", "router.md"),
                 ("q2", "How often should greenhouse tomatoes get water?", "3 days", "garden.txt"),
                 ("q3", "How long is the kettle warranty?", "7 years", "faq.jsonl"),
                 ("q4", "What colour is the compost bin?", "purple", "garden.txt")]  # fact in no document
    (folder / QUESTIONS_FILE).write_text("".join(
        json.dumps(dict(zip(("id", "question", "fact", "source"), q))) + "\n" for q in questions))
    return folder


@pytest.fixture(scope="module")
def tiny_report(fixture_base, make_hf_dir) -> dict:
    # Grounded prompts are longer than the tiny fixture's usual 256 positions.
    model = make_hf_dir("llama", tie_word_embeddings=True, max_position_embeddings=1024)
    config = KbBenchConfig(models=(str(model),), dtype="fp32", k=2, scale_chunks=20, max_new_tokens=4,
                           ttft_conversations=1)
    return run_kb(config, folder=fixture_base, embedder=BagOfWords(), command="kuaida bench kb (test)")


def test_report_has_every_part(tiny_report):
    r = tiny_report
    assert r["benchmark"] == "kb" and r["command"] == "kuaida bench kb (test)"
    assert [row["variant"] for row in r["results"]] == ["hybrid", "keyword", "vector"]
    assert r["ingest"]["documents"] == 3 and r["ingest"]["chunks"] >= 3 and not r["ingest"]["failed"]
    assert r["scale"]["chunks"] >= 20 and r["scale"]["failed"] == 0
    assert set(r["scale"]["latency_ms"]) == {"hybrid", "keyword", "vector"}
    assert r["settings"]["embedder"] == "bag-of-words" and r["settings"]["questions_used"] == 4
    [model] = r["models"]
    assert len(model["answers"]["replies"]) == 4 and 0 <= model["answers"]["with"] <= 1
    assert all(r["fact_in_passages"] == (r["id"] != "q4") for r in model["answers"]["replies"])
    assert any("TTFT" in key for key in r["targets"]) and all("met" in t for t in r["targets"].values())


def test_keyword_recall_on_known_answers(tiny_report):
    keyword = next(row for row in tiny_report["results"] if row["variant"] == "keyword")
    assert keyword["recall_doc"]["@1"] == 1.0  # each question's words occur in its source alone
    assert keyword["recall_fact"] == {"@1": 0.75, "@3": 0.75, "@5": 0.75}  # q4's fact is in no document
    assert keyword["fact_missed_at_5"] == ["q4"]


def test_ttft_scenarios_reuse_the_previous_turn_and_their_passages(tiny_report):
    model = tiny_report["models"][0]
    rows = {row["scenario"]: row for row in model["ttft"]}
    assert set(rows) == {"warm, passages seen before", "warm, new passages", "warm, full attention", "cold",
                         "same history, passages seen before"}
    assert all(row["grounded_tokens"] > row["plain_tokens"]
               for name, row in rows.items() if not name.startswith("same history"))
    # Same history: the plain prompt holds turns 1-2's passages too, and the grounded prompt extends turn 2's
    # grounded prompt just as the plain one does (both warm from it).
    same = rows["same history, passages seen before"]
    assert same["plain_tokens"] > rows["warm, passages seen before"]["plain_tokens"]
    assert same["grounded_tokens"] >= same["plain_tokens"]  # turn 3's passages, when it has new ones
    assert same["plain_cached"] == same["grounded_cached"] > 0
    assert rows["cold"]["plain_cached"] == rows["cold"]["grounded_cached"] == 0
    for name in ("warm, passages seen before", "warm, new passages", "warm, full attention"):
        # Turn 2's grounded prompt (its passages in place) is a prefix of turn 3's: all of it is reused.
        assert rows[name]["grounded_cached"] > rows[name]["plain_cached"] > 0, name
    answers = model["answers"]
    assert {"with", "with_full", "without"} <= set(answers) and all("with_full" in r for r in answers["replies"])


def test_markdown_has_tables_targets_and_failures(tiny_report):
    md = kb_markdown(tiny_report)
    assert md.startswith("# kuaida bench kb") and "kuaida bench kb (test)" in md
    assert "| hybrid |" in md and "## Scale" in md and "## Targets" in md
    assert "| warm, passages seen before |" in md and "full attention" in md


@pytest.mark.integration  # ~30 s on a quiet machine: MiniLM ingest of ~1,000 chunks, 10 default-model replies
def test_bench_kb_on_the_sample_with_the_default_model(tmp_path):
    from typer.testing import CliRunner

    from kuaida.cli import app

    args = ["bench", "kb", "--questions", "5", "--scale-chunks", "1000", "--conversations", "1",
            "--json", str(tmp_path / "kb.json"), "--md", str(tmp_path / "kb.md")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "kb.json").read_text())
    hybrid = report["results"][0]
    assert hybrid["variant"] == "hybrid" and hybrid["recall_doc"]["@5"] >= 0.6
    assert report["scale"]["chunks"] >= 1000
    answers = report["models"][0]["answers"]
    assert len(answers["replies"]) == 5 and answers["with"] >= answers["without"]
    assert "## Targets" in (tmp_path / "kb.md").read_text()


def test_scale_test_reaches_its_target_even_when_copies_chunk_smaller(fixture_base, tmp_path):
    docs = sample_documents(fixture_base)
    kb, report = build_base(docs, tmp_path, embedder=BagOfWords())
    with kb:
        # Claim the sample has 3x its real chunks: the first round's estimate falls short, more rounds follow.
        scale = scale_test(kb, docs, report.chunks * 3, 40, load_questions(fixture_base / QUESTIONS_FILE),
                           tmp_path, seed=0, show=False)
        real = sum(d.chunks for d in kb.documents())
    assert scale["copies"] > 40 // (report.chunks * 3)  # more than the first round's estimate
    assert real - report.chunks == scale["ingested_chunks"] and real + 2 * report.chunks >= 40


def test_targets_follow_the_issue():
    """recall@5 >= 0.9 by fact and by document; the TTFT target is the same-history row, the others are
    reported; ingest and search at scale."""
    from kuaida.bench.kb import SCENARIOS, TTFT_TARGET_SCENARIO, check_targets

    ttft = [{"scenario": s, "ratio": 1.2 if s == TTFT_TARGET_SCENARIO else 5.0} for s in SCENARIOS]
    model = {"model": "m", "answers": {"with": 0.4, "without": 0.1, "with_full": 0.5}, "ttft": ttft}
    scale = {"ingest_chunks_s": 60.0, "latency_ms": {"hybrid": {"p95": 12.0}}}
    hybrid = {"variant": "hybrid", "recall_fact": {"@5": 0.95}, "recall_doc": {"@5": 0.91}}
    t = check_targets({"chunks_s": 40.0}, scale, [model], [hybrid])
    assert t[f"m: TTFT grounded / plain ({TTFT_TARGET_SCENARIO})"] == {"value": 1.2, "target": "<= 1.3x",
                                                                        "met": True}
    assert t["m: TTFT grounded / plain (cold)"]["target"] == "reported"
    assert t["recall@5 (hybrid), by fact / by source document"]["met"] is True
    assert t["ingest chunks/s (scale)"]["met"] and t["hybrid search p95 ms at scale"]["met"]
    ttft[-1]["ratio"], hybrid["recall_doc"]["@5"] = 1.4, 0.85
    t = check_targets({"chunks_s": 40.0}, scale, [model], [hybrid])
    assert t[f"m: TTFT grounded / plain ({TTFT_TARGET_SCENARIO})"]["met"] is False
    assert t["recall@5 (hybrid), by fact / by source document"]["met"] is False
