"""What a model change costs in quality, on held-out conversations (kuaida.train.data's fixed split).

    perplexity(model, examples)          # exp(mean NLL) on the assistant's reply tokens
    compare(student, teacher, examples)  # teacher-forced: top-1 agreement, mean KL(teacher || student)
    greedy_agreement(student, teacher, tokenizer, prompts, n_tokens=32)   # same greedy replies?

A pruned output vocabulary gives -inf logits to the ids it dropped: a reply token the model cannot
produce has no finite likelihood. Such tokens are counted as `uncovered` and left out of the
perplexity, which is then over the covered tokens; `coverage` says what share that is. KL against a
pruned student is over the student's kept ids (the teacher renormalized on them); the teacher's
probability on the dropped ids is reported beside it as `teacher_mass_pruned`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from kuaida.errors import InvalidArgumentError
from kuaida.train.data import (
    IGNORE,
    DataConfig,
    Example,
    collate,
    heldout_examples,
    load_conversations,
    split_conversations,
)

log = logging.getLogger(__name__)

ROW_CHUNK = 256  # label positions per log_softmax: bounds [rows, vocab] temporaries (~50 MB at 49k vocab)


@dataclass
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood, nats per covered token
    tokens: int  # covered reply tokens scored
    uncovered: int  # reply tokens with a -inf logit (outside a pruned output vocabulary): not scored
    examples: int

    @property
    def coverage(self) -> float:
        total = self.tokens + self.uncovered
        return self.tokens / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "coverage": self.coverage}


@dataclass
class AgreementResult:
    top1: float  # share of reply positions where student and teacher predict the same next token
    kl: float  # mean KL(teacher || student), nats per position, over the student's kept vocabulary
    teacher_mass_pruned: float  # mean teacher probability on ids the student cannot produce (0 unpruned)
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GreedyResult:
    prefix: float  # mean share of the first n_tokens both greedy replies share (identical prefix / n)
    exact: float  # share of prompts whose first n_tokens (or whole replies, if shorter) are identical
    prompts: int
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalConfig:
    samples: int | None = 200  # held-out conversations scored (None: the whole held-out split)
    batch_size: int = 4
    prompts: int = 16  # held-out prompts for greedy agreement (with a teacher)
    reply_tokens: int = 32  # greedy reply tokens compared per prompt
    data: DataConfig = field(default_factory=DataConfig)  # the split: same seed/fraction as training

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise InvalidArgumentError(f"samples must be >= 1 (or None for all), got {self.samples}")
        for name in ("batch_size", "prompts", "reply_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")


def evaluate(model: Any, teacher: Any | None = None, cfg: EvalConfig | None = None,
             progress: bool = True) -> dict[str, Any]:
    """`model` (and `teacher`): LoadedModel. -> a JSON-ready report: held-out perplexity, and with a
    teacher its perplexity, the ratio, teacher-forced agreement and greedy reply agreement."""
    cfg = cfg or EvalConfig()
    examples = heldout_examples(model.tokenizer, cfg.data, cfg.samples)
    log.info("scoring %d held-out conversations (%s, seed %d)", len(examples), cfg.data.source, cfg.data.seed)
    ppl = perplexity(model.model, examples, cfg.batch_size, progress)
    report: dict[str, Any] = {"model": model.source, "data": asdict(cfg.data), "examples": len(examples),
                              "perplexity": ppl.to_dict()}
    if teacher is None:
        return report
    teacher_ppl = perplexity(teacher.model, examples, cfg.batch_size, progress)
    prompts = heldout_prompts(model.tokenizer, cfg.data, cfg.prompts)
    report["teacher"] = {"model": teacher.source, "perplexity": teacher_ppl.to_dict()}
    report["perplexity_ratio"] = ppl.perplexity / teacher_ppl.perplexity
    report["agreement"] = compare(model.model, teacher.model, examples, cfg.batch_size, progress).to_dict()
    report["greedy"] = greedy_agreement(model.model, teacher.model, model.tokenizer, prompts,
                                        cfg.reply_tokens, progress).to_dict()
    return report


def heldout_prompts(tokenizer: Any, data: DataConfig, n: int) -> list[list[int]]:
    """Prompts from the held-out conversations: each one's turns before its first reply, rendered with
    the chat template for the assistant to answer."""
    from kuaida.dialogue.template import render_prompt

    _, held = split_conversations(load_conversations(data.source), data.heldout_fraction, data.seed)
    prompts = []
    for conv in held:
        first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
        if first and len(prompts) < n:
            prompts.append(render_prompt(tokenizer, conv[:first]))
    return prompts


@torch.inference_mode()
def perplexity(model: nn.Module, examples: list[Example], batch_size: int = 4,
               progress: bool = True, only_ids: torch.Tensor | None = None) -> PerplexityResult:
    """Teacher-forced perplexity of `model` on the labelled (assistant) tokens of `examples`.

    `only_ids` (1-D token ids): score only reply tokens among them, the others count as uncovered. E.g.
    a teacher on exactly the tokens a pruned-vocabulary student is scored on (same tokens, fair ratio);
    the teacher's probabilities stay normalized over its whole vocabulary."""
    nll, covered, uncovered = 0.0, 0, 0
    keep = None
    if only_ids is not None:
        keep = torch.zeros(int(only_ids.max()) + 1 if only_ids.numel() else 1, dtype=torch.bool)
        keep[only_ids] = True
    for batch in _batches(examples, batch_size, "perplexity", progress):
        logits, targets = _label_rows(model(batch.input_ids), batch.labels)
        for rows, tgt in zip(logits.split(ROW_CHUNK), targets.split(ROW_CHUNK)):
            picked = rows.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1)  # [n] log p(label)
            ok = torch.isfinite(picked)
            if keep is not None:
                ok &= (tgt < keep.numel()) & keep[tgt.clamp(max=keep.numel() - 1)]
            nll -= picked[ok].double().sum().item()
            covered += int(ok.sum())
            uncovered += int((~ok).sum())
    if not covered:
        raise InvalidArgumentError("no reply token the model can produce in these examples: nothing to score")
    mean = nll / covered
    return PerplexityResult(math.exp(mean), mean, covered, uncovered, len(examples))


@torch.inference_mode()
def compare(student: nn.Module, teacher: nn.Module, examples: list[Example], batch_size: int = 4,
            progress: bool = True) -> AgreementResult:
    """Teacher-forced agreement of `student` with `teacher` at every labelled position of `examples`."""
    agree, kl, pruned_mass, n = 0, 0.0, 0.0, 0
    for batch in _batches(examples, batch_size, "agreement", progress):
        s_logits, _ = _label_rows(student(batch.input_ids), batch.labels)
        t_logits, _ = _label_rows(teacher(batch.input_ids), batch.labels)
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise InvalidArgumentError(f"student vocabulary {s_logits.shape[-1]} != teacher's "
                                       f"{t_logits.shape[-1]}: compare models that share a tokenizer")
        for s, t in zip(s_logits.split(ROW_CHUNK), t_logits.split(ROW_CHUNK)):
            row_agree, row_kl, row_mass = _agreement(s, t)
            agree += row_agree
            kl += row_kl
            pruned_mass += row_mass
            n += s.shape[0]
    if not n:
        raise InvalidArgumentError("no labelled tokens in these examples: nothing to compare")
    return AgreementResult(agree / n, kl / n, pruned_mass / n, n)


def _agreement(s: torch.Tensor, t: torch.Tensor) -> tuple[int, float, float]:
    """s, t: logits [n, V] at the same positions -> (top-1 matches, summed KL, summed pruned mass)."""
    log_s = s.log_softmax(-1)
    log_t = t.log_softmax(-1)
    kept = torch.isfinite(log_s)  # the student's kept ids (all of them without a pruned vocabulary)
    mass = torch.where(kept, 0.0, log_t.exp()).sum(-1)  # teacher probability the student cannot place
    log_t_kept = log_t.masked_fill(~kept, float("-inf")).log_softmax(-1)
    p_t = log_t_kept.exp()
    kl = torch.where(p_t > 0, p_t * (log_t_kept - log_s), 0.0).sum(-1)  # 0 * log 0 terms are 0
    matches = int((s.argmax(-1) == t.argmax(-1)).sum())
    return matches, kl.double().sum().item(), mass.double().sum().item()


def greedy_agreement(student: nn.Module, teacher: nn.Module, tokenizer: Any, prompts: list[list[int]],
                     n_tokens: int = 32, progress: bool = True) -> GreedyResult:
    """Greedy replies (our Engine, temperature 0) of both models to each prompt: how much of the first
    `n_tokens` they share. A reply that ends early counts its end as a token, so two replies that end
    together agree on the rest."""
    from kuaida.dialogue.template import end_of_turn_ids
    from kuaida.engine.generate import Engine
    from kuaida.engine.sampling import SamplingParams

    if not prompts or n_tokens < 1:
        raise InvalidArgumentError("greedy agreement needs at least one prompt and n_tokens >= 1")
    eos = end_of_turn_ids(tokenizer, None)
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0.0)
    engines = [Engine(m, eos) for m in (student, teacher)]
    shares, exact = [], 0
    with _progress("greedy replies", len(prompts), progress) as advance:
        for prompt in prompts:
            a, b = (_padded(list(e.generate(prompt, params)), n_tokens) for e in engines)
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n_tokens)
            shares.append(same / n_tokens)
            exact += same == n_tokens
            advance()
    return GreedyResult(sum(shares) / len(shares), exact / len(prompts), len(prompts), n_tokens)


def _padded(reply: list[int], n: int) -> list[int]:
    return (reply + [-1] * n)[:n]  # -1: "the reply has ended"


def _label_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], labels [B, T] (labels[b, t] is the token at t) -> the logits predicting each
    labelled token [n, V] (from the position before it) and those tokens [n]."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return logits[:, :-1][mask].float(), targets[mask]


def _batches(examples: list[Example], batch_size: int, what: str, progress: bool) -> Iterator[Any]:
    """Batches of similar lengths (less padding); sums over them do not depend on the order."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise InvalidArgumentError("no examples to evaluate")
    order = sorted(examples, key=lambda e: len(e.input_ids))
    with _progress(what, len(order), progress) as advance:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo:lo + batch_size]
            yield collate(chunk)
            advance(len(chunk))


@contextmanager
def _progress(what: str, total: int, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr (-> advance(n=1)); a no-op when disabled."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n=1: bar.advance(task, n)
