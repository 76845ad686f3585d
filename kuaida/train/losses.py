"""Training losses for fine-tuning and knowledge distillation (torchtune style: each loss is an nn.Module
called as `loss(student_logits [B, T, V], teacher_logits [B, T, V], labels [B, T])`).

Every loss counts only tokens whose label is not -100 and returns the mean over them (0 when none count).
All math runs in fp32 through log_softmax. The logits of a 49k vocabulary are big (8 x 256 tokens:
400 MB per model), so the per-token loss is computed a chunk of tokens at a time and its backward
recomputes each chunk: the extra memory is the logits' gradient plus one chunk (8 x 256 x 49k:
+0.5 GB instead of +2.9 GB for plain autograd, measured).

Temperature follows Hinton et al. (2015): both distributions are softened by T and the KL is scaled by
T^2 so its gradients keep the same magnitude as the cross-entropy's when T changes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kuaida.errors import InvalidArgumentError

IGNORE = -100
# Elements (tokens x vocabulary) per chunk: 2^20 fp32 = 4 MB, 21 tokens of a 49k vocabulary; a chunk's
# temporaries stay in cache (measured on 8 x 256 x 49k: no slower than 2^24, 0.4 GB less peak memory).
CHUNK_ELEMENTS = 1 << 20

# fn(student [n, V], teacher [n, V] | None, labels [n]) -> per-token losses [n, k] (counted rows only)
TokenLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def masked_mean(token_loss: TokenLoss, student: torch.Tensor, teacher: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
    """Mean of `token_loss` [n, k] over the tokens with labels != -100 -> [k].

    student, teacher: [B, T, V] (teacher may be None); labels: [B, T]."""
    V = student.shape[-1]
    s = student.reshape(-1, V)  # [N, V], a view for contiguous logits
    t = None if teacher is None else teacher.detach().reshape(-1, V)
    y = labels.reshape(-1)
    n = int((y != IGNORE).sum())  # note: a sync point
    if n == 0:  # 0, still attached to the graph (DDP expects every parameter to get a gradient)
        return student.sum() * 0.0 + token_loss(s[:0].float(), None if t is None else t[:0], y[:0]).sum(0)
    return _ChunkedSum.apply(s, t, y, token_loss) / n


def _chunks(s: torch.Tensor, y: torch.Tensor):
    """-> (rows slice, counted-row mask [rows]) for each chunk of tokens that has a counted one."""
    step = max(1, CHUNK_ELEMENTS // s.shape[-1])
    for lo in range(0, s.shape[0], step):
        keep = y[lo:lo + step] != IGNORE
        if bool(keep.any()):
            yield slice(lo, lo + step), keep


class _ChunkedSum(torch.autograd.Function):
    """Sum of token_loss over counted tokens, a chunk of tokens at a time. Backward recomputes each
    chunk and writes its gradient into one [N, V] buffer: no softmax is kept between the passes and no
    full-size gradient is made per chunk (autograd through slices would make one each)."""

    @staticmethod
    def forward(ctx, s, t, y, token_loss):
        # The teacher's logits may be inference tensors (save_for_backward refuses those); they need no
        # gradient and no version check, so they ride on ctx.
        ctx.save_for_backward(s, y)
        ctx.teacher, ctx.token_loss = t, token_loss
        return sum(_chunk_loss(token_loss, s[rows], t, y, rows, keep) for rows, keep in _chunks(s, y))

    @staticmethod
    def backward(ctx, grad_out):
        s, y = ctx.saved_tensors
        grad = torch.zeros_like(s)  # [N, V]
        for rows, keep in _chunks(s, y):
            with torch.enable_grad():
                leaf = s[rows].detach().requires_grad_()
                part = _chunk_loss(ctx.token_loss, leaf, ctx.teacher, y, rows, keep)
                grad[rows] = torch.autograd.grad(part, leaf, grad_out)[0]
        return grad, None, None, None


def _chunk_loss(token_loss: TokenLoss, sc: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor,
                rows: slice, keep: torch.Tensor) -> torch.Tensor:
    """Summed losses [k] of the counted tokens of chunk `rows` (sc: the student's rows of it)."""
    tc = None if t is None else t[rows][keep].float()
    return token_loss(sc[keep].float(), tc, y[rows][keep]).sum(0)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise InvalidArgumentError(f"distillation temperature must be > 0, got {temperature}")


def forward_kl(temperature: float) -> TokenLoss:
    """KL(p_teacher^T || p_student^T) * T^2 per token: mass-covering, the student spreads over every
    mode of the teacher."""
    def fn(s: torch.Tensor, t: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(s / temperature, dim=-1)  # student [N, V]
        log_p = F.log_softmax(t / temperature, dim=-1)  # teacher [N, V]
        p = log_p.exp()
        # 0 * log 0 = 0: a teacher probability of exactly 0 (a -inf logit) adds nothing, not NaN.
        return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1) * temperature ** 2
    return fn


def reverse_kl(temperature: float) -> TokenLoss:
    """KL(p_student^T || p_teacher^T) * T^2 per token: mode-seeking, the student concentrates where the
    teacher is confident (Gu et al. 2024, MiniLLM)."""
    def fn(s: torch.Tensor, t: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
        q = log_q.exp()
        return torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1) * temperature ** 2
    return fn


def cross_entropy(s: torch.Tensor, _: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(s, y, reduction="none")


class ForwardKLLoss(nn.Module):
    """T^2 * KL(teacher || student) at temperature T, mean over counted tokens."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.token_loss = forward_kl(temperature)

    def forward(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        return masked_mean(self.token_loss, student_logits, teacher_logits, labels)


class ReverseKLLoss(nn.Module):
    """T^2 * KL(student || teacher) at temperature T, mean over counted tokens."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.token_loss = reverse_kl(temperature)

    def forward(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        return masked_mean(self.token_loss, student_logits, teacher_logits, labels)


class CrossEntropyLoss(nn.Module):
    """Next-token cross-entropy on `labels` (already shifted: labels[b, t] is the target of position t);
    the teacher's logits are ignored (pass None)."""

    def forward(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        return masked_mean(cross_entropy, student_logits, None, labels)


class DistillLoss(nn.Module):
    """loss = alpha * CE(student, labels) + (1 - alpha) * KD(student, teacher).

    alpha is the weight of the data (hard labels): alpha = 1 is plain fine-tuning (the teacher is not
    needed), alpha = 0 pure distillation. kind: "forward" (KL(teacher || student)) or "reverse"."""

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, kind: str = "forward") -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise InvalidArgumentError(f"alpha (weight of the cross-entropy) must be in [0, 1], got {alpha}")
        if kind not in KD_KINDS:
            raise InvalidArgumentError(f"unknown distillation kind {kind!r}: choose one of {', '.join(KD_KINDS)}")
        self.alpha, self.kind = alpha, kind
        self.ce = CrossEntropyLoss()
        self.kd = KD_KINDS[kind](temperature)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha < 1.0

    def parts(self, student_logits, teacher_logits, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (ce, kd), both means over counted tokens, in one pass over the logits; kd is None when
        alpha = 1 (no teacher needed)."""
        if not self.needs_teacher:
            return self.ce(student_logits, None, labels), None
        kd = self.kd.token_loss

        def both(s, t, y):  # [n, 2]: CE and KD of each token
            return torch.stack([cross_entropy(s, None, y), kd(s, t, y)], dim=-1)

        ce_kd = masked_mean(both, student_logits, teacher_logits, labels)
        return ce_kd[0], ce_kd[1]

    def combine(self, ce: torch.Tensor, kd: torch.Tensor | None) -> torch.Tensor:
        return ce if kd is None else self.alpha * ce + (1.0 - self.alpha) * kd

    def forward(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        return self.combine(*self.parts(student_logits, teacher_logits, labels))


KD_KINDS: dict[str, type[nn.Module]] = {"forward": ForwardKLLoss, "reverse": ReverseKLLoss}


def kept_labels(labels: torch.Tensor, output_ids, vocab_size: int) -> tuple[torch.Tensor, int]:
    """Map labels [B, T] (full-vocabulary ids) to columns of a pruned output layer (ModelArgs.output_ids).

    -> (labels in 0..len(output_ids)-1, or -100; n_dropped = counted labels whose token was pruned, now
    -100). Use with `student(tokens, full_vocab=False)` and `teacher_logits[..., output_ids]`."""
    ids = torch.as_tensor(output_ids, dtype=torch.long, device=labels.device)
    table = torch.full((vocab_size,), IGNORE, dtype=torch.long, device=labels.device)
    table[ids] = torch.arange(len(ids), device=labels.device)
    counted = labels != IGNORE
    mapped = torch.where(counted, table[labels.clamp(min=0)], labels)
    n_dropped = int((counted & (mapped == IGNORE)).sum())
    return mapped, n_dropped
