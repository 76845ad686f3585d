"""Distillation against plain fine-tuning at equal *tokens*: which loss learns more per training token?

The default `kuaida optimize` recipe compares the two at an equal 10-minute budget, where the teacher's
forward pass costs distillation ~40 % of its tokens. This script takes the budget out: the recipe's
pruned student is trained for a fixed number of optimizer steps (the same batches in the same order)
with cross-entropy only and with distillation variants, and each is scored on the held-out split.

    python benchmarks/scripts/kd_vs_ce.py --steps 80 > kd-vs-ce.txt     # ~25 min on 2 cores
    python benchmarks/scripts/kd_vs_ce.py --steps 300 --arms recipe      # a longer budget, two arms only
    python benchmarks/scripts/kd_vs_ce.py --steps 330 --ratio 0.65 --arms kd --lr 1e-3   # one arm, one rate

Without --lr the student trains at the recipe's rate: 1e-3 since 2026-12-07. Results files from before
(kd-vs-ce-steps, -long, -first) used 3e-4: add --lr 3e-4 to rerun them as they were.

Equal *time* without a clock: distillation runs `--ratio` x CE's steps, the ratio of their tokens/s
(0.65: 519 against 800 tok/s in benchmarks/results/optimize-kd-t1.md, teacher projection included), so
the comparison stands for a budget of CE's steps however busy the machine is.

Arms: CE for N and 0.6 N steps (0.6: distillation's measured tokens/s relative to CE), and three
distillation losses for 0.6 N steps. Held-out perplexities are deterministic for a given machine (seeded
data order); the tokens/s printed are only as quiet as the machine was.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch

from kuaida.bench.quality import perplexity
from kuaida.compress.prune import prune
from kuaida.model.loader import load_model
from kuaida.optimize import OptimizeConfig, finetune_baseline
from kuaida.train.data import heldout_examples
from kuaida.train.distill import distill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="default", help="a recipe file, or default: the shipped one")
    ap.add_argument("--steps", type=int, default=80, help="CE's steps; distillation gets 0.6x")
    ap.add_argument("--teacher-steps", type=int, default=60, help="teacher correction (CE on the data)")
    ap.add_argument("--eval-samples", type=int, default=60)
    ap.add_argument("--ratio", type=float, default=0.6, help="distillation's steps per CE step")
    ap.add_argument("--arms", choices=["all", "recipe", "ce", "kd", "ce-first"], default="all",
                    help="recipe: only CE and the recipe's loss (T = 2, alpha = 0.5); ce, kd: one of those "
                         "two (to run them as two processes side by side); ce-first: the recipe's loss after "
                         "CE alone for each share in --ce-first of the time (no CE arm)")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate of the student's training (default: the recipe's)")
    ap.add_argument("--ce-first", default="0.3,0.5",
                    help="shares of the time for CE alone before distilling (with --arms ce-first)")
    ap.add_argument("--teacher-cache", default=None,
                    help="a file for the corrected teacher's weights: read if it exists, else written (saves "
                         "the correction's minutes when arms run as separate processes)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = OptimizeConfig.from_yaml(args.recipe)
    teacher = load_model(cfg.teacher)
    tok = teacher.tokenizer
    held = heldout_examples(tok, cfg.distill.data, args.eval_samples)

    def ppl(model) -> float:
        return round(perplexity(model.eval(), held, progress=False).to_dict()["perplexity"], 2)

    def for_steps(steps: int, **loss) -> object:
        train = dataclasses.replace(cfg.distill.train, budget_s=None, steps=steps, checkpoint_dir=None)
        if loss.pop("teacher", False):  # teacher correction at its own rate
            train = dataclasses.replace(train, lr=cfg.correction_lr())
        elif args.lr is not None:
            train = dataclasses.replace(train, lr=args.lr)
        return dataclasses.replace(cfg.distill, evaluate=False, train=train, **loss)

    pruned, _ = prune(teacher.model, tok, cfg.prune, progress=False)
    print("pruned student, held-out PPL", ppl(pruned), flush=True)
    if args.teacher_cache and Path(args.teacher_cache).exists():
        corrected = copy.deepcopy(teacher.model)
        corrected.load_state_dict(torch.load(args.teacher_cache))
    else:
        corrected = finetune_baseline(teacher.model, tok, for_steps(args.teacher_steps, teacher=True), False)
        if args.teacher_cache:
            torch.save(corrected.state_dict(), args.teacher_cache)
    print("teacher, corrected, held-out PPL", ppl(corrected), flush=True)
    short = int(args.steps * args.ratio)
    arms = [("CE", args.steps, {"alpha": 1.0}), ("CE", short, {"alpha": 1.0}),
            ("KD T=2 alpha=0.5", short, {"alpha": 0.5, "temperature": 2.0}),
            ("KD T=1 alpha=0.5", short, {"alpha": 0.5, "temperature": 1.0}),
            ("KD T=1 alpha=0", short, {"alpha": 0.0, "temperature": 1.0})]
    if args.arms in ("recipe", "ce", "kd"):
        arms = {"recipe": [arms[0], arms[2]], "ce": [arms[0]], "kd": [arms[2]]}[args.arms]
    if args.arms == "ce-first":
        # Equal time: a share f of CE's time trains f N CE steps, the rest (1 - f) N ratio distillation
        # steps; the switch falls at the same share of the (shorter) step count.
        arms = []
        for f in (float(x) for x in args.ce_first.split(",")):
            ce, kd = round(f * args.steps), round((1 - f) * args.steps * args.ratio)
            arms.append((f"CE {ce} steps then KD T=2 alpha=0.5", ce + kd,
                         {"alpha": 0.5, "temperature": 2.0, "ce_first": ce / (ce + kd)}))
    for name, steps, loss in arms:
        t0 = time.perf_counter()
        student, report = distill(corrected, copy.deepcopy(pruned), tok, for_steps(steps, **loss),
                                  progress=False)
        print(f"{name}, {steps} steps: held-out PPL {ppl(student)}, {report['tokens']} tokens, "
              f"{report['tokens_per_s']:.0f} tok/s, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
