"""`kuaida bench latency`: time to first token, decode speed, peak memory and agreement with the fp32
reference — for transformers (the baseline), kuaida at each weight precision and llama.cpp — on the same
dialogue prompts, with 2 threads.

Each variant runs in its own process (`python -m kuaida.bench.latency --worker VARIANT ...`), so the
peak RSS it reports is its own and no variant warms caches for another. kuaida fp32 runs first: it
renders the prompts to token ids, and its greedy tokens are the reference the others are compared with.
Every variant decodes exactly `new_tokens` tokens (end of turn does not stop it), so tok/s compares like
with like.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kuaida.bench.peers import HFRunner, LlamaCppRunner, Run, llamacpp_missing
from kuaida.bench.prompts import dialogue_prompts
from kuaida.bench.report import Column, fixed, make_report, percent
from kuaida.errors import InvalidArgumentError

log = logging.getLogger(__name__)

VARIANTS = ("hf", "fp32", "bf16", "int8", "int4", "llamacpp")
KUAIDA_DTYPES = ("fp32", "bf16", "int8", "int4")
REFERENCE = "fp32"
THREADS = 2
# KV-cache tokens reserved for the prompt (chitchat prompts are far shorter); the context is this plus
# the new tokens, the same for every variant.
PROMPT_BUDGET = 1024
TITLE = "kuaida bench latency"

# Headers short enough for a terminal: medians unless marked p90 (README: what each column means).
COLUMNS = [
    Column("variant", "variant"),
    Column("TTFT ms", "ttft_ms.median", fixed(0)),
    Column("TTFT p90", "ttft_ms.p90", fixed(0)),
    Column("tok/s", "decode_tok_s.median", fixed(1)),
    Column("tok/s p90", "decode_tok_s.p90", fixed(1)),
    Column("× hf", "speedup_vs_hf", lambda v: f"{v:.2f}×"),
    Column("peak MB", "peak_rss_mb", fixed(0)),
    Column("RSS MB", "rss_mb", fixed(0)),
    Column("mapped MB", "rss_file_mb", fixed(0)),
    Column("teacher forced", "agreement.teacher_forced", percent),
    Column("greedy prefix", "agreement.greedy_prefix", percent),
    Column("identical", "agreement.identical"),
]


# -- agreement with the reference ----------------------------------------------------------------
def teacher_forced_agreement(predicted: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of positions, pooled over prompts, where the variant's argmax after the reference's
    tokens so far is the reference's next token."""
    pairs = [(p, r) for ps, rs in zip(predicted, reference, strict=True) for p, r in zip(ps, rs, strict=True)]
    return sum(p == r for p, r in pairs) / len(pairs) if pairs else 0.0


def matching_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many tokens match before the first difference."""
    n = 0
    while n < min(len(tokens), len(reference)) and tokens[n] == reference[n]:
        n += 1
    return n


def greedy_prefix_agreement(runs: list[list[int]], reference: list[list[int]]) -> dict[str, float | int]:
    """Free-running greedy outputs vs the reference: the mean matched fraction of the reference before
    the first difference, and how many outputs are identical."""
    fractions = [matching_prefix(t, r) / len(r) for t, r in zip(runs, reference, strict=True)]
    return {"greedy_prefix": float(np.mean(fractions)),
            "identical": sum(t == r for t, r in zip(runs, reference, strict=True))}


def spread(values: list[float], digits: int) -> dict[str, float]:
    return {"median": round(float(np.median(values)), digits),
            "p90": round(float(np.percentile(values, 90)), digits)}


# -- one variant, in its own process -------------------------------------------------------------
class KuaidaRunner:
    """kuaida's Engine at one weight precision (same interface as the runners in peers.py)."""

    def __init__(self, model: str, dtype: str, context: int) -> None:
        from kuaida.bot import load

        self.bot = load(model, dtype=dtype, max_context=context)
        self.bot.engine.eos_ids = set()  # decode exactly n tokens: end of turn does not stop the benchmark
        self.backend = f"kuaida {dtype} ({self.bot.loaded.backend})"

    def generate(self, prompt_ids: list[int], n: int) -> Run:
        from kuaida.engine.generate import GenerationStats
        from kuaida.engine.sampling import SamplingParams

        self.bot.engine.cached_ids = []  # cold: no prefix reuse from the previous prompt
        stats = GenerationStats()
        tokens = list(self.bot.engine.generate(prompt_ids, SamplingParams(max_new_tokens=n, temperature=0.0),
                                               stats))
        return Run(tokens, stats.ttft_s, stats.decode_tok_s)

    def next_tokens(self, prompt_ids: list[int], reference: list[int]) -> list[int]:
        import torch

        with torch.inference_mode():
            logits = self.bot.model(torch.tensor([prompt_ids + reference[:-1]]))  # [1, T, V], causal
        return logits[0, len(prompt_ids) - 1:].argmax(-1).tolist()


def gguf_for(model: str) -> Path | None:
    """The GGUF file behind a model name (None for a Hugging Face directory)."""
    from kuaida.model.loader import resolve

    kind, path = resolve(model)
    return Path(path) if kind == "gguf" else None


def make_runner(variant: str, model: str, reference: dict | None, context: int):
    if variant in KUAIDA_DTYPES:
        return KuaidaRunner(model, variant, context)
    if variant == "hf":
        return HFRunner(reference["hf_path"])
    return LlamaCppRunner(gguf_for(model), context, THREADS)


# /proc/self/status fields -> report keys. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a worker would
# report its parent's peak when that is higher. RssFile is memory-mapped files (weights) counted in RSS.
STATUS_FIELDS = {"VmHWM": "peak_rss_mb", "VmRSS": "rss_mb", "RssAnon": "rss_anon_mb",
                 "RssFile": "rss_file_mb"}


def memory_mb() -> dict[str, float]:
    """This process's peak and current resident memory, in MiB."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:  # not Linux: the peak from getrusage (bytes on macOS) is the best there is
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: int(fields[name].split()[0]) / 1024 for name, key in STATUS_FIELDS.items() if name in fields}


def run_variant(variant: str, model: str, messages: list, reference: dict | None, new_tokens: int,
                context: int) -> dict[str, Any]:
    """Time `variant` on every prompt after one warm-up, then score it against the reference
    (itself when `reference` is None: this is the reference run)."""
    import torch

    torch.set_num_threads(THREADS)
    runner = make_runner(variant, model, reference, context)
    prompt_ids = reference["prompt_ids"] if reference else [runner.bot.render(m) for m in messages]
    runner.generate(prompt_ids[0], new_tokens)  # warm-up: first-call allocations and lazy init go untimed
    runs = [runner.generate(ids, new_tokens) for ids in prompt_ids]
    # Before teacher forcing, whose full-sequence logits are not part of serving. The peak includes
    # loading (fp32 weights before quantization); the current RSS is what serving keeps.
    memory = memory_mb()
    ref_tokens = reference["tokens"] if reference else [r.tokens for r in runs]
    out = {"variant": variant, "backend": runner.backend, "memory_mb": memory,
           "tokens": [r.tokens for r in runs], "ttft_s": [r.ttft_s for r in runs],
           "decode_tok_s": [r.decode_tok_s for r in runs],
           "next_tokens": [runner.next_tokens(ids, ref) for ids, ref in zip(prompt_ids, ref_tokens)]}
    if reference is None:
        out.update(prompt_ids=prompt_ids, hf_path=str(runner.bot.loaded.path))
    return out


def worker_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run one variant of `kuaida bench latency` (its worker process).")
    p.add_argument("--worker", choices=VARIANTS, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=Path, required=True, help="JSON list of message lists")
    p.add_argument("--reference", type=Path, help="the fp32 worker's output (absent: this is the reference)")
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    reference = json.loads(args.reference.read_text()) if args.reference else None
    result = run_variant(args.worker, args.model, json.loads(args.prompts.read_text()), reference,
                         args.new_tokens, args.context)
    args.out.write_text(json.dumps(result))


# -- the benchmark: workers in turn, then one report -----------------------------------------------
def skip_reason(variant: str, model: str) -> str | None:
    if variant == "llamacpp":
        if gguf_for(model) is None:
            return "llama.cpp needs a .gguf model"
        return llamacpp_missing()
    return None


def run_worker(variant: str, model: str, workdir: Path, new_tokens: int, context: int) -> dict[str, Any]:
    """Run one variant's worker process -> its output, or a 'skipped' row if it failed (the reference
    must not fail: its tokens are what the others are scored against)."""
    out = workdir / f"{variant}.json"
    cmd = [sys.executable, "-m", "kuaida.bench.latency", "--worker", variant, "--model", model,
           "--prompts", str(workdir / "prompts.json"), "--new-tokens", str(new_tokens),
           "--context", str(context), "--out", str(out)]
    if variant != REFERENCE:
        cmd += ["--reference", str(workdir / f"{REFERENCE}.json")]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return json.loads(out.read_text())
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    if variant == REFERENCE:
        raise RuntimeError(f"the fp32 reference run failed:\n{proc.stderr}")
    log.warning("variant %s failed:\n%s", variant, proc.stderr)
    return {"variant": variant, "skipped": f"failed: {tail[0]}"}


def result_row(out: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """A worker's raw output -> the report's row for it (speedup_vs_hf is filled in later)."""
    if "skipped" in out:
        return out
    forced = teacher_forced_agreement(out["next_tokens"], reference["tokens"])
    free = greedy_prefix_agreement(out["tokens"], reference["tokens"])
    agreement = {"teacher_forced": round(forced, 4), "greedy_prefix": round(free["greedy_prefix"], 4),
                 "identical": free["identical"]}
    return {"variant": out["variant"], "backend": out["backend"],
            "ttft_ms": spread([t * 1000 for t in out["ttft_s"]], 1),
            "decode_tok_s": spread(out["decode_tok_s"], 2),
            **{key: round(mb) for key, mb in out["memory_mb"].items()},
            "agreement": agreement, "speedup_vs_hf": None}


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_hf: median decode tok/s over transformers' (when hf ran)."""
    hf = next((r for r in rows if r["variant"] == "hf" and "skipped" not in r), None)
    for r in rows:
        if hf is not None and "skipped" not in r:
            r["speedup_vs_hf"] = round(r["decode_tok_s"]["median"] / hf["decode_tok_s"]["median"], 2)


def parse_variants(text: str) -> list[str]:
    """'all' or a comma list ('fp32,int8') -> variants in the table's order."""
    asked = VARIANTS if text.strip() == "all" else [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in asked if v not in VARIANTS]
    if unknown or not asked:
        raise InvalidArgumentError(f"unknown variant(s) {', '.join(unknown) or text!r}; "
                                   f"choose from {', '.join(VARIANTS)} or 'all'")
    return [v for v in VARIANTS if v in asked]


def run_latency(model: str = "default", variants: Sequence[str] = VARIANTS, n_prompts: int = 8,
                new_tokens: int = 64, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark `variants` of `model`; -> the report (see kuaida.bench.report)."""
    from kuaida.model.loader import resolve

    if n_prompts < 1 or new_tokens < 2:
        raise InvalidArgumentError("use at least 1 prompt and 2 new tokens (decode speed needs two)")
    resolve(model)  # a bad model name fails here, in one line, not inside a worker
    context = PROMPT_BUDGET + new_tokens
    outputs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kuaida-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "prompts.json").write_text(json.dumps(dialogue_prompts(n_prompts, seed)))
        order = [REFERENCE] + [v for v in variants if v != REFERENCE]
        for i, variant in enumerate(order):
            reason = skip_reason(variant, model)
            if reason:
                outputs[variant] = {"variant": variant, "skipped": reason}
                continue
            if progress:
                progress(f"{variant} ({i + 1}/{len(order)})")
            outputs[variant] = run_worker(variant, model, workdir, new_tokens, context)
    reference = outputs[REFERENCE]
    rows = [result_row(outputs[v], reference) for v in variants]
    add_speedups(rows)
    lengths = [len(ids) for ids in reference["prompt_ids"]]
    settings = {"prompts": n_prompts, "seed": seed, "new_tokens": new_tokens, "warmup_prompts": 1,
                "prompt_tokens": {"min": min(lengths), "median": int(np.median(lengths)),
                                  "max": max(lengths)},
                "reference": REFERENCE, "context": context, "stop_at_end_of_turn": False}
    return make_report("latency", model, settings, rows, THREADS)


if __name__ == "__main__":
    worker_main()
