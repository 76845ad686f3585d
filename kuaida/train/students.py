"""Students for distillation, built from the teacher or loaded:

    "layers:15"              the teacher with 15 of its blocks, evenly spaced, first and last kept
                             (30 -> 15 is every other block)
    "gru:dim=256,layers=2"   a GRU (kuaida.model.rnn) with the teacher's vocabulary; keys dim, hidden
                             (default: dim), layers, tie (0/1), its embedding initialized from the teacher's
    a model directory        e.g. the output of `kuaida prune` (load_model)

GRU initialization: the input embedding (tied to the output layer) is the teacher's embedding projected
onto its top `dim` principal directions (uncentered SVD: the rank-`dim` projection that best keeps the
dot products between token vectors, which is what a tied output layer scores). With dim equal to the
teacher's width it is copied as is, and the final norm with it. Every block's out_proj starts at zero,
so the untrained GRU is exactly "embedding -> output layer" and training grows the recurrence from there.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kuaida.errors import InvalidArgumentError
from kuaida.model.rnn import GRUArgs, GRUModel

log = logging.getLogger(__name__)

STUDENT_HELP = ("a model directory (e.g. from `kuaida prune`), 'layers:N' (the teacher with N evenly spaced "
                "blocks: layers:15 of 30 is every other one) or 'gru:dim=256,layers=2[,hidden=256][,tie=1]' "
                "(a recurrent student, embedding initialized from the teacher's)")
_GRU_KEYS = {"dim": "dim", "hidden": "hidden", "layers": "n_layers", "tie": "tie_embeddings"}


def spaced_layers(n_layers: int, n_keep: int) -> list[int]:
    """n_keep block indices out of n_layers, evenly spaced, first and last included."""
    if not 1 <= n_keep <= n_layers:
        raise InvalidArgumentError(f"a student keeps between 1 and {n_layers} blocks, got {n_keep}")
    if n_keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep)})


def layer_student(teacher: nn.Module, n_keep: int) -> nn.Module:
    """A copy of the teacher (a kuaida Transformer) with n_keep evenly spaced blocks."""
    from kuaida.compress.prune import prune_depth

    return prune_depth(teacher, keep_layers=spaced_layers(teacher.args.n_layers, n_keep))


def parse_gru_spec(spec: str, vocab_size: int, max_seq_len: int) -> GRUArgs:
    """"dim=256,layers=2,hidden=512,tie=1" -> GRUArgs with the teacher's vocabulary and context."""
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        if key not in _GRU_KEYS or not value.isdigit():
            raise InvalidArgumentError(f"cannot read {part!r} in the GRU spec {spec!r}: write key=integer "
                                       f"with keys {', '.join(_GRU_KEYS)} (e.g. gru:dim=256,layers=2)")
        values[_GRU_KEYS[key]] = bool(int(value)) if key == "tie" else int(value)
    values.setdefault("hidden", values.get("dim", GRUArgs.dim))
    return GRUArgs(vocab_size=vocab_size, max_seq_len=max_seq_len, **values)


@torch.no_grad()
def gru_student(teacher: nn.Module, args: GRUArgs) -> GRUModel:
    """A GRU whose embedding (and output layer, when tied) comes from the teacher's embedding."""
    if args.vocab_size != teacher.args.vocab_size:
        raise InvalidArgumentError(f"the GRU's vocabulary ({args.vocab_size}) must be the teacher's "
                                   f"({teacher.args.vocab_size}): they share a tokenizer")
    student = GRUModel(args)
    emb = teacher.embed_tokens.weight.detach().float()  # [V, teacher dim]
    if args.dim == emb.shape[1]:
        student.embed_tokens.weight.copy_(emb)
        student.norm.weight.copy_(teacher.norm.weight)
    elif args.dim < emb.shape[1]:
        # Top principal directions of the (uncentered) embedding rows: E ~ U S V^T, keep E V[:, :dim].
        _, _, vh = torch.linalg.svd(emb, full_matrices=False)  # vh [teacher dim, teacher dim]
        student.embed_tokens.weight.copy_(emb @ vh[:args.dim].T)
    else:
        raise InvalidArgumentError(f"a GRU student of dim {args.dim} is wider than the teacher "
                                   f"({emb.shape[1]}): choose dim <= {emb.shape[1]}")
    for block in student.layers:
        block.out_proj.weight.zero_()
    return student


def build_student(spec: str, teacher: nn.Module) -> tuple[nn.Module, Any, str]:
    """A STUDENT argument -> (student model, its tokenizer or None for the teacher's, description)."""
    kind, _, rest = spec.partition(":")
    if kind == "layers" and rest:
        if not rest.isdigit():
            raise InvalidArgumentError(f"cannot read {spec!r}: write layers:N with N a number of blocks")
        return layer_student(teacher, int(rest)), None, f"teacher with {rest} evenly spaced blocks"
    if kind == "gru":
        args = parse_gru_spec(rest, teacher.args.vocab_size, teacher.args.max_seq_len)
        return gru_student(teacher, args), None, f"GRU {args}"
    if not Path(spec).expanduser().exists():
        raise InvalidArgumentError(f"student {spec!r} is neither a directory nor a shorthand: {STUDENT_HELP}")
    from kuaida.model import load_model

    loaded = load_model(spec)
    return loaded.model, loaded.tokenizer, loaded.source
