"""The training loop shared by fine-tuning and distillation.

    result = train(model, loss_fn, batches(examples, 8, rank=r, world=w), TrainConfig(budget_s=600))

AdamW with linear warmup and cosine decay to min_lr_ratio * lr, gradient clipping, gradient
accumulation, a step count or a time budget, a rich progress bar, and atomic checkpoints (model,
optimizer, step, RNG, data position) every checkpoint_every_s, at the end and on Ctrl-C; resume=True
continues from the latest one. Under torchrun the model is wrapped (DDP / FSDP / HSDP) here, rank 0
decides when to stop and checkpoint, and every logged loss is the mean over all ranks' tokens.

Losses are token-weighted over the global batch: each micro-batch contributes loss * n_tokens, the
token count is summed over ranks, and gradients are scaled by world / total_tokens (DDP and FSDP
average gradients over ranks). So any split of a batch over processes and micro-batches gives the same
update as one process on the whole batch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kuaida.errors import InvalidArgumentError
from kuaida.train import distributed as D

log = logging.getLogger(__name__)

# loss_fn(model, batch) -> (loss: mean over the micro-batch's counted tokens, n_tokens, metrics)
LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, int, dict[str, float]]]
LATEST = "latest"  # file naming the newest complete checkpoint directory


def parse_duration(text: str) -> float:
    """"90s", "10m", "1h", "1h30m", "1.5h" or plain seconds ("600") -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None:
        raise InvalidArgumentError(f"cannot read {text!r} as a duration; write e.g. 90s, 10m, 1h or 1h30m")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    total = h * 3600 + m * 60 + sec
    if total <= 0:
        raise InvalidArgumentError(f"duration {text!r} must be positive")
    return total


@dataclass
class TrainConfig:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    batch_size: int = 8  # global sequences per optimizer step (over all processes)
    micro_batch: int = 0  # sequences per forward pass and process; 0 = batch_size // world (no accumulation)
    steps: int | None = None  # stop after this many optimizer steps ...
    budget_s: float | None = None  # ... or after this many seconds of training (both: whichever first)
    seed: int = 0
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every_s: float = 300.0
    resume: bool = True  # continue from checkpoint_dir's latest checkpoint when there is one
    parallel: str = "auto"  # "auto" | "none" | "ddp" | "fsdp" | "hsdp"
    # Mixed precision: "bf16" runs the forward passes (student and teacher) under bf16 autocast, weights
    # and optimizer in fp32; "auto" does so only where bf16 matmuls are native (CUDA, CPUs with
    # AVX512-BF16: ~2x the tokens/s of fp32 on this machine's Zen 5), since elsewhere bf16 is slower.
    amp: str = "none"

    def __post_init__(self) -> None:
        if self.steps is None and self.budget_s is None:
            raise InvalidArgumentError("give a number of steps or a time budget (e.g. --steps 100 or --budget 10m)")
        if self.steps is not None and self.steps < 1:
            raise InvalidArgumentError(f"steps must be >= 1, got {self.steps}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise InvalidArgumentError(f"time budget must be > 0 s, got {self.budget_s}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise InvalidArgumentError(f"need lr > 0 and 0 <= min_lr_ratio <= 1 (lr={self.lr}, "
                                       f"min_lr_ratio={self.min_lr_ratio})")
        if self.batch_size < 1 or self.micro_batch < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise InvalidArgumentError("batch_size must be >= 1; micro_batch, warmup_steps, grad_clip >= 0")
        if self.checkpoint_every_s <= 0 or self.log_every < 1:
            raise InvalidArgumentError("checkpoint_every_s must be > 0 and log_every >= 1")
        D.resolve_strategy(self.parallel, 1)  # validates the name
        if self.amp not in ("none", "bf16", "auto"):
            raise InvalidArgumentError(f"amp must be none, bf16 or auto, got {self.amp!r}")

    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast context for forward passes on `device` (disabled unless amp asks for it)."""
        native = device.type == "cuda" or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        on = self.amp == "bf16" or (self.amp == "auto" and native)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)

    def progress(self, step: int, elapsed: float) -> float:
        """The share of the training done before optimizer step `step` (0-based), after `elapsed` seconds:
        of the steps or of the time budget, whichever is further along; in [0, 1]."""
        done = 0.0
        if self.steps is not None:
            done = step / self.steps
        if self.budget_s is not None:
            done = max(done, elapsed / self.budget_s)
        return min(1.0, done)

    def lr_at(self, step: int, elapsed: float) -> float:
        """Learning rate for optimizer step `step` (0-based) after `elapsed` seconds of training."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        done = 0.0
        if self.steps is not None:
            done = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.budget_s is not None:
            done = max(done, elapsed / self.budget_s)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    tokens: int  # real (unpadded) input tokens trained on, all ranks, in total
    seconds: float  # training time in total
    tokens_per_s: float  # this run's throughput (all ranks)
    losses: list[float]  # per step, token-weighted mean over all ranks
    final_loss: float  # mean of the last min(10, steps) losses
    model: nn.Module | None = None  # the trained model, unwrapped (under FSDP: gathered, on rank 0 only)
    loss_tokens: int = 0  # tokens the loss counted (e.g. assistant tokens), all ranks, in total
    resumed_from: int = 0  # the step the run started from
    stopped_by: str = "steps"  # "steps" | "budget"
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's loss_fn metrics (rank 0)


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    elapsed: float = 0.0
    losses: list[float] = field(default_factory=list)


def train(model: nn.Module, loss_fn: LossFn, batches_iter: Iterator, cfg: TrainConfig, *,
          params: list[nn.Parameter] | None = None, progress: bool = True) -> TrainResult:
    """Train `model` in place on batches from `batches_iter` (one per step: this rank's share of the
    global batch, e.g. data.batches(..., rank=r, world=w)). params: the parameters to train (default:
    those with requires_grad); the rest stay frozen. Use result.model afterwards: under FSDP the model
    passed in is left sharded, and result.model is a plain copy gathered on rank 0."""
    info = D.init_distributed()
    strategy = D.resolve_strategy(cfg.parallel, info.world)
    micro = _micro_batch(cfg, info.world)
    torch.manual_seed(cfg.seed)
    model.to(info.device)
    chosen = {id(p) for p in params} if params is not None else {id(p) for p in model.parameters() if p.requires_grad}
    names = [n for n, p in model.named_parameters() if id(p) in chosen]
    if not names:
        raise InvalidArgumentError("no parameter to train (all frozen?)")
    sharded = strategy in ("fsdp", "hsdp") and info.world > 1
    skeleton = D.meta_skeleton(model) if sharded else None
    wrapped = D.wrap_model(model, strategy)
    named = dict(D.unwrap(wrapped).named_parameters())
    trainable = [named[n] for n in names]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    log.info("training %d tensors (%.1fM parameters) with %s on %d process(es), micro-batch %d",
             len(trainable), sum(p.numel() for p in trainable) / 1e6, strategy, info.world, micro)
    state = _resume(cfg, wrapped, optimizer) if cfg.checkpoint_dir and cfg.resume else _State()
    for _ in range(state.step):  # data position: the batches the checkpointed steps consumed
        next(batches_iter)
    start_step = state.step
    run = _Run(cfg, wrapped, optimizer, trainable, info, state, micro, progress)
    try:
        metrics, stopped_by = run.loop(loss_fn, batches_iter)
    except KeyboardInterrupt:
        run.save_on_interrupt()
        raise
    if cfg.checkpoint_dir:
        save_checkpoint(Path(cfg.checkpoint_dir), wrapped, optimizer, state)
    plain = D.unwrap(wrapped)
    if skeleton is not None:
        full = D.full_model_state(wrapped)
        plain = D.load_into_skeleton(skeleton, full).to(info.device) if info.is_main else None
    n = min(10, len(state.losses))
    return TrainResult(
        steps=state.step, tokens=state.tokens, seconds=state.elapsed, tokens_per_s=run.tokens_per_s,
        losses=state.losses, final_loss=sum(state.losses[-n:]) / n if n else float("nan"), model=plain,
        loss_tokens=state.loss_tokens, resumed_from=start_step, stopped_by=stopped_by, metrics=metrics)


def _micro_batch(cfg: TrainConfig, world: int) -> int:
    if cfg.batch_size % world:
        raise InvalidArgumentError(f"batch size {cfg.batch_size} is not a multiple of {world} processes")
    rows = cfg.batch_size // world
    micro = cfg.micro_batch or rows
    if rows % micro:
        raise InvalidArgumentError(f"micro_batch {micro} does not divide the {rows} sequences per process")
    return micro


class _Run:
    """One training run's moving parts: the step, the stop/checkpoint decisions, the progress bar."""

    def __init__(self, cfg, wrapped, optimizer, trainable, info, state, micro, progress) -> None:
        self.cfg, self.model, self.optimizer, self.params = cfg, wrapped, optimizer, trainable
        self.info, self.state, self.micro = info, state, micro
        self.show = progress and info.is_main
        self.run_tokens, self.run_start, self.tokens_per_s = 0, time.perf_counter(), 0.0
        self.last_save = time.perf_counter()

    def loop(self, loss_fn: LossFn, batches_iter: Iterator) -> tuple[dict[str, float], str]:
        cfg, st = self.cfg, self.state
        metrics: dict[str, float] = {}
        base_elapsed, start = st.elapsed, st.step
        with _progress(self.show, cfg) as bar:
            task = bar.add_task("training", total=cfg.steps or cfg.budget_s, loss=float("nan"), tps=0.0)
            while not self._done():
                lr = cfg.lr_at(st.step, st.elapsed)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if hasattr(loss_fn, "set_progress"):  # a loss that changes over the run (distill's ce_first)
                    loss_fn.set_progress(cfg.progress(st.step, st.elapsed))
                loss, tokens, loss_tokens, metrics = self.step(loss_fn, next(batches_iter))
                st.step += 1
                st.tokens, st.loss_tokens = st.tokens + tokens, st.loss_tokens + loss_tokens
                st.losses.append(loss)
                self.run_tokens += tokens
                now = time.perf_counter()
                elapsed, stop, save = self._decide(base_elapsed, now, st.step - start)
                st.elapsed = elapsed
                self.tokens_per_s = self.run_tokens / max(1e-9, now - self.run_start)
                self._report(bar, task, loss, lr, metrics)
                if stop:
                    return metrics, "budget"
                if save and not self._done():  # the end writes its own checkpoint
                    save_checkpoint(Path(cfg.checkpoint_dir), self.model, self.optimizer, st)
                    self.last_save = time.perf_counter()
        spent = cfg.budget_s is not None and st.elapsed >= cfg.budget_s  # resumed with the budget spent
        return metrics, "budget" if spent else "steps"

    def _decide(self, base_elapsed: float, now: float, steps_run: int) -> tuple[float, bool, bool]:
        """Rank 0's clock decides (broadcast, so every rank agrees): elapsed seconds, stop (another step
        of the average length would overrun the budget), checkpoint now."""
        cfg = self.cfg
        run_s = now - self.run_start
        elapsed = base_elapsed + run_s
        stop = cfg.budget_s is not None and elapsed + run_s / max(1, steps_run) > cfg.budget_s
        save = bool(cfg.checkpoint_dir) and now - self.last_save >= cfg.checkpoint_every_s
        flags = torch.tensor([elapsed, stop, save], dtype=torch.float64, device=self.info.device)
        elapsed, stop, save = D.broadcast(flags).tolist()
        return elapsed, bool(stop), bool(save)

    def _done(self) -> bool:
        """Steps done, or (after a resume) the budget already spent; the same answer on every rank."""
        cfg, st = self.cfg, self.state
        return (cfg.steps is not None and st.step >= cfg.steps) or \
            (cfg.budget_s is not None and st.elapsed >= cfg.budget_s)

    def step(self, loss_fn: LossFn, batch) -> tuple[float, int, int, dict[str, float]]:
        """One optimizer step on this rank's share of the global batch, in micro-batches.
        Returns (mean loss over all ranks' counted tokens, real tokens, counted tokens, metrics)."""
        parts = _split(batch, self.micro)
        stats = torch.zeros(3, dtype=torch.float64, device=self.info.device)  # [sum loss*n, n, real tokens]
        metrics: dict[str, float] = {}
        for i, part in enumerate(parts):
            with D.no_grad_sync(self.model, skip=i < len(parts) - 1):
                with self.cfg.autocast(torch.device(self.info.device)):
                    loss, n, metrics = loss_fn(self.model, part.to(self.info.device))
                (loss.float() * n).backward()
            stats += torch.stack([loss.detach().double() * n, stats.new_tensor(n),
                                  stats.new_tensor(_real_tokens(part))])
        total_loss, n_total, real = D.all_reduce_sum(stats).tolist()
        if n_total > 0:
            # DDP/FSDP averaged the summed gradients over ranks: * world / tokens = the global token mean
            scale = self.info.world / n_total
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            if self.cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
                metrics = {**metrics, "grad_norm": float(getattr(norm, "full_tensor", lambda: norm)())}
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss / max(n_total, 1.0), int(real), int(n_total), metrics

    def _report(self, bar, task, loss: float, lr: float, metrics: dict[str, float]) -> None:
        st, cfg = self.state, self.cfg
        bar.update(task, completed=st.step if cfg.steps else min(st.elapsed, cfg.budget_s),
                   loss=loss, tps=self.tokens_per_s)
        if self.info.is_main and (st.step % cfg.log_every == 0 or st.step == 1):
            extra = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            log.info("step %d loss %.4f lr %.3g %.0f tok/s %s", st.step, loss, lr, self.tokens_per_s, extra)

    def save_on_interrupt(self) -> None:
        """Ctrl-C: save what the finished steps learned. A sharded model needs every rank to gather it,
        and the others are being interrupted too, so FSDP keeps its last periodic checkpoint."""
        if not self.cfg.checkpoint_dir:
            return
        if D.is_sharded(self.model):
            log.warning("interrupted under FSDP: keeping the last periodic checkpoint in %s",
                        self.cfg.checkpoint_dir)
            return
        if self.info.is_main:
            path = save_checkpoint(Path(self.cfg.checkpoint_dir), self.model, self.optimizer, self.state,
                                   collective=False)
            log.warning("interrupted: saved step %d to %s (resume continues from it)", self.state.step, path)


def _split(batch, micro: int) -> list:
    rows = batch.input_ids.shape[0]
    if micro >= rows:
        return [batch]
    return [type(batch)(*(None if t is None else t[i:i + micro] for t in vars(batch).values()))
            for i in range(0, rows, micro)]


def _real_tokens(batch) -> int:
    return batch.num_tokens if hasattr(batch, "num_tokens") else batch.input_ids.numel()


def _progress(show: bool, cfg: TrainConfig):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    done = MofNCompleteColumn() if cfg.steps else TextColumn("{task.completed:.0f}/{task.total:.0f} s")
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), done,
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not show)


# -- checkpoints ---------------------------------------------------------------------------------------
def save_checkpoint(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: _State, *,
                    collective: bool = True) -> Path | None:
    """Write step-N/ (model.safetensors, trainer.pt) under root atomically: into a temporary directory,
    renamed when complete, then `latest` is replaced to name it; older checkpoints are removed. With
    collective=True every rank must call it (FSDP gathers shards); only rank 0 writes."""
    model_state = D.full_model_state(model)
    optim_state = D.full_optimizer_state(model, optimizer)
    path = _write_checkpoint(root, model_state, optim_state, state) if D.is_main() else None
    if collective:
        D.barrier()  # nobody reads `latest` before it is complete
    return path


def _write_checkpoint(root: Path, model_state: dict, optim_state: dict, state: _State) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    for stale in root.glob(".step-*.tmp-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_file(_unshared(model_state), tmp / "model.safetensors")
    torch.save({"optimizer": optim_state, "step": state.step, "data_position": state.step,
                "tokens": state.tokens, "loss_tokens": state.loss_tokens, "elapsed": state.elapsed,
                "losses": state.losses, "rng": _rng_state()}, tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(json.dumps({"dir": final.name, "step": state.step}))
    os.replace(pointer, root / LATEST)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint: step %d -> %s", state.step, final)
    return final


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): give aliases their own copy."""
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.shape)
        out[k] = v.contiguous().clone() if key in seen else v.contiguous()
        seen.add(key)
    return out


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _resume(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> _State:
    """Load checkpoint_dir's latest checkpoint, read by rank 0 and broadcast; a fresh state when none."""
    root = Path(cfg.checkpoint_dir)
    found = None
    if D.is_main() and (root / LATEST).is_file():
        found = root / json.loads((root / LATEST).read_text())["dir"]
    found = D.broadcast_object(found)
    if found is None:
        return _State()
    model_state, trainer = {}, {"optimizer": {}}
    if D.is_main():
        model_state = load_file(found / "model.safetensors")
        trainer = torch.load(found / "trainer.pt", weights_only=True)
    try:
        D.load_full_state(model, optimizer, model_state, trainer["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise InvalidArgumentError(f"the checkpoint in {found} does not fit this model/optimizer ({e}); "
                                   "use another checkpoint directory or resume=False (--no-resume)") from e
    meta = D.broadcast_object({k: v for k, v in trainer.items() if k != "optimizer"})
    torch.set_rng_state(meta["rng"]["cpu"])
    if meta["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(meta["rng"]["cuda"])
    log.info("resuming from %s (step %d, %.0f s trained)", found, meta["step"], meta["elapsed"])
    return _State(step=meta["data_position"], tokens=meta["tokens"], loss_tokens=meta["loss_tokens"],
                  elapsed=meta["elapsed"], losses=list(meta["losses"]))
