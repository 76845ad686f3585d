"""Fine-tune a model on conversations (full or LoRA), reporting held-out perplexity before and after.

    model, report = finetune(model, tokenizer, FinetuneConfig(method="lora", train=TrainConfig(budget_s=600)))

The loss is next-token cross-entropy on the assistant's reply tokens only (kuaida.train.data labels).
A model with a pruned output vocabulary is trained on its kept columns (`full_vocab=False`), its labels
mapped onto them; reply tokens it cannot produce are left out and counted.
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
from kuaida.train.data import IGNORE, Batch, DataConfig, batches, heldout_examples, train_examples
from kuaida.train.loop import TrainConfig, train
from kuaida.train.lora import LORA_TARGETS, apply_lora, lora_parameters, merge_lora
from kuaida.train.losses import CrossEntropyLoss, kept_labels

log = logging.getLogger(__name__)

METHODS = ("full", "lora")


@dataclass
class FinetuneConfig:
    method: str = "full"  # "full": every weight trains; "lora": low-rank adapters, merged at the end
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(budget_s=600.0))
    eval_samples: int | None = 200  # held-out conversations scored before and after (None: all)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(f"unknown fine-tuning method {self.method!r} (known: {', '.join(METHODS)})")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise InvalidArgumentError(f"eval_samples must be >= 1 (or None for all), got {self.eval_samples}")


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] (labels[b, t] is the token at t) -> targets [B, T] of each position's prediction
    (the label at t + 1; IGNORE at the last position). Shifting the labels, not the logits, avoids a
    copy of the [B, T, vocab] logits."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


_CE = CrossEntropyLoss()


def lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Cross-entropy on the assistant tokens (a loop.LossFn): (mean loss, counted tokens, metrics)."""
    args = getattr(D.unwrap(model), "args", None)
    output_ids = getattr(args, "output_ids", None)
    targets = next_token_targets(batch.labels)
    metrics: dict[str, float] = {}
    if output_ids is not None:
        logits = model(batch.input_ids, full_vocab=False)  # [B, T, kept]
        targets, dropped = kept_labels(targets, output_ids, args.vocab_size)
        metrics["pruned_targets"] = float(dropped)
    else:
        logits = model(batch.input_ids)  # [B, T, vocab]
    n = int((targets != IGNORE).sum())
    return _CE(logits, None, targets), n, metrics


def finetune(model: nn.Module, tokenizer: Any, cfg: FinetuneConfig, *, progress: bool = True
             ) -> tuple[nn.Module | None, dict[str, Any]]:
    """Fine-tune `model` (in place) on cfg.data and return (trained model, report). Under torchrun
    every rank calls it; the report's perplexities are computed on rank 0, and under FSDP the trained
    model comes back on rank 0 only (None elsewhere)."""
    info = D.init_distributed()
    train_set = train_examples(tokenizer, cfg.data)
    held = heldout_examples(tokenizer, cfg.data, cfg.eval_samples)
    log.info("fine-tuning (%s) on %d conversations, %d held out", cfg.method, len(train_set), len(held))
    before = _perplexity(model, held) if info.is_main else None
    params = None
    if cfg.method == "lora":
        torch.manual_seed(cfg.train.seed)  # the same adapters on every rank (FSDP shards, never broadcasts)
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
        params = lora_parameters(model)
    n_trainable = sum(p.numel() for p in (params or model.parameters()))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = batches(train_set, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank, world=info.world,
                   pad_id=pad_id)
    result = train(model, lm_loss, data, cfg.train, params=params, progress=progress)
    trained = result.model
    if trained is not None and cfg.method == "lora":
        merge_lora(trained)
    after = _perplexity(trained, held) if info.is_main else None
    report = {
        "method": cfg.method, "trainable_parameters": n_trainable, "processes": info.world,
        "steps": result.steps, "seconds": result.seconds, "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s, "reply_tokens": result.loss_tokens,
        "losses": result.losses, "final_loss": result.final_loss,
        "stopped_by": result.stopped_by, "resumed_from": result.resumed_from,
        "train_conversations": len(train_set), "heldout_conversations": len(held),
        "perplexity_before": before, "perplexity_after": after,
        "data": asdict(cfg.data), "config": {k: v for k, v in asdict(cfg).items() if k != "data"},
    }
    if before and after:
        log.info("held-out perplexity %.3f -> %.3f", before["perplexity"], after["perplexity"])
    return trained, report


def finetune_and_save(model_spec: str, out_dir: str | Path, cfg: FinetuneConfig, *, overwrite: bool = False,
                      progress: bool = True) -> dict[str, Any]:
    """Load `model_spec` (load_model), fine-tune it and save it to out_dir on rank 0 (save_model).
    Checkpoints go to cfg.train.checkpoint_dir (default: `<out_dir>.checkpoints`), removed after a
    successful save. Returns the report (with "out_dir")."""
    from kuaida.model import load_model
    from kuaida.model.save import check_target, save_model

    out = Path(out_dir).expanduser()
    check_target(out, overwrite)  # fail now, not after the training
    loaded = load_model(model_spec)
    if loaded.backend != "native":
        raise UnsupportedModelError(f"{loaded.source}: fine-tuning needs a Llama-family model (native backend)")
    if cfg.train.checkpoint_dir is None:
        cfg = replace(cfg, train=replace(cfg.train, checkpoint_dir=str(out.with_name(out.name + ".checkpoints"))))
    model, report = finetune(loaded.model, loaded.tokenizer, cfg, progress=progress)
    if D.is_main():
        history = {"step": "finetune", "from": loaded.source, "method": cfg.method, "steps": report["steps"],
                   "data": cfg.data.source, "perplexity_before": report["perplexity_before"],
                   "perplexity_after": report["perplexity_after"]}
        save_model(model.cpu(), loaded.tokenizer, out, extra={"history": [history]}, overwrite=overwrite)
        shutil.rmtree(cfg.train.checkpoint_dir, ignore_errors=True)
    D.barrier()
    return {**report, "out_dir": str(out)}


def _perplexity(model: nn.Module, examples) -> dict[str, Any]:
    """kuaida.bench.quality's held-out perplexity (imported here: bench sits above train)."""
    from kuaida.bench.quality import perplexity

    was_training = model.training
    model.eval()
    try:
        return perplexity(model, examples, progress=False).to_dict()
    finally:
        model.train(was_training)
