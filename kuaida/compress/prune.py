"""Structured pruning: model -> smaller model transforms that make decoding faster, not just sparser.

    calib = calibration_batches(tokenizer)                         # kuaida.compress.calibrate
    small = prune_depth(model, 20, importance=layer_importance(model, calib))
    small = prune_width(small, calib, intermediate_size=1024)
    small = prune_vocab(small, vocab_from_corpus(tokenizer, texts))
    small, report = prune(model, tokenizer, PruneConfig(n_layers=20, intermediate_size=1024))

Depth, width and vocabulary pruning return a new Transformer built with `dataclasses.replace(args, ...)`
and weights sliced (copied) from the input, which is left intact. Every layer keeps the same shape, so the
result is a plain Llama config that transformers and llama.cpp load. They need fp32/bf16 weights: prune
before quantizing.

Magnitude and 2:4 pruning zero weights in place and return the same model: they shrink nothing and speed
nothing in our engine (dense kernels read every zero), so they are here for experiments and for hardware
with sparse kernels only.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from rich.table import Table
from torch import nn

from kuaida.compress.calibrate import (
    WidthImportance,
    calibration_batches,
    layer_distances,
    vocab_coverage,
    vocab_from_corpus,
    width_importance,
)
from kuaida.errors import InvalidArgumentError
from kuaida.model.transformer import Transformer, rope_inv_freq

log = logging.getLogger(__name__)

# Our int8/int4 kernels quantize along K in blocks of 32: down_proj's K is intermediate_size.
WIDTH_MULTIPLE = 32
_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def _rebuild(args, state: dict[str, torch.Tensor]) -> Transformer:
    """A Transformer of shape `args` that adopts the tensors of `state` (built on meta: no init cost)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True, strict=True)
    if args.tie_embeddings and args.output_ids is None:  # assign=True made two Parameters: one again
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args)  # non-persistent buffers stay on meta through the load
    if args.output_ids is not None:
        model.output_ids = torch.tensor(args.output_ids)
    return model.eval()


def _cloned_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights, copied, so the pruned model shares no storage with its input."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _LINEARS and not isinstance(module, nn.Linear):
            raise InvalidArgumentError(f"{name} is a {type(module).__name__}: prune the fp32 model, then quantize")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def count_params(model: Transformer) -> dict[str, int]:
    """params: distinct weights (a tied output layer counted once); decode_params: weights read for each
    decoded token (every block, the final norm and the output layer; of the embedding only one row)."""
    params = sum(p.numel() for p in model.parameters())
    decode = sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False) if n != "embed_tokens.weight")
    return {"params": params, "decode_params": decode}


# -- depth ---------------------------------------------------------------------------------------------
def select_layers(importance: Sequence[float], n_keep: int) -> list[int]:
    """Block 0 (which turns token embeddings into the residual stream the rest expect: never dropped
    blindly) plus the n_keep - 1 most important others, in their original order."""
    n = len(importance)
    _check_n_keep(n_keep, n)
    rest = sorted(range(1, n), key=lambda i: importance[i], reverse=True)[:n_keep - 1]
    return sorted([0, *rest])


def window_layers(distances: torch.Tensor, n_keep: int) -> list[int]:
    """Gromov et al. 2024: drop the contiguous window of n = L - n_keep blocks whose input and output
    hidden states are closest (distances from calibrate.layer_distances); block 0 always stays."""
    n = distances.shape[0] - 1
    _check_n_keep(n_keep, n)
    drop = n - n_keep
    if drop == 0:
        return list(range(n))
    start = min(range(1, n - drop + 1), key=lambda s: float(distances[s, s + drop]))
    return [i for i in range(n) if not start <= i < start + drop]


def _check_n_keep(n_keep: int, n_layers: int) -> None:
    if not 1 <= n_keep <= n_layers:
        raise InvalidArgumentError(f"layers to keep must be between 1 and {n_layers}, got {n_keep}")


def prune_depth(model: Transformer, n_keep: int | None = None, *, keep_layers: Sequence[int] | None = None,
                importance: Sequence[float] | None = None) -> Transformer:
    """Keep `keep_layers` (block indices), or the `n_keep` blocks `select_layers(importance, ...)` picks."""
    n = model.args.n_layers
    if keep_layers is None:
        if n_keep is None or importance is None:
            raise InvalidArgumentError("prune_depth needs keep_layers, or n_keep with importance "
                                       "(kuaida.compress.calibrate.layer_importance)")
        keep_layers = select_layers(importance, n_keep)
    keep = sorted({int(i) for i in keep_layers})
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise InvalidArgumentError(f"keep_layers must name blocks 0..{n - 1}, got {list(keep_layers)}")
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, tensor in _cloned_state(model).items():
        if key.startswith("layers."):
            _, old, rest = key.split(".", 2)
            if int(old) not in new_index:
                continue
            key = f"layers.{new_index[int(old)]}.{rest}"
        state[key] = tensor
    log.info("depth: kept %d of %d blocks, dropped %s", len(keep), n, sorted(set(range(n)) - set(keep)))
    return _rebuild(replace(model.args, n_layers=len(keep)), state)


# -- width ---------------------------------------------------------------------------------------------
def _check_width(args, intermediate_size: int, n_kv_heads: int, n_heads: int) -> None:
    if not 0 < intermediate_size <= args.intermediate_size or (
            intermediate_size != args.intermediate_size and intermediate_size % WIDTH_MULTIPLE):
        raise InvalidArgumentError(
            f"intermediate_size must be a multiple of {WIDTH_MULTIPLE} (int8/int4 kernels) in "
            f"[{WIDTH_MULTIPLE}, {args.intermediate_size}], got {intermediate_size}")
    if not 0 < n_kv_heads <= args.n_kv_heads:
        raise InvalidArgumentError(f"n_kv_heads must be in [1, {args.n_kv_heads}], got {n_kv_heads}")
    group = args.n_heads // args.n_kv_heads
    if n_heads % n_kv_heads or not 0 < n_heads // n_kv_heads <= group:
        raise InvalidArgumentError(
            f"n_heads must be a multiple of n_kv_heads={n_kv_heads} with at most {group} query heads per "
            f"KV head, got {n_heads}")


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order (an identity when k = len(scores))."""
    return sorted(scores.topk(k).indices.tolist())


def _rows(units: list[int], size: int, offset: int = 0) -> torch.Tensor:
    """Row indices of `units` (heads, channels) that are `size` rows each, starting at `offset`."""
    return torch.tensor([offset + u * size + r for u in units for r in range(size)], dtype=torch.long)


def _keep_heads(imp: WidthImportance, layer: int, args, n_kv_heads: int, n_heads: int) -> tuple[list, list]:
    """-> (kept KV heads, kept query heads), query heads grouped by kept KV head in order: SDPA's GQA
    maps query head i to KV head i // (n_heads / n_kv_heads), so each group stays with its KV head."""
    group = args.n_heads // args.n_kv_heads
    kv = _top(imp.groups(args.n_kv_heads)[layer], n_kv_heads)
    per_group = n_heads // n_kv_heads
    q = [g * group + h for g in kv for h in _top(imp.heads[layer, g * group:(g + 1) * group], per_group)]
    return kv, q


def prune_width(model: Transformer, calib: Iterable[torch.Tensor] | None = None, intermediate_size: int | None = None,
                n_kv_heads: int | None = None, n_heads: int | None = None, *,
                importance: WidthImportance | None = None, progress: bool = False) -> Transformer:
    """Minitron width pruning, the same shape in every layer: keep the `intermediate_size` MLP channels,
    the `n_kv_heads` KV groups and, within them, `n_heads` query heads of highest activation importance
    (measured on `calib`, or given as `importance`). Each layer keeps its own best channels and heads.

    n_heads defaults to n_kv_heads times the present group size. Embedding channels (the model width) are
    not pruned: it changes every matrix and every RMSNorm's statistics, which needs long retraining."""
    a = model.args
    inter = intermediate_size or a.intermediate_size
    kv_heads = n_kv_heads or a.n_kv_heads
    q_heads = n_heads or kv_heads * (a.n_heads // a.n_kv_heads)
    _check_width(a, inter, kv_heads, q_heads)
    if importance is None:
        if calib is None:
            raise InvalidArgumentError("prune_width needs calibration data (calib) or importance")
        importance = width_importance(model, calib, progress)
    state, d = _cloned_state(model), a.head_dim
    for i in range(a.n_layers):
        p = f"layers.{i}."
        ch = torch.tensor(_top(importance.channels[i], inter))
        gate_up = state[p + "mlp.gate_up_proj.weight"]  # [2I, dim]: gate rows, then up rows
        state[p + "mlp.gate_up_proj.weight"] = gate_up[torch.cat([ch, ch + a.intermediate_size])]
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, ch]  # [dim, I]
        kv, q = _keep_heads(importance, i, a, kv_heads, q_heads)
        q_rows = _rows(q, d)
        # qkv rows: q [H*D], then k [Hkv*D], then v [Hkv*D]
        rows = torch.cat([q_rows, _rows(kv, d, a.n_heads * d), _rows(kv, d, (a.n_heads + a.n_kv_heads) * d)])
        for name in ("weight", "bias"):
            if (key := p + f"self_attn.qkv_proj.{name}") in state:
                state[key] = state[key][rows]
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows]  # [dim, H*D]
    log.info("width: MLP %d -> %d channels, heads %d/%d -> %d/%d (query/KV) per layer", a.intermediate_size,
             inter, a.n_heads, a.n_kv_heads, q_heads, kv_heads)
    return _rebuild(replace(a, intermediate_size=inter, n_heads=q_heads, n_kv_heads=kv_heads), state)


# -- output vocabulary ---------------------------------------------------------------------------------
def prune_vocab(model: Transformer, keep_ids: Iterable[int]) -> Transformer:
    """Keep only `keep_ids` in the output layer (ModelArgs.output_ids): the model scores those tokens and
    gives every other one -inf. The input embedding keeps the whole vocabulary (any prompt still reads)."""
    a = model.args
    keep = sorted({int(i) for i in keep_ids})
    current = a.output_ids if a.output_ids is not None else range(a.vocab_size)
    row_of = {tok: row for row, tok in enumerate(current)}
    if not keep or any(i not in row_of for i in keep):
        missing = [i for i in keep if i not in row_of][:5]
        raise InvalidArgumentError(f"keep_ids must be a non-empty subset of the scored ids; not scored: {missing}")
    state = _cloned_state(model)
    state["lm_head.weight"] = state["lm_head.weight"][[row_of[i] for i in keep]]  # [len(keep), dim]
    log.info("vocabulary: output layer %d -> %d rows", len(current), len(keep))
    return _rebuild(replace(a, output_ids=tuple(keep), tie_embeddings=False), state)


# -- unstructured --------------------------------------------------------------------------------------
def _block_linears(model: Transformer) -> list[nn.Linear]:
    linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InvalidArgumentError("no fp32 linear layers to sparsify: prune before quantizing")
    return linears


@torch.no_grad()
def prune_magnitude(model: Transformer, sparsity: float) -> Transformer:
    """Zero, in place, the `sparsity` fraction of smallest-magnitude weights of every linear layer in the
    blocks (the embedding and output layer untouched); returns the same model.

    This shrinks nothing and speeds nothing in our engine: dense kernels read and multiply the zeros."""
    if not 0 <= sparsity < 1:
        raise InvalidArgumentError(f"sparsity must be in [0, 1), got {sparsity}")
    for linear in _block_linears(model):
        w = linear.weight.view(-1)
        k = round(sparsity * w.numel())
        if k:
            w[w.abs().topk(k, largest=False).indices] = 0
    return model


@torch.no_grad()
def prune_2_4(model: Transformer) -> Transformer:
    """2:4 semi-structured sparsity, in place: in every 4 consecutive weights along a row (the input
    dimension) of each block linear layer, zero the 2 smallest. Returns the same model.

    Only GPUs with sparse tensor cores run this faster; on this CPU it shrinks and speeds nothing."""
    for linear in _block_linears(model):
        w = linear.weight
        if w.shape[1] % 4:
            raise InvalidArgumentError(f"2:4 sparsity needs in_features divisible by 4, got {w.shape[1]}")
        quads = w.view(w.shape[0], -1, 4)  # [N, K/4, 4]
        quads.scatter_(-1, quads.abs().topk(2, dim=-1, largest=False).indices, 0.0)
    return model


def sparsity_of(model: Transformer) -> float:
    """Fraction of exact zeros among the block linear layers' weights."""
    linears = _block_linears(model)
    return sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)


# -- the pipeline --------------------------------------------------------------------------------------
DEPTH_METHODS = ("block", "window")


@dataclass
class PruneConfig:
    """What `prune` does, in this order: depth -> width -> output vocabulary -> magnitude or 2:4.
    A field left at None / 0 / False skips its step."""

    n_layers: int | None = None  # blocks to keep
    # "block": drop the blocks that change their input least, wherever they are (block influence);
    # "window": drop the contiguous window that changes it least (Gromov et al. 2024). On SmolLM2-135M
    # "block" loses less before healing: held-out perplexity 258 vs 376 keeping 20 of 30, 1581 vs 8478 at 16.
    depth_method: str = "block"
    intermediate_size: int | None = None  # MLP channels to keep per layer (a multiple of 32)
    n_kv_heads: int | None = None  # KV groups to keep per layer
    n_heads: int | None = None  # query heads to keep per layer (default: n_kv_heads x the group size)
    vocab_from: str | None = None  # "chitchat" or a JSONL of {"messages": [...]}: output tokens its training split uses
    vocab_min_count: int = 1  # a token must appear this often to stay
    byte_tokens: bool = True  # also keep the 256 single-byte tokens, so any text stays expressible
    sparsity: float = 0.0  # unstructured magnitude sparsity (zeros only: no speed-up on CPU)
    two_four: bool = False  # 2:4 sparsity (zeros only: no speed-up on CPU)
    calib_from: str = "chitchat"  # "chitchat" or a JSONL of {"messages": [...]}: calibration conversations
    calib_samples: int = 64  # calibration conversations (depth and width importance), from the training split
    calib_seq_len: int = 256  # tokens per calibration conversation, at most
    seed: int = 0  # picks the calibration conversations

    def __post_init__(self) -> None:
        positive = ("n_layers", "intermediate_size", "n_kv_heads", "n_heads")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise InvalidArgumentError(f"prune: {name} must be positive (or unset to skip), got {getattr(self, name)}")
        if self.depth_method not in DEPTH_METHODS:
            raise InvalidArgumentError(f"prune: depth_method must be one of {', '.join(DEPTH_METHODS)}, "
                                       f"got {self.depth_method!r}")
        if not 0 <= self.sparsity < 1:
            raise InvalidArgumentError(f"prune: sparsity must be in [0, 1), got {self.sparsity}")
        if self.sparsity and self.two_four:
            raise InvalidArgumentError("prune: choose magnitude sparsity or 2:4, not both")
        if self.vocab_min_count < 1 or self.calib_samples < 1 or self.calib_seq_len < 2:
            raise InvalidArgumentError("prune: vocab_min_count and calib_samples must be >= 1, calib_seq_len >= 2")

    @property
    def width(self) -> bool:
        return any(v is not None for v in (self.intermediate_size, self.n_kv_heads, self.n_heads))


def shape_of(model: Transformer) -> dict[str, int]:
    """Sizes a pruning report compares: parameter counts and the per-layer shape."""
    a = model.args
    return {**count_params(model), "n_layers": a.n_layers, "intermediate_size": a.intermediate_size,
            "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "output_size": a.output_size}


def _depth(model: Transformer, calib: list[torch.Tensor], cfg: PruneConfig, progress: bool) -> tuple:
    distances = layer_distances(model, calib, progress)
    importance = distances.diagonal(1).tolist()
    if cfg.depth_method == "window":
        keep = window_layers(distances, cfg.n_layers)
    else:
        keep = select_layers(importance, cfg.n_layers)
    dropped = sorted(set(range(model.args.n_layers)) - set(keep))
    info = {"layer_importance": [round(x, 5) for x in importance], "layers_kept": keep, "layers_dropped": dropped}
    return prune_depth(model, keep_layers=keep), info


def _vocab(model: Transformer, tokenizer, cfg: PruneConfig) -> tuple:
    """Output vocabulary from the whole conversations (both roles, through the chat template) of the
    training split of cfg.vocab_from; coverage on its held-out assistant tokens (what the model must say)."""
    from kuaida.train.data import DataConfig, heldout_examples, load_conversations, split_conversations

    data = DataConfig(source=cfg.vocab_from)
    train, _ = split_conversations(load_conversations(data.source), data.heldout_fraction, data.seed)
    texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in train]
    keep = vocab_from_corpus(tokenizer, texts, cfg.vocab_min_count, cfg.byte_tokens)
    coverage = vocab_coverage(keep, [e.labels for e in heldout_examples(tokenizer, data)])
    before = model.args.output_size
    return prune_vocab(model, keep), {"output_rows_before": before, "output_rows_after": len(keep),
                                      "heldout_coverage": round(coverage, 5)}


def prune(model: Transformer, tokenizer, cfg: PruneConfig, progress: bool = False) -> tuple[Transformer, dict]:
    """Apply the steps `cfg` asks for -> (pruned model, report). The report holds the shape and parameter
    counts before and after, what each step did (layers dropped, vocabulary coverage, ...) and its time.

    The structured steps leave `model` intact; magnitude / 2:4 alone zero its weights in place."""
    t_start = time.perf_counter()
    report: dict = {"config": asdict(cfg), "before": shape_of(model), "steps": []}
    calib = None
    if cfg.n_layers is not None or cfg.width:
        from kuaida.train.data import DataConfig

        calib = calibration_batches(tokenizer, cfg.calib_samples, cfg.calib_seq_len, cfg.seed,
                                    DataConfig(source=cfg.calib_from))
    steps = [
        ("depth", cfg.n_layers is not None, lambda m: _depth(m, calib, cfg, progress)),
        ("width", cfg.width, lambda m: (prune_width(m, calib, cfg.intermediate_size, cfg.n_kv_heads, cfg.n_heads,
                                                    progress=progress), {})),
        ("vocab", cfg.vocab_from is not None, lambda m: _vocab(m, tokenizer, cfg)),
        ("magnitude", cfg.sparsity > 0, lambda m: (prune_magnitude(m, cfg.sparsity), {})),
        ("2:4", cfg.two_four, lambda m: (prune_2_4(m), {})),
    ]
    for name, wanted, step in steps:
        if wanted:
            t0 = time.perf_counter()
            model, info = step(model)
            report["steps"].append({"step": name, **info, "seconds": round(time.perf_counter() - t0, 2)})
    report["after"] = shape_of(model)
    if cfg.sparsity or cfg.two_four:
        report["after"]["sparsity"] = round(sparsity_of(model), 4)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    return model, report


_TABLE_ROWS = (("blocks", "n_layers"), ("MLP channels", "intermediate_size"), ("query heads", "n_heads"),
               ("KV heads", "n_kv_heads"), ("output rows", "output_size"), ("parameters", "params"),
               ("read per token", "decode_params"))


def report_table(report: dict) -> Table:
    """A rich table of what `prune` changed: shapes and parameter counts before / after / ratio, then one
    row per step with what it did and its time."""
    table = Table(title="kuaida prune", show_edge=False)
    for column in ("", "before", "after", "after / before"):
        table.add_column(column, justify="right" if column else "left")
    before, after = report["before"], report["after"]
    for label, key in _TABLE_ROWS:
        table.add_row(label, f"{before[key]:,}", f"{after[key]:,}", f"{after[key] / before[key]:.3f}")
    if "sparsity" in after:
        table.add_row("zero weights", "", f"{after['sparsity']:.1%}", "zeros only: no CPU speed-up")
    table.add_section()
    for step in report["steps"]:
        facts = {k: v for k, v in step.items() if k not in ("step", "seconds", "layer_importance", "layers_kept")}
        table.add_row(f"{step['step']} ({step['seconds']:.1f} s)", "", "",
                      ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in facts.items()))
    table.add_row("total", "", "", f"{report['seconds']:.1f} s")
    return table
