"""`kuaida bench kb`: how well and how fast a knowledge base helps a chat model answer from documents.

On the shipped sample (kuaida/knowledge/samples/homehub: the manual and FAQ of a fictional smart-home hub,
and questions.jsonl: customer questions, each with the fact a correct answer contains and its file):
1. ingest: a fresh base in a temp dir, chunks/s (the embedder loaded before the clock starts);
2. retrieval: recall@1/3/5 per search mode — a question is found at rank r when the passage at r is
   from its source file ("doc"), or contains its fact ("fact"); search latency p50/p95;
3. scale: the sample plus perturbed copies of it (every number redrawn, product names replaced: the same
   vocabulary and structure, different text) up to --scale-chunks chunks, ingested for real -> ingest
   chunks/s and search latency p50/p95 at that size;
4. answers: per model, a greedy reply to each question without the base and with it (passages from
   `kb.search(retrieval_query(messages), k)` before the question), with the passages encoded on their own
   and reused (`serve --passage-cache-mb N`) and prefilled in place (the server's default) -> the share
   containing the fact;
5. TTFT: 3-turn conversations, the last turn answered plain vs grounded (retrieval + prefill + first
   token): with the previous turn's KV cache, its passages seen before or new, or under full attention;
   and cold.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kuaida.bench.load import OtherCpu
from kuaida.bench.report import MISSING, Column, cell, fixed, make_report, percent
from kuaida.engine.lookup import LookupConfig
from kuaida.errors import InvalidArgumentError, KuaidaError

log = logging.getLogger(__name__)

TITLE = "kuaida bench kb"
THREADS = 2
SAMPLE = "homehub"
QUESTIONS_FILE = "questions.jsonl"
RECALL_AT = (1, 3, 5)
MODES = ("hybrid", "keyword", "vector")
TARGETS = {"ingest_chunks_s": 50.0, "scale_p95_ms": 20.0, "answer_gain": 2.0, "ttft_ratio": 1.3,
           "recall_at_5": 0.9}
# The TTFT target compares grounded and plain turns "at the same history length": the scenario whose
# plain turn keeps the earlier turns' passages. The other scenarios' ratios are reported beside it (their
# plain turn has a shorter history, or the passages are new or not cached at all).
TTFT_TARGET_SCENARIO = "same history, passages seen before"

COLUMNS = [Column("search mode", "variant"),
           *(Column(f"doc@{n}", f"recall_doc.@{n}", percent) for n in RECALL_AT),
           *(Column(f"fact@{n}", f"recall_fact.@{n}", percent) for n in RECALL_AT),
           Column("search ms p50", "latency_ms.p50", fixed(1)), Column("search ms p95", "latency_ms.p95", fixed(1))]


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    fact: str  # a correct answer contains it (case-insensitive)
    source: str  # the sample file that holds it

    def answered_by(self, text: str) -> bool:
        return self.fact.lower() in text.lower()


@dataclass
class KbBenchConfig:
    models: tuple[str, ...] = ("default",)
    dtype: str = "int8"
    k: int = 3  # passages in a grounded prompt (recall is reported at 1, 3 and 5 whatever k is)
    questions: int | None = None  # the first N questions (None: all)
    scale_chunks: int = 10_000  # 0: no scale test
    max_new_tokens: int = 96
    ttft_conversations: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        from kuaida.compress.quantize import DTYPES

        self.models = tuple(self.models)
        if not self.models:
            raise InvalidArgumentError("name at least one --model (e.g. default)")
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.k < 1 or (self.questions is not None and self.questions < 3):
            raise InvalidArgumentError("use k >= 1 and at least 3 questions (a TTFT conversation has 3 turns)")
        if self.scale_chunks < 0 or self.max_new_tokens < 1 or self.ttft_conversations < 1:
            raise InvalidArgumentError("scale_chunks must be >= 0, max_new_tokens and ttft_conversations >= 1")


# -- the sample --------------------------------------------------------------------------------------
def sample_path(name: str = SAMPLE) -> Path:
    """The folder of a shipped sample knowledge base (its documents and questions.jsonl)."""
    path = Path(__file__).resolve().parents[1] / "knowledge" / "samples" / name
    if not path.is_dir():
        raise InvalidArgumentError(f"no sample knowledge base named {name!r} (kuaida ships {SAMPLE!r})")
    return path


def load_questions(path: Path, limit: int | None = None) -> list[Question]:
    """questions.jsonl -> Questions (the first `limit`); a bad line fails naming its number."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(Question(**{key: json.loads(line)[key] for key in ("id", "question", "fact", "source")}))
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidArgumentError(f"{path}:{n}: want {{id, question, fact, source}} ({e})") from e
    return out[:limit]


def sample_documents(folder: Path) -> list[Path]:
    """The files a base is built from: every file but the questions (which hold the facts)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != QUESTIONS_FILE)


def build_base(docs: Sequence[Path], root: Path, name: str = "bench", embedder=None, progress: bool = False):
    """A fresh base of `docs` (each named by its file name) under `root` -> (base, IngestReport).
    The embedder is loaded first, so chunks/s is ingest alone."""
    from kuaida.knowledge import create_kb

    kb = create_kb(name, root=root, embedder=embedder)
    kb.embedder.embed(["warm-up"])
    report = kb.add(list(docs), progress=progress)
    if report.failed:
        log.warning("not ingested: %s", report.failed)
    return kb, report


# -- retrieval ---------------------------------------------------------------------------------------
def first_hits(passages: Sequence, q: Question) -> tuple[int | None, int | None]:
    """1-based rank of the first passage from q's source file, and of the first containing its fact."""
    doc = next((r for r, p in enumerate(passages, 1) if p.doc == q.source), None)
    fact = next((r for r, p in enumerate(passages, 1) if q.answered_by(p.text)), None)
    return doc, fact


def recall(ranks: Sequence[int | None], at: Iterable[int] = RECALL_AT) -> dict[str, float]:
    """{"@n": share of ranks <= n}: a None rank (not found) counts as a miss."""
    return {f"@{n}": round(sum(r is not None and r <= n for r in ranks) / len(ranks), 4) for n in at}


def spread_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def timed_search(kb, query: str, k: int, mode: str = "hybrid") -> tuple[list, float]:
    t0 = time.perf_counter()
    passages = kb.search(query, k=k, mode=mode)
    return passages, time.perf_counter() - t0


def measure_retrieval(kb, questions: Sequence[Question], mode: str, show: bool = False) -> dict[str, Any]:
    """One search per question at depth max(RECALL_AT) -> recall by doc and by fact, latency, misses."""
    kb.search(questions[0].question, k=1, mode=mode)  # warm-up: loads the vector matrix, untimed
    depth = max(RECALL_AT)
    doc_ranks, fact_ranks, times = [], [], []
    for q in track(questions, f"retrieval ({mode})", show):
        passages, seconds = timed_search(kb, q.question, depth, mode)
        doc, fact = first_hits(passages, q)
        doc_ranks.append(doc)
        fact_ranks.append(fact)
        times.append(seconds)
    return {"variant": mode, "recall_doc": recall(doc_ranks), "recall_fact": recall(fact_ranks),
            "latency_ms": spread_ms(times),
            "fact_missed_at_5": [q.id for q, r in zip(questions, fact_ranks) if r is None]}


# -- scale: perturbed copies of the sample -----------------------------------------------------------
_NUMBER = re.compile(r"\d+")
_PRODUCT_WORDS = ("Tessaline", "LumOS", "Lumo", "LH2")
_SYLLABLES = ("ka", "ve", "ro", "li", "sta", "mor", "qui", "den", "pa", "zu", "tel", "nor")


def perturb(text: str, rng: np.random.Generator) -> str:
    """Every number redrawn (same digit count) and each product word replaced by a made-up one."""
    names = {w: "".join(rng.choice(_SYLLABLES, 3)).capitalize() for w in _PRODUCT_WORDS}
    text = re.sub("|".join(_PRODUCT_WORDS), lambda m: names[m.group()], text)
    return _NUMBER.sub(lambda m: str(rng.integers(10 ** (len(m.group()) - 1) if len(m.group()) > 1 else 0,
                                                  10 ** len(m.group()))), text)


def write_copy(docs: Sequence[Path], folder: Path, rng: np.random.Generator) -> None:
    """Perturbed copies of `docs` in `folder` (FAQ lines perturbed field by field: still valid JSON)."""
    folder.mkdir(parents=True)
    for doc in docs:
        text = doc.read_text()
        if doc.suffix == ".jsonl":
            text = "".join(json.dumps({k: perturb(v, rng) for k, v in json.loads(line).items()}) + "\n"
                           for line in text.splitlines() if line.strip())
        else:
            text = perturb(text, rng)
        (folder / doc.name).write_text(text)


def scale_test(kb, docs: Sequence[Path], sample_chunks: int, target: int, questions: Sequence[Question],
               workdir: Path, seed: int, show: bool) -> dict[str, Any]:
    """Grow `kb` (holding the sample) with perturbed copies to >= `target` chunks -> ingest chunks/s of
    the copies, and search latency per mode at that size. A copy chunks a little differently from the
    sample (other words, other token counts), so copies are added in rounds until the target is met."""
    rng = np.random.default_rng(seed)
    chunks, per_copy, copies, seconds, failed = sample_chunks, float(sample_chunks), 0, 0.0, 0
    while chunks < target:
        batch = workdir / f"scale-{copies + 1:03d}"  # one folder per round: document names stay unique
        n = math.ceil((target - chunks) / per_copy)
        for i in range(copies, copies + n):
            write_copy(docs, batch / f"copy-{i + 1:03d}", rng)
        report = kb.add([batch], progress=show)
        if not report.chunks:  # nothing ingested: another round would not get further
            raise KuaidaError(f"the scale test's copies could not be ingested: {report.failed[:3]}")
        chunks, copies, seconds = chunks + report.chunks, copies + n, seconds + report.seconds
        failed += len(report.failed)
        per_copy = max(1.0, report.chunks / n)
    latency = {}
    with OtherCpu() as cpu:
        for mode in MODES:
            kb.search(questions[0].question, k=1, mode=mode)  # warm-up, untimed
            latency[mode] = spread_ms([timed_search(kb, q.question, 5, mode)[1] for q in questions])
    added = chunks - sample_chunks
    return {"copies": copies, "chunks": chunks, "ingested_chunks": added, "ingest_s": round(seconds, 1),
            "ingest_chunks_s": round(added / seconds, 1) if seconds else 0.0, "failed": failed,
            "latency_ms": latency, "other_cpu_cores": cpu.cores}


# -- answers -----------------------------------------------------------------------------------------
PASSAGE_CACHE_MB = 512  # what `kuaida serve --passage-cache-mb 512` gives (the server's default is 0)


def grounded(kb, messages: list[dict], k: int) -> tuple[list[dict], list, float]:
    """messages -> (messages with the retrieved passages before the last user turn, passages, seconds)."""
    from kuaida.dialogue.retrieval import ground

    g = ground(kb, messages, k)
    return g.messages, g.passages, g.seconds


def answer_quality(bot, kb, questions: Sequence[Question], k: int, max_new_tokens: int,
                   show: bool = False) -> dict[str, Any]:
    """Greedy replies without the base, with it through the passage cache (passages encoded on their own
    and reused: block attention) and with it under full attention (passages prefilled in place, the
    server's default) -> the share of each that contains the fact, and every reply."""
    prompts = [[{"role": "user", "content": q.question}] for q in questions]
    found = [grounded(kb, plain, k) for plain in prompts]
    greedy = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    bot.use_passage_cache(0)
    without = [bot.chat(plain, **greedy) for plain in track(prompts, "answers without the base", show)]
    full, lookup = [], LookupTally()
    for g in track(found, "answers, full attention (prompt lookup off / on)", show):
        full.append(lookup.pair(bot, g[0], greedy))
    bot.use_passage_cache(PASSAGE_CACHE_MB)
    block = [bot.chat(g[0], **greedy) for g in track(found, "answers, passages cached", show)]
    replies = [{"id": q.id, "question": q.question, "fact": q.fact,
                "fact_in_passages": any(q.answered_by(p.text) for p in passages),
                "without": w, "with": b, "with_full": f,
                "hit_without": q.answered_by(w), "hit_with": q.answered_by(b),
                "hit_with_full": q.answered_by(f)}
               for q, (_, passages, _), w, f, b in zip(questions, found, without, full, block)]
    n = len(replies)
    share = {key: round(sum(r[f"hit_{key}"] for r in replies) / n, 4)
             for key in ("without", "with", "with_full")}
    return {**share, "gain": round(share["with"] / share["without"], 2) if share["without"] else None,
            "prompt_lookup": lookup.summary(), "replies": replies}


class LookupTally:
    """Each grounded question answered twice in a row, without and with prompt-lookup drafts
    (kuaida.engine.lookup): decode time and tokens of both, whether the replies are identical."""

    def __init__(self) -> None:
        self.off_s = self.on_s = 0.0
        self.off_tokens = self.on_tokens = self.identical = self.n = 0
        self.steps = self.drafted = self.accepted = 0

    def pair(self, bot, messages: list[dict], greedy: dict) -> str:
        # Both replies start from an empty KV cache: the second would otherwise reuse the first's prompt
        # and compute its last prompt token through decode's attention instead of prefill's (bf16), which
        # can flip a near-tie and tell a cache story, not a lookup one.
        bot.use_prompt_lookup(None)
        bot.engine.cached_ids = []
        off = bot.chat(messages, **greedy)
        self.off_s += bot.last_stats.decode_s
        self.off_tokens += max(0, bot.last_stats.completion_tokens - 1)  # decode_s starts at token 1
        bot.use_prompt_lookup()
        before = dataclasses.replace(bot.engine.lookup_stats)
        bot.engine.cached_ids = []
        on = bot.chat(messages, **greedy)
        bot.use_prompt_lookup(None)
        self.on_s += bot.last_stats.decode_s
        self.on_tokens += max(0, bot.last_stats.completion_tokens - 1)
        after = bot.engine.lookup_stats
        self.steps += after.steps - before.steps
        self.drafted += after.drafted - before.drafted
        self.accepted += after.accepted - before.accepted
        self.identical += on == off
        self.n += 1
        return off

    def summary(self) -> dict[str, Any]:
        off = self.off_tokens / self.off_s if self.off_s else None
        on = self.on_tokens / self.on_s if self.on_s else None
        return {"replies": self.n, "identical": self.identical,
                "decode_tok_s_off": None if off is None else round(off, 1),
                "decode_tok_s_on": None if on is None else round(on, 1),
                "speedup": round(on / off, 2) if on and off else None,
                "verify_steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "config": dataclasses.asdict(LookupConfig())}


# -- time to first token -----------------------------------------------------------------------------
def conversations(questions: Sequence[Question], n: int) -> list[list[Question]]:
    """Up to n 3-turn conversations from consecutive questions (each question used once)."""
    return [list(questions[i:i + 3]) for i in range(0, 3 * n, 3) if i + 3 <= len(questions)]


def history(turns: Sequence[Question]) -> list[dict]:
    """User turns with short canned replies between them, ending on the last user turn."""
    out: list[dict] = []
    for q in turns:
        out += [{"role": "user", "content": q.question},
                {"role": "assistant", "content": f"The answer is {q.fact}."}]
    return out[:-1]


def first_token(bot, messages: list[dict], warm: list[dict] | None, prepare=None) -> tuple[float, int, int]:
    """Wall time to the first token of `messages` -> (seconds, prompt tokens, cached tokens). The KV cache
    starts empty, or holding the prompt of `warm` (the previous turn, as in a live conversation);
    `prepare()` runs after that, untimed."""
    bot.engine.cached_ids = []
    if warm is not None:
        bot.chat(warm, max_new_tokens=1, temperature=0.0)
    if prepare is not None:
        prepare()
    t0 = time.perf_counter()
    bot.chat(messages, max_new_tokens=1, temperature=0.0)
    return time.perf_counter() - t0, bot.last_stats.prompt_tokens, bot.last_stats.cached_tokens


SCENARIOS = ("warm, passages seen before", "warm, new passages", "warm, full attention", "cold",
             TTFT_TARGET_SCENARIO)


def ttft_one(bot, kb, turns: Sequence[Question], k: int) -> tuple[dict[str, dict[str, float]], int]:
    """One conversation's third turn, plain and grounded, in each scenario -> ({scenario: {plain_s,
    grounded_s, retrieval_s, plain/grounded prompt and cached tokens}}, passages new at turn 3).

    Grounded turns are built as the server builds them: every turn's passages before its user message,
    staying there, passages shown before not repeated. Scenarios: warm = the KV cache holds turn 2's
    prompt; "passages seen before" = the passage cache holds turn 3's passages (encoded for an earlier
    request: another user's, or at start-up); "new passages" = it does not; "full attention" = no passage
    cache, passages prefilled in place; cold = nothing cached. "same history": the plain turn has the
    grounded one's history (turns 1 and 2 with their passages, the KV cache holding turn 2's grounded
    prompt) and is asked without retrieval, so the ratio is what retrieving and placing this turn's
    passages costs, not the longer history they left behind."""
    from kuaida.dialogue.grounding import grounded_messages
    from kuaida.dialogue.retrieval import ground

    msgs, before = history(turns), history(turns[:2])
    g1 = ground(kb, msgs[:1], k)
    g2 = ground(kb, before, k, {0: g1.texts})
    g3 = ground(kb, msgs, k, {0: g1.texts, 2: g2.texts})
    out = {}

    def row(name: str, warm_plain, warm_grounded, prepare=None, repeat: int = 1, plain=msgs) -> None:
        plain_s, plain_tokens, plain_cached = first_token(bot, plain, warm_plain)
        for _ in range(repeat):
            ground_s, ground_tokens, ground_cached = first_token(bot, g3.messages, warm_grounded, prepare)
        out[name] = {"plain_s": plain_s, "grounded_s": ground_s + g3.seconds, "retrieval_s": g3.seconds,
                     "plain_tokens": plain_tokens, "grounded_tokens": ground_tokens,
                     "plain_cached": plain_cached, "grounded_cached": ground_cached}

    bot.use_passage_cache(PASSAGE_CACHE_MB)
    row(SCENARIOS[0], before, g2.messages, repeat=2)  # the first run leaves turn 3's passages cached
    row(SCENARIOS[1], before, g2.messages, prepare=bot.engine.passages.clear)
    bot.use_passage_cache(0)
    row(SCENARIOS[2], before, g2.messages)
    bot.use_passage_cache(PASSAGE_CACHE_MB)
    row(SCENARIOS[3], None, None, prepare=bot.engine.passages.clear)
    row(SCENARIOS[4], g2.messages, g2.messages, repeat=2,
        plain=grounded_messages(msgs, {0: g1.texts, 2: g2.texts}))
    return out, len(g3.texts)


def ttft_comparison(bot, kb, questions: Sequence[Question], k: int, n: int, show: bool) -> dict[str, Any]:
    """Medians over n conversations, one row per scenario (after one untimed warm-up conversation)."""
    convs = conversations(questions, n)
    ttft_one(bot, kb, convs[0], k)  # warm-up: first-call allocations go untimed
    runs, new = zip(*(ttft_one(bot, kb, c, k) for c in track(convs, "time to first token", show)))
    rows = []
    for scenario in runs[0]:
        med = {key: float(np.median([r[scenario][key] for r in runs])) for key in runs[0][scenario]}
        rows.append({"scenario": scenario, "conversations": len(runs),
                     "plain_ms": round(med["plain_s"] * 1000, 1), "grounded_ms": round(med["grounded_s"] * 1000, 1),
                     "retrieval_ms": round(med["retrieval_s"] * 1000, 1),
                     "ratio": round(med["grounded_s"] / med["plain_s"], 2),
                     **{key: int(med[key]) for key in ("plain_tokens", "grounded_tokens", "plain_cached",
                                                        "grounded_cached")}})
    return {"rows": rows, "new_passages": float(np.median(new))}


def measure_model(model: str, kb, questions: Sequence[Question], config: KbBenchConfig,
                  show: bool) -> dict[str, Any]:
    from kuaida.bot import load

    bot = load(model, dtype=config.dtype)
    with OtherCpu() as cpu:
        answers = answer_quality(bot, kb, questions, config.k, config.max_new_tokens, show)
        ttft = ttft_comparison(bot, kb, questions, config.k, config.ttft_conversations, show)
    return {"model": model, "dtype": config.dtype, "answers": answers, "ttft": ttft["rows"],
            "ttft_new_passages": ttft["new_passages"], "other_cpu_cores": cpu.cores}


def track(items: Sequence, description: str, show: bool) -> Iterator:
    """Iterate `items` under a rich progress bar on stderr (one at a time: rich allows one live display)."""
    if not show:
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        yield from bar.track(items, description=description)


def check_targets(ingest: dict, scale: dict | None, models: list[dict],
                  retrieval: Sequence[dict] = ()) -> dict[str, dict[str, Any]]:
    """Each target: its value, the target, met (None when not measured)."""
    def target(value: Any, goal: str, met: bool) -> dict[str, Any]:
        return {"value": value, "target": goal, "met": None if value is None else met}

    rate = scale["ingest_chunks_s"] if scale else ingest["chunks_s"]
    p95 = scale["latency_ms"]["hybrid"]["p95"] if scale else None
    out = {"ingest chunks/s" + (" (scale)" if scale else " (sample)"):
           target(rate, f">= {TARGETS['ingest_chunks_s']:.0f}", rate >= TARGETS["ingest_chunks_s"]),
           "hybrid search p95 ms at scale": target(p95, f"<= {TARGETS['scale_p95_ms']:.0f}",
                                                   p95 is not None and p95 <= TARGETS["scale_p95_ms"])}
    for row in retrieval:
        if row["variant"] == "hybrid":
            fact, doc = row["recall_fact"]["@5"], row["recall_doc"]["@5"]
            out["recall@5 (hybrid), by fact / by source document"] = target(
                f"{fact:.3f} / {doc:.3f}", f">= {TARGETS['recall_at_5']}",
                min(fact, doc) >= TARGETS["recall_at_5"])
    for m in models:
        a = m["answers"]
        out[f"{m['model']}: replies with the fact, with / without the base"] = target(
            f"{a['with']:.1%} / {a['without']:.1%}", f">= {TARGETS['answer_gain']:.0f}x",
            a["with"] > 0 and a["with"] >= TARGETS["answer_gain"] * a["without"])
        out[f"{m['model']}: replies with the fact, passages cached / full attention"] = target(
            f"{a['with']:.1%} / {a['with_full']:.1%}", "reported", True)
        if lk := a.get("prompt_lookup"):
            out[f"{m['model']}: prompt lookup, grounded replies identical to plain greedy"] = target(
                f"{lk['identical']} / {lk['replies']}", "all", lk["identical"] == lk["replies"])
            out[f"{m['model']}: prompt lookup, decode tok/s on / off"] = target(
                lk["speedup"], "reported (> 1)", bool(lk["speedup"] and lk["speedup"] > 1))
        for row in m["ttft"]:
            if row["scenario"] == TTFT_TARGET_SCENARIO:
                goal, met = f"<= {TARGETS['ttft_ratio']}x", row["ratio"] <= TARGETS["ttft_ratio"]
            else:
                goal, met = "reported", True
            out[f"{m['model']}: TTFT grounded / plain ({row['scenario']})"] = target(row["ratio"], goal, met)
    return out


def run_kb(config: KbBenchConfig | None = None, folder: Path | None = None, embedder=None,
           progress: bool = False, command: str | None = None) -> dict[str, Any]:
    """The whole benchmark on a folder of documents with its questions.jsonl (default: the shipped
    sample); -> the report (see kuaida.bench.report). `embedder`: the base's (default MiniLM)."""
    import torch

    from kuaida.model.loader import resolve

    config = config or KbBenchConfig()
    for model in config.models:
        resolve(model)  # a bad model name fails now, not after the ingest
    torch.set_num_threads(THREADS)
    folder = Path(folder) if folder else sample_path()
    questions = load_questions(folder / QUESTIONS_FILE, config.questions)
    docs = sample_documents(folder)
    with tempfile.TemporaryDirectory(prefix="kuaida-bench-kb-") as tmp:
        kb, report = build_base(docs, Path(tmp), embedder=embedder, progress=progress)
        with kb:
            ingest = {"documents": report.added, "chunks": report.chunks, "seconds": round(report.seconds, 2),
                      "chunks_s": round(report.chunks_per_second, 1), "failed": report.failed}
            rows = [measure_retrieval(kb, questions, mode, progress) for mode in MODES]
            models = [measure_model(m, kb, questions, config, progress) for m in config.models]
            scale = (scale_test(kb, docs, report.chunks, config.scale_chunks, questions, Path(tmp),
                                config.seed, progress) if config.scale_chunks else None)
    settings = {**asdict(config), "models": list(config.models), "documents": folder.name,
                "questions_used": len(questions), "embedder": getattr(kb.embedder, "name", "?")}
    out = make_report("kb", ", ".join(config.models), settings, rows, THREADS, command)
    out.update(ingest=ingest, scale=scale, models=models, targets=check_targets(ingest, scale, models, rows))
    return out


# -- Markdown ----------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], columns: list[Column]) -> list[str]:
    return ["| " + " | ".join(c.header for c in columns) + " |",
            "| " + " | ".join("---" for _ in columns) + " |",
            *("| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows)]


TTFT_COLUMNS = [Column("scenario", "scenario"), Column("plain ms", "plain_ms", fixed(0)),
                Column("grounded ms (incl. retrieval)", "grounded_ms", fixed(0)),
                Column("retrieval ms", "retrieval_ms", fixed(1)), Column("ratio", "ratio", lambda v: f"{v:.2f}×"),
                Column("prompt tokens plain", "plain_tokens"), Column("cached", "plain_cached"),
                Column("prompt tokens grounded", "grounded_tokens"), Column("cached", "grounded_cached")]


def failures(replies: list[dict], limit: int = 5) -> list[str]:
    """Grounded replies that missed the fact, those whose passages held it first (the model's miss)."""
    missed = sorted((r for r in replies if not r["hit_with"]), key=lambda r: not r["fact_in_passages"])
    return [f"- {r['id']} ({'fact retrieved' if r['fact_in_passages'] else 'fact not retrieved'}) "
            f"“{r['question']}” — want “{r['fact']}”, got: “{' '.join(r['with'].split())[:200]}”"
            for r in missed[:limit]]


def kb_markdown(report: dict[str, Any]) -> str:
    from kuaida.bench.report import markdown

    ing, scale, s = report["ingest"], report["scale"], report["settings"]
    lines = [markdown(report, COLUMNS, TITLE).rstrip(), "",
             (f"Retrieval over {s['questions_used']} questions; doc@n: a passage from the question's source "
              "file in the top n; fact@n: a passage containing the answer's fact."), "",
             (f"Ingest of the sample: {ing['documents']} documents, {ing['chunks']} chunks in {ing['seconds']} s "
              f"({ing['chunks_s']} chunks/s)."), ""]
    if scale:
        lat = "; ".join(f"{m} p50 {v['p50']} ms, p95 {v['p95']} ms" for m, v in scale["latency_ms"].items())
        lines += ["## Scale", "",
                  (f"{scale['chunks']} chunks: the sample plus {scale['copies']} perturbed copies (every number "
                   f"redrawn, product names replaced), ingested at {scale['ingest_chunks_s']} chunks/s "
                   f"({scale['ingest_s']} s). Search (k=5): {lat}. Other processes' CPU meanwhile: "
                   f"{scale['other_cpu_cores']} cores."), ""]
    for m in report["models"]:
        lines += model_section(m, s)
    lines += ["## Targets", ""]
    for key, t in report["targets"].items():
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"- {key}: {MISSING if t['value'] is None else t['value']} (target {t['target']}): {verdict}")
    return "\n".join(lines) + "\n"


def lookup_lines(lk: dict[str, Any] | None) -> list[str]:
    if not lk:
        return []
    rate = f"{lk['accepted'] / lk['drafted']:.0%}" if lk["drafted"] else MISSING
    return [(f"Prompt lookup (drafts copied from the prompt, verified in one forward; full attention, "
             f"each question answered without then with it): decode {lk['decode_tok_s_off']} → "
             f"{lk['decode_tok_s_on']} tok/s ({lk['speedup']}×); {lk['identical']} of {lk['replies']} "
             f"replies identical; {lk['verify_steps']} verify steps, {lk['accepted']} of {lk['drafted']} "
             f"drafted tokens kept ({rate}); settings {lk['config']}."), ""]


def model_section(m: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    a = m["answers"]
    gain = MISSING if a["gain"] is None else f"{a['gain']}×"
    return [f"## {m['model']} ({m['dtype']})", "",
            (f"Replies containing the fact: without the base {a['without']:.1%}, with it {a['with']:.1%} "
             f"({gain}) with the passage cache (each passage encoded on its own and reused: block attention), "
             f"{a['with_full']:.1%} with the passages prefilled in place (full attention, the server's default); "
             "greedy, at most "
             f"{settings['max_new_tokens']} tokens, k={settings['k']} passages."), "",
            *lookup_lines(a.get("prompt_lookup")),
            *table(m["ttft"], TTFT_COLUMNS), "",
            (f"Time to first token of a 3-turn conversation's last turn (median over "
             f"{m['ttft'][0]['conversations']} conversations; each turn's passages stay before its user "
             f"message, those shown before are not repeated: median {m['ttft_new_passages']:g} new passages "
             "at turn 3). warm = the KV cache holds turn 2's prompt; passages seen before = the passage cache "
             "holds turn 3's passages (encoded for an earlier request); new passages = it does not; full "
             "attention = no passage cache, passages prefilled in place; cold = nothing cached; "
             "same history = the plain turn keeps turns 1-2's passages in its history (the same prompt as "
             "the grounded turn but for turn 3's passages, its KV cache warm) and is asked without retrieval: "
             "the cost of retrieving and placing this turn's passages alone. Other "
             f"processes' CPU meanwhile: {m['other_cpu_cores']} cores."), "",
            "Grounded replies that missed the fact (examples):", "", *failures(a["replies"]), ""]
