"""Knowledge distillation: a smaller student learns the teacher's next-token distributions, and the data.

    student, report = distill(teacher, student, tokenizer, DistillConfig(train=TrainConfig(budget_s=600)))

loss = alpha * CE(student, reply tokens) + (1 - alpha) * T^2 * KL at temperature T (kuaida.train.losses;
kind "forward": KL(teacher || student), "reverse": KL(student || teacher)), on the assistant's reply
tokens. alpha = 1 is plain fine-tuning through the same code (the teacher is then not run): the fair
baseline for "what does the teacher add". With sequence_level, the teacher first re-generates the
training conversations' replies (kuaida.train.sequence_kd) and those are the labels.

The teacher runs in eval mode under inference_mode, beside the student on every process (under torchrun
each rank runs it on its own micro-batch). Students: any model with the engine's forward and the
teacher's vocabulary, e.g. a pruned teacher, the teacher with fewer blocks, or a GRU
(kuaida.train.students). A student with a pruned output vocabulary learns on its kept ids: the teacher's
logits are sliced to them and its labels remapped (reply tokens it cannot produce are left out, counted).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kuaida.errors import InvalidArgumentError, UnsupportedModelError
from kuaida.train import distributed as D
from kuaida.train.data import (
    IGNORE,
    Batch,
    DataConfig,
    Example,
    batches,
    encode_all,
    heldout_examples,
    load_conversations,
    split_conversations,
    train_examples,
)
from kuaida.train.finetune import next_token_targets
from kuaida.train.loop import LossFn, TrainConfig, train
from kuaida.train.losses import DistillLoss, kept_labels
from kuaida.train.sequence_kd import ReplyConfig, teacher_conversations

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    temperature: float = 2.0  # softens both distributions; the KL is scaled by T^2
    alpha: float = 0.5  # weight of the cross-entropy on the data's labels; 1 - alpha weighs the KL
    kind: str = "forward"  # "forward": KL(teacher || student), "reverse": KL(student || teacher)
    sequence_level: bool = False  # labels = the teacher's own replies (Kim & Rush 2016), see `replies`
    replies: ReplyConfig = field(default_factory=ReplyConfig)  # how the teacher generates them
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(budget_s=600.0))
    # The first ce_first of the training (of its time budget, or of its steps) is plain cross-entropy on
    # the data, the teacher not run; the rest is the loss above. The idea: a freshly pruned student
    # recovers fastest on raw tokens (a CE step costs ~0.65x a distillation step, which also runs the
    # teacher), and the teacher's soft targets pay off later. Measured on the default recipe at its
    # 10-minute budget it did not help (0.3 and 0.5 end where distillation alone does:
    # benchmarks/results/kd-vs-ce-first.md), so the default stays 0.
    ce_first: float = 0.0
    eval_samples: int | None = 200  # held-out conversations scored before and after (None: all)
    evaluate: bool = True  # score before and after (a pipeline with its own evaluation step skips it)

    def __post_init__(self) -> None:
        DistillLoss(self.alpha, self.temperature, self.kind)  # validates the three
        if not 0.0 <= self.ce_first < 1.0:
            raise InvalidArgumentError(f"ce_first must be in [0, 1) (a share of the training), "
                                       f"got {self.ce_first}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise InvalidArgumentError(f"eval_samples must be >= 1 (or None for all), got {self.eval_samples}")
        if self.sequence_level and self.alpha == 0.0:
            log.warning("sequence_level with alpha = 0 never uses the teacher's replies (they are CE labels)")

    def loss(self) -> DistillLoss:
        return DistillLoss(self.alpha, self.temperature, self.kind)


class TeacherProjection:
    """The teacher's logits where the loss reads them: the counted (reply) positions, and with a pruned
    student vocabulary its kept columns only. The output layer is a fifth of the default model's
    forward at 49k columns; projecting ~half the rows onto ~10k columns saves most of it (measured on
    the default model, batch 8 x 256, bf16: 1.0 s instead of 1.35-1.5 s per teacher forward).
    Positions not counted get zeros: the losses never read them."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        # kuaida's Transformer with its whole vocabulary: its final hidden states are available;
        # anything else (a model through transformers, a teacher with a pruned vocabulary) runs whole.
        self.direct = (hasattr(teacher, "hidden_states") and isinstance(getattr(teacher, "lm_head", None),
                       nn.Linear) and getattr(teacher, "output_ids", None) is None)
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # ids, weight, bias

    def _weights(self, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.teacher.lm_head
        if kept is None:
            return head.weight, head.bias
        if self._rows is None or not torch.equal(self._rows[0], kept):  # the teacher is frozen: once
            bias = None if head.bias is None else head.bias[kept].detach()
            self._rows = (kept.clone(), head.weight[kept].detach(), bias)  # [kept, dim]
        return self._rows[1], self._rows[2]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, counted: torch.Tensor,
                 kept: torch.Tensor | None) -> torch.Tensor:
        """input_ids, counted: [B, T] -> logits [B, T, V] (or [B, T, len(kept)])."""
        if not self.direct:
            logits = self.teacher(input_ids)  # [B, T, V]
            return logits if kept is None else logits[..., kept]
        hidden = self.teacher.hidden_states(input_ids)  # [B, T, dim]
        weight, bias = self._weights(kept)
        rows = torch.nn.functional.linear(hidden[counted], weight.to(hidden.dtype),
                                          None if bias is None else bias.to(hidden.dtype))  # [N, cols]
        out = rows.new_zeros(*counted.shape, weight.shape[0])
        out[counted] = rows
        return out


class DistillObjective:
    """A loop.LossFn: the student's and the teacher's logits on the batch -> (loss, counted tokens,
    {"ce", "kd", "pruned_targets"?}). Before `ce_first` of the training (the loop calls set_progress
    before each step) the loss is cross-entropy alone and the teacher is not run."""

    def __init__(self, teacher: nn.Module, loss: DistillLoss, ce_first: float = 0.0) -> None:
        self.project = TeacherProjection(teacher)
        self.loss, self.ce_first = loss, ce_first
        self.ce_only = DistillLoss(1.0, kind=loss.kind)  # alpha = 1: the teacher is not run
        self.set_progress(0.0)

    def set_progress(self, done: float) -> None:
        self.current = self.ce_only if done < self.ce_first else self.loss

    def __call__(self, student: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, dict[str, float]]:
        loss = self.current
        args = getattr(D.unwrap(student), "args", None)
        output_ids = getattr(args, "output_ids", None)
        targets = next_token_targets(batch.labels)  # [B, T]: the token each position predicts
        metrics: dict[str, float] = {}
        teacher_logits = None
        if loss.needs_teacher:
            kept = None if output_ids is None else D.unwrap(student).output_ids
            teacher_logits = self.project(batch.input_ids, targets != IGNORE, kept)  # [B, T, V or kept]
        if output_ids is not None:
            logits = student(batch.input_ids, full_vocab=False)
            targets, dropped = kept_labels(targets, output_ids, args.vocab_size)
            metrics["pruned_targets"] = float(dropped)
        else:
            logits = student(batch.input_ids)
        ce, kd = loss.parts(logits, teacher_logits, targets)
        metrics["ce"] = float(ce.detach())
        if kd is not None:
            metrics["kd"] = float(kd.detach())
        return loss.combine(ce, kd), int((targets != IGNORE).sum()), metrics


def distill_loss_fn(teacher: nn.Module, loss: DistillLoss, ce_first: float = 0.0) -> LossFn:
    """The distillation loss for kuaida.train.loop.train (see DistillObjective)."""
    return DistillObjective(teacher, loss, ce_first)


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    t, s = teacher.args.vocab_size, student.args.vocab_size
    if t != s:
        raise InvalidArgumentError(f"the student's vocabulary ({s} tokens) differs from the teacher's ({t}): "
                                   "distillation needs a student built on the teacher's tokenizer")


def training_set(teacher: nn.Module, tokenizer: Any, cfg: DistillConfig, progress: bool) -> list[Example]:
    """The data's training conversations, or with sequence_level the teacher's versions of them."""
    if not cfg.sequence_level:
        return train_examples(tokenizer, cfg.data)
    train_convs, _ = split_conversations(load_conversations(cfg.data.source), cfg.data.heldout_fraction,
                                         cfg.data.seed)
    if cfg.data.max_conversations is not None:
        train_convs = train_convs[:cfg.data.max_conversations]
    convs = teacher_conversations(teacher, tokenizer, train_convs, cfg.replies, max_len=cfg.data.max_len,
                                  progress=progress)
    return encode_all(tokenizer, convs, cfg.data.max_len)


def evaluate(student: nn.Module, teacher: nn.Module, examples: list[Example]) -> dict[str, Any]:
    """Held-out perplexity of the student and its teacher-forced agreement with the teacher."""
    from kuaida.bench.quality import compare, perplexity  # bench sits above train: imported when used

    was_training = student.training
    student.eval()
    try:
        return {"perplexity": perplexity(student, examples, progress=False).to_dict(),
                "agreement": compare(student, teacher, examples, progress=False).to_dict()}
    finally:
        student.train(was_training)


def distill(teacher: nn.Module, student: nn.Module, tokenizer: Any, cfg: DistillConfig, *,
            progress: bool = True) -> tuple[nn.Module | None, dict[str, Any]]:
    """Train `student` (in place) toward `teacher` on cfg.data; -> (trained student, report). Under
    torchrun every rank calls it; the report's evaluations are computed on rank 0, and under FSDP the
    trained student comes back on rank 0 only (None elsewhere)."""
    from kuaida.bench.quality import perplexity

    info = D.init_distributed()
    check_compatible(teacher, student)
    teacher.to(info.device).eval().requires_grad_(False)
    train_set = training_set(teacher, tokenizer, cfg, progress)
    scoring = info.is_main and cfg.evaluate
    held = heldout_examples(tokenizer, cfg.data, cfg.eval_samples) if scoring else []
    log.info("distilling on %d conversations (%s), %d held out", len(train_set),
             "teacher replies" if cfg.sequence_level else cfg.data.source, len(held))
    teacher_ppl = perplexity(teacher, held, progress=False).to_dict() if scoring else None
    before = evaluate(student, teacher, held) if scoring else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = batches(train_set, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank, world=info.world,
                   pad_id=pad_id)
    result = train(student, distill_loss_fn(teacher, cfg.loss(), cfg.ce_first), data, cfg.train,
                   progress=progress)
    trained = result.model
    after = evaluate(trained, teacher, held) if scoring else None
    report = {
        "processes": info.world, "steps": result.steps, "seconds": result.seconds, "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s, "reply_tokens": result.loss_tokens,
        "first_loss": result.losses[0] if result.losses else None, "final_loss": result.final_loss,
        "losses": result.losses, "last_metrics": result.metrics, "stopped_by": result.stopped_by,
        "resumed_from": result.resumed_from, "train_conversations": len(train_set),
        "heldout_conversations": len(held), "teacher_perplexity": teacher_ppl, "before": before,
        "after": after, "config": {k: v for k, v in asdict(cfg).items() if k != "train"},
        "train": asdict(cfg.train),
    }
    if before and after:
        log.info("held-out perplexity %.3f -> %.3f (teacher %.3f), top-1 agreement %.3f -> %.3f",
                 before["perplexity"]["perplexity"], after["perplexity"]["perplexity"],
                 teacher_ppl["perplexity"], before["agreement"]["top1"], after["agreement"]["top1"])
    return trained, report


def distill_and_save(teacher_spec: str, student_spec: str, out_dir: str | Path, cfg: DistillConfig, *,
                     overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Load the teacher (load_model), build or load the student (kuaida.train.students.build_student),
    distill and save to out_dir on rank 0: save_model, or save_gru for a GRU. Checkpoints go to
    cfg.train.checkpoint_dir (default `<out_dir>.checkpoints`, removed after the save); teacher replies
    of a sequence-level run are cached in `<kuaida cache>/distill/teacher-replies.jsonl` unless
    cfg.replies.cache says otherwise. Returns the report (with "out_dir")."""
    from kuaida.model import load_model
    from kuaida.model.loader import cache_dir
    from kuaida.model.save import check_target
    from kuaida.train.students import build_student

    out = Path(out_dir).expanduser()
    check_target(out, overwrite)  # fail now, not after the training
    teacher = load_model(teacher_spec)
    if teacher.backend != "native":
        raise UnsupportedModelError(f"{teacher.source}: the teacher must be a Llama-family model (native backend)")
    student, student_tokenizer, described = build_student(student_spec, teacher.model)
    if cfg.train.checkpoint_dir is None:
        cfg = replace(cfg, train=replace(cfg.train, checkpoint_dir=str(out.with_name(out.name + ".checkpoints"))))
    if cfg.sequence_level and cfg.replies.cache is None:
        (cache_dir() / "distill").mkdir(parents=True, exist_ok=True)
        cfg = replace(cfg, replies=replace(cfg.replies, cache=str(cache_dir() / "distill" / "teacher-replies.jsonl")))
    log.info("distilling %s into %s", teacher.source, described)
    trained, report = distill(teacher.model, student, teacher.tokenizer, cfg, progress=progress)
    if D.is_main():
        history = {"step": "distill", "teacher": teacher.source, "student": student_spec, "kind": cfg.kind,
                   "alpha": cfg.alpha, "temperature": cfg.temperature, "sequence_level": cfg.sequence_level,
                   "steps": report["steps"], "data": cfg.data.source}
        if report["after"] is not None:
            history.update(perplexity_before=report["before"]["perplexity"]["perplexity"],
                           perplexity_after=report["after"]["perplexity"]["perplexity"],
                           teacher_perplexity=report["teacher_perplexity"]["perplexity"])
        _save(trained.cpu(), student_tokenizer or teacher.tokenizer, out, overwrite, {"history": [history]})
        shutil.rmtree(cfg.train.checkpoint_dir, ignore_errors=True)
    D.barrier()
    return {**report, "student": described, "out_dir": str(out)}


def _save(model: nn.Module, tokenizer: Any, out: Path, overwrite: bool, extra: dict[str, Any]) -> None:
    from kuaida.model.rnn import GRUModel, save_gru
    from kuaida.model.save import save_model

    if isinstance(model, GRUModel):
        if overwrite and out.exists():
            shutil.rmtree(out)
        save_gru(model, tokenizer, out, extra=extra)
    else:
        save_model(model, tokenizer, out, extra=extra, overwrite=overwrite)
