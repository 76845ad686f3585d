"""`kuaida optimize RECIPE.yaml`: teacher -> prune -> distill -> quantize -> evaluate -> report.

    cfg = OptimizeConfig.from_yaml("recipes/default.yaml")
    report = optimize(cfg, "runs/smollm2-fast")

Writes into the output directory:
  model/           the distilled student, a Hugging Face directory (transformers and vLLM load it;
                   `kuaida export --gguf` turns it into a GGUF for llama.cpp)
  model-<dtype>/   the same, quantized for kuaida's kernels (what `kuaida serve` should load)
  report.json, report.md, report.png   every step's speed and quality, side by side

Speed and quality are measured in one process, on the same held-out data, with each variant's decode
speed taken in interleaved rounds (every round times every variant), so a machine busy with something
else slows all of them alike; the report gives medians. Every variant is timed at the recipe's weight
precision (`quantize.dtype`), so "x teacher" compares like with like.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from kuaida.bench.quality import compare, heldout_prompts, perplexity
from kuaida.compress.prune import PruneConfig, count_params, prune
from kuaida.compress.quantize import DTYPES, quantize
from kuaida.errors import InvalidArgumentError
from kuaida.model.fused import fuse
from kuaida.model.loader import load_model
from kuaida.model.memory import buffers_on_huge_pages
from kuaida.model.save import check_target, save_model
from kuaida.train.data import heldout_examples
from kuaida.train.distill import DistillConfig, distill

log = logging.getLogger(__name__)


@dataclass
class QuantizeStep:
    dtype: str = "int8"  # the result's weight precision; every variant's speed is measured at it
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(f"quantize.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class MeasureConfig:
    eval_samples: int = 200  # held-out conversations for perplexity (fixed split: distill.data's seed)
    speed_prompts: int = 4  # held-out prompts whose greedy decode is timed
    new_tokens: int = 64  # tokens decoded per timed prompt
    rounds: int = 3  # interleaved timing rounds (median reported)
    llamacpp: bool = True  # also time llama.cpp on the teacher's GGUF when it is installed
    # Also fine-tune a copy of the pruned student with cross-entropy only, same data and same time budget
    # as the distillation: does the teacher's knowledge beat plain fine-tuning? (doubles training time)
    baseline_finetune: bool = False
    # The baseline's peak learning rate (None: the distillation's). Each loss at its own best rate is the fair
    # comparison: on the default recipe, of 3e-4 / 6e-4 / 1e-3, CE does best at 6e-4 and distillation at 1e-3
    # (benchmarks/results/kd-vs-ce-lr.md).
    baseline_lr: float | None = None

    def __post_init__(self) -> None:
        for name in ("eval_samples", "speed_prompts", "new_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"measure.{name} must be >= 1, got {getattr(self, name)}")
        check_lr("measure.baseline_lr", self.baseline_lr)


def check_lr(name: str, lr: Any) -> None:
    """An optional learning rate: None or a positive number (YAML reads 3e-4 as a string: write 0.0003)."""
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0):
        raise InvalidArgumentError(f"{name} must be a number > 0 (e.g. 0.0003), got {lr!r}")


@dataclass
class OptimizeConfig:
    teacher: str = "default"  # "default", a Hugging Face directory or a GGUF file
    # Teacher correction (Minitron): fine-tune a copy of the teacher on the distillation data for this many
    # seconds (cross-entropy) before distilling from it, so the student learns from a teacher that knows
    # the data's domain. 0: distill from the teacher as it is. Timed apart from the student's budget.
    teacher_correction_s: float = 0.0
    # The correction's peak learning rate (None: the distillation's). A pretrained teacher wants a gentler
    # rate than a freshly pruned student, which recovers faster at a higher one.
    teacher_correction_lr: float | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeStep = field(default_factory=QuantizeStep)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def __post_init__(self) -> None:
        check_lr("teacher_correction_lr", self.teacher_correction_lr)

    def correction_lr(self) -> float:
        """The teacher correction's peak learning rate (the pipeline's and benchmarks/scripts' rule)."""
        return self.teacher_correction_lr or self.distill.train.lr

    def baseline_lr(self) -> float:
        """The CE-only baseline's peak learning rate."""
        return self.measure.baseline_lr or self.distill.train.lr

    @classmethod
    def from_yaml(cls, path: str | Path) -> OptimizeConfig:
        """A recipe file, or "default": the shipped kuaida/recipes/default.yaml."""
        if str(path) == "default":
            path = Path(__file__).with_name("recipes") / "default.yaml"
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgumentError(f"cannot read the recipe {path}: {e}") from e
        return from_dict(cls, raw, "recipe")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls, raw: Any, where: str):
    """Build dataclass `cls` from a YAML mapping, recursing into dataclass-typed fields; unknown keys are
    an error that names them (a typo must not silently fall back to a default)."""
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InvalidArgumentError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        values[key] = from_dict(hint, value, f"{where}.{key}") if dataclasses.is_dataclass(hint) else value
    try:
        return cls(**values)
    except TypeError as e:
        raise InvalidArgumentError(f"{where}: {e}") from e


# -- measuring ---------------------------------------------------------------------------------------
@torch.inference_mode()
def time_decode(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode tokens/s of greedy generation over `prompts` (the first token, i.e. prefill, excluded)."""
    from kuaida.engine.generate import Engine
    from kuaida.engine.sampling import SamplingParams
    from kuaida.engine.sequence import GenerationStats

    engine = Engine(model, eos_ids=set(), max_context=max(len(p) for p in prompts) + new_tokens + 1)
    rates = []
    for prompt in prompts:
        engine.cached_ids = []  # cold: no reuse between prompts
        stats = GenerationStats()
        for _ in engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.0), stats):
            pass
        rates.append(stats.decode_tok_s)
    return statistics.median(rates)


def time_llamacpp(gguf: Path, prompts: list[list[int]], new_tokens: int) -> float:
    from kuaida.bench.peers import LlamaCppRunner

    runner = LlamaCppRunner(gguf, context=max(len(p) for p in prompts) + new_tokens + 8,
                            threads=torch.get_num_threads())
    return statistics.median(runner.generate(p, new_tokens).decode_tok_s for p in prompts)


def interleaved_speeds(variants: dict[str, Any], prompts: list[list[int]], cfg: MeasureConfig) -> dict[str, dict]:
    """{name: model or GGUF path} -> {name: {"tok_s": median, "rounds": [...]}}, timed round-robin."""
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(cfg.rounds):
        for name, target in variants.items():
            rate = (time_llamacpp(target, prompts, cfg.new_tokens) if isinstance(target, Path)
                    else time_decode(target, prompts, cfg.new_tokens))
            rounds[name].append(round(rate, 2))
            log.info("speed round %d/%d: %s %.1f tok/s", r + 1, cfg.rounds, name, rate)
    return {name: {"tok_s": statistics.median(v), "rounds": v} for name, v in rounds.items()}


def finetune_baseline(pruned: torch.nn.Module, tokenizer, dcfg: DistillConfig, progress: bool) -> torch.nn.Module:
    """A copy of `pruned` (the student; or the teacher, for teacher correction) trained on the data's labels
    alone, with distillation's data, budget and optimizer settings (checkpoints apart)."""
    from kuaida.train.finetune import FinetuneConfig, finetune

    train = dataclasses.replace(dcfg.train, checkpoint_dir=None)
    tuned, _ = finetune(copy.deepcopy(pruned), tokenizer,
                        FinetuneConfig(method="full", data=dcfg.data, train=train, eval_samples=1),
                        progress=progress)
    return tuned.eval()


def quantized_copy(model: torch.nn.Module, step: QuantizeStep) -> torch.nn.Module:
    """The copy the engine runs (and the report times): quantized, glue fused (kuaida.model.fused), its
    quantized weights on huge pages (kuaida.model.memory)."""
    return buffers_on_huge_pages(fuse(quantize(copy.deepcopy(model), step.dtype, step.group_size)))


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    a = model.args
    return {"n_layers": a.n_layers, "intermediate_size": a.intermediate_size, "n_heads": a.n_heads,
            "n_kv_heads": a.n_kv_heads, "output_size": a.output_size, **count_params(model)}


# -- the pipeline ------------------------------------------------------------------------------------
def optimize(cfg: OptimizeConfig, out_dir: str | Path, *, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Run the recipe; -> the report (also written to out_dir/report.{json,md,png})."""
    out = Path(out_dir).expanduser()
    check_target(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher = load_model(cfg.teacher)
    if teacher.backend != "native":
        raise InvalidArgumentError(f"optimize needs a natively supported teacher (Llama family); {cfg.teacher} "
                                   f"runs through {teacher.backend}")
    tok, data = teacher.tokenizer, cfg.distill.data
    held = heldout_examples(tok, data, cfg.measure.eval_samples)
    prompts = heldout_prompts(tok, data, cfg.measure.speed_prompts)
    steps: list[dict[str, Any]] = []

    def record(name: str, model: torch.nn.Module, quantized: torch.nn.Module | None, **extra) -> None:
        """Quality of `model` (and of its quantized copy, the one timed); shapes and params."""
        row = {"step": name, **describe_model(model), **extra,
               "perplexity": perplexity(model, held, progress=progress).to_dict()}
        if quantized is not None:
            row["perplexity_quantized"] = perplexity(quantized, held, progress=progress).to_dict()
        steps.append(row)
        log.info("%s: held-out perplexity %.2f", name, row["perplexity"]["perplexity"])

    speed_targets: dict[str, Any] = {}
    teacher_q = quantized_copy(teacher.model, cfg.quantize)
    record("teacher", teacher.model, teacher_q)
    speed_targets["teacher"] = teacher_q

    t0 = time.perf_counter()
    pruned, prune_report = prune(teacher.model, tok, cfg.prune, progress=progress)
    if pruned.args.output_ids is not None:  # the teacher on the tokens the students are scored on
        steps[0]["perplexity_same_tokens"] = perplexity(
            teacher.model, held, progress=progress, only_ids=torch.tensor(pruned.args.output_ids)).to_dict()
    pruned_q = quantized_copy(pruned, cfg.quantize)
    record("pruned", pruned, pruned_q, seconds=round(time.perf_counter() - t0, 1), prune=prune_report)
    speed_targets["pruned"] = pruned_q

    distill_teacher = teacher.model
    if cfg.teacher_correction_s > 0:
        t0 = time.perf_counter()
        correction = dataclasses.replace(cfg.distill, train=dataclasses.replace(
            cfg.distill.train, budget_s=cfg.teacher_correction_s, steps=None,
            lr=cfg.correction_lr()))
        distill_teacher = finetune_baseline(teacher.model, tok, correction, progress)
        record("teacher, corrected (fine-tuned on the data)", distill_teacher, None,
               seconds=round(time.perf_counter() - t0, 1))

    if cfg.measure.baseline_finetune:
        t0 = time.perf_counter()
        baseline = dataclasses.replace(cfg.distill, train=dataclasses.replace(
            cfg.distill.train, lr=cfg.baseline_lr()))
        tuned = finetune_baseline(pruned, tok, baseline, progress)
        record("pruned + fine-tuned (CE only, baseline)", tuned, None, seconds=round(time.perf_counter() - t0, 1),
               agreement=compare(tuned, teacher.model, held, progress=progress).to_dict())
        del tuned

    t0 = time.perf_counter()
    # evaluate=False: this pipeline scores every step itself, on its own held-out set.
    student, distill_report = distill(distill_teacher, pruned, tok, dataclasses.replace(cfg.distill, evaluate=False),
                                      progress=progress)
    student.eval()
    distill_report.pop("losses", None)  # per-step losses: kept in the checkpoint log, not the report
    result_q = quantized_copy(student, cfg.quantize)
    record("distilled", student, result_q, seconds=round(time.perf_counter() - t0, 1),
           agreement=compare(student, teacher.model, held, progress=progress).to_dict(),
           distill={k: distill_report[k] for k in ("steps", "tokens", "tokens_per_s", "first_loss", "final_loss",
                                                   "stopped_by")})
    speed_targets["result"] = result_q

    history = [{"step": "prune", **cfg.prune.__dict__}, {"step": "distill", "seconds": steps[-1]["seconds"]}]
    save_model(student, tok, out / "model", extra={"history": history}, overwrite=True)
    save_model(result_q, tok, out / f"model-{cfg.quantize.dtype}", overwrite=True,
               extra={"history": history + [{"step": "quantize", **dataclasses.asdict(cfg.quantize)}]})

    from kuaida.bench.latency import gguf_for
    from kuaida.bench.peers import llamacpp_missing

    gguf = gguf_for(cfg.teacher)
    if cfg.measure.llamacpp and gguf is not None and llamacpp_missing() is None:
        speed_targets["llama.cpp (teacher GGUF)"] = gguf
    speeds = interleaved_speeds(speed_targets, prompts, cfg.measure)
    report = build_report(cfg, steps, speeds, out, time.perf_counter() - t_start)
    write_report(report, out)
    return report


# -- the report --------------------------------------------------------------------------------------
def build_report(cfg: OptimizeConfig, steps: list[dict], speeds: dict[str, dict], out: Path,
                 seconds: float) -> dict[str, Any]:
    from kuaida.bench.report import command_line, machine_info

    by_step = {"teacher": "teacher", "pruned": "pruned", "distilled": "result"}
    for row in steps:
        if (key := by_step.get(row["step"])) in speeds:
            row["decode_tok_s"] = speeds[key]["tok_s"]
            row["decode_rounds"] = speeds[key]["rounds"]
    teacher, result = steps[0], next(r for r in steps if r["step"] == "distilled")
    ppl = lambda row, key="perplexity": row[key]["perplexity"]  # noqa: E731
    # A pruned output vocabulary leaves rare reply tokens unscored: compare with the teacher on the same ones.
    same = "perplexity_same_tokens" if "perplexity_same_tokens" in teacher else "perplexity"
    speedup = result["decode_tok_s"] / teacher["decode_tok_s"]
    targets = {
        "speedup_vs_teacher": {"value": round(speedup, 2), "target": ">= 2 (same precision)", "met": speedup >= 2},
        "perplexity_vs_teacher": {
            "value": round(ppl(result, "perplexity_quantized") / ppl(teacher, same), 3),
            "target": "<= 1.20 (result at its precision vs teacher fp32, on the same reply tokens)",
            "met": ppl(result, "perplexity_quantized") <= 1.2 * ppl(teacher, same)},
    }
    if "llama.cpp (teacher GGUF)" in speeds:
        peer = speeds["llama.cpp (teacher GGUF)"]["tok_s"]
        targets["faster_than_llamacpp"] = {"value": round(result["decode_tok_s"] / peer, 2),
                                           "target": "> 1 (x llama.cpp on the teacher's GGUF)",
                                           "met": result["decode_tok_s"] > peer}
    baseline = [r for r in steps if "baseline" in r["step"]]
    if baseline:
        targets["distill_beats_finetune"] = {"value": [round(ppl(result), 2), round(ppl(baseline[0]), 2)],
                                             "target": "distilled perplexity < fine-tuned, same budget",
                                             "met": ppl(result) < ppl(baseline[0])}
        if "agreement" in result and "agreement" in baseline[0]:  # reported beside it, not a target
            agree = [round(r["agreement"]["top1"], 4) for r in (result, baseline[0])]
            targets["distill_vs_finetune_top1_agreement_with_teacher"] = {
                "value": agree, "target": "reported (distilled, fine-tuned)", "met": None}
    return {"benchmark": "optimize", "command": command_line(), "machine": machine_info(torch.get_num_threads()),
            "recipe": cfg.to_dict(), "output": str(out), "seconds": round(seconds, 1), "steps": steps,
            "speeds": speeds, "targets": targets}


def _md_row(row: dict, teacher: dict, dtype: str) -> str:
    ppl, ppl_q = row["perplexity"], row.get("perplexity_quantized")
    speed = row.get("decode_tok_s")
    cells = [row["step"], str(row["n_layers"]), str(row["intermediate_size"]), f"{row['n_heads']}/{row['n_kv_heads']}",
             f"{row['output_size']:,}", f"{row['decode_params'] / 1e6:.1f} M",
             f"{speed:.1f}" if speed else "-",
             f"{speed / teacher['decode_tok_s']:.2f}x" if speed else "-",
             f"{ppl['perplexity']:.2f}", f"{ppl_q['perplexity']:.2f}" if ppl_q else "-",
             f"{(ppl_q or ppl)['perplexity'] / teacher['perplexity']['perplexity']:.2f}x",
             f"{ppl['coverage'] * 100:.2f} %"]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    dtype = report["recipe"]["quantize"]["dtype"]
    steps, teacher = report["steps"], report["steps"][0]
    lines = [f"# kuaida optimize: {report['recipe']['teacher']}", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine'].get('cpu')}, "
             f"{report['machine'].get('threads')} threads, torch {report['machine'].get('torch')}, "
             f"{report['machine'].get('date')}  ", f"Total time: {report['seconds'] / 60:.1f} min", "",
             f"| step | blocks | MLP | heads q/kv | output rows | weights read / token | decode tok/s ({dtype}) "
             f"| x teacher | held-out PPL (fp32) | PPL ({dtype}) | PPL x teacher fp32 | reply tokens covered |",
             "| " + " | ".join(["---"] * 12) + " |"]
    lines += [_md_row(row, teacher, dtype) for row in steps]
    for name, s in report["speeds"].items():
        if name.startswith("llama.cpp"):
            lines.append(f"| {name} | | | | | | {s['tok_s']:.1f} | {s['tok_s'] / teacher['decode_tok_s']:.2f}x "
                         "| | | | |")
    lines += ["", "Decode speed: median of interleaved rounds, greedy, held-out prompts "
              f"({report['recipe']['measure']['speed_prompts']} prompts x {report['recipe']['measure']['new_tokens']}"
              " tokens a round). Perplexity: held-out chitchat assistant tokens (fixed split); with a pruned output"
              " vocabulary, reply tokens outside it are not scored (coverage column)."]
    if same := teacher.get("perplexity_same_tokens"):
        lines += ["", f"The teacher on the same reply tokens as the pruned models ({same['coverage'] * 100:.2f} % "
                  f"of them): PPL {same['perplexity']:.2f}; the perplexity target compares with this."]
    agreeing = [r for r in steps if "agreement" in r]
    if agreeing:
        lines += ["", "Agreement with the teacher (teacher-forced, held-out): " + "; ".join(
            f"{r['step']}: top-1 {r['agreement']['top1'] * 100:.1f} %, KL {r['agreement']['kl']:.3f}"
            for r in agreeing) + "."]
    lines += ["", "## Targets", "",
              "| target | value | goal | met |", "| --- | --- | --- | --- |"]
    verdict = {True: "yes", False: "**no**", None: "-"}
    lines += [f"| {k} | {t['value']} | {t['target']} | {verdict[t['met']]} |"
              for k, t in report["targets"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Decode tok/s (x) against held-out perplexity (y) for the teacher, each step and the result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = report["recipe"]["quantize"]["dtype"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in report["steps"] if r.get("decode_tok_s")]
    xs = [r["decode_tok_s"] for r in rows]
    ys = [(r.get("perplexity_quantized") or r["perplexity"])["perplexity"] for r in rows]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["step"], (x, y), textcoords="offset points", xytext=(6, 6))
    for name, s in report["speeds"].items():
        if name.startswith("llama.cpp"):
            ax.axvline(s["tok_s"], color="tab:red", linestyle="--", label=f"{name}: {s['tok_s']:.0f} tok/s")
    ax.axhline(report["steps"][0]["perplexity"]["perplexity"] * 1.2, color="gray", linestyle=":",
               label="teacher fp32 perplexity + 20 %")
    ax.set_xlabel(f"decode tokens/s ({dtype}, this CPU)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("kuaida optimize: speed vs quality")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")
