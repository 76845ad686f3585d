"""Huge pages on or off (kuaida.model.memory), one process: the default model int8 loaded twice as the
server loads it, one copy and its KV cache with KUAIDA_NO_HUGE_PAGES=1, decode steps taking turns.

    python benchmarks/scripts/huge_pages_ab.py [ROUNDS]     # default 25

Steps (DecodePlan, row-independent kernels): batch 1 at 1,200 tokens of history; batch 8 at 840 with a
403-token prompt shared (read once). Prints a Markdown table of median ms per step. Results:
benchmarks/results/kernels.md.
"""
import os
import statistics
import sys
import time

import torch

from kuaida import kernels
from kuaida.bot import load_weights
from kuaida.model.fused import decode_plan

CASES = [("batch 1, 1,200 tokens", 1, 1200, False), ("batch 8, 840 tokens, shared prompt", 8, 840, True)]


def build(huge: bool):
    if huge:
        os.environ.pop("KUAIDA_NO_HUGE_PAGES", None)
    else:
        os.environ["KUAIDA_NO_HUGE_PAGES"] = "1"
    model = load_weights("default", "int8").model
    cache = model.new_cache(batch=16, max_seq=4096)
    g = torch.Generator().manual_seed(0)
    for t in cache.k + cache.v:
        t[:, :, :1300].copy_(torch.randn(t[:, :, :1300].shape, generator=g).to(t.dtype))
        t[:, :, :403] = t[0:1, :, :403]
    return decode_plan(model), cache


def step(plan, cache, B: int, L: int, shared: bool) -> None:
    tokens, pos, rows = torch.randint(0, 1000, (B, 1)), torch.full((B, 1), L), torch.arange(B)
    srcs, n = torch.zeros(B, dtype=torch.long), torch.full((B,), 403 if shared else 0)
    with torch.inference_mode(), kernels.row_independent(), cache.sharing(srcs, n):
        plan(tokens, pos, cache, rows)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 25
    variants = {"4 KiB pages": build(False), "huge pages": build(True)}
    times = {(v, c[0]): [] for v in variants for c in CASES}
    for _ in range(rounds):
        for case in CASES:
            for name, (plan, cache) in variants.items():
                t = time.perf_counter()
                step(plan, cache, *case[1:])
                times[(name, case[0])].append(time.perf_counter() - t)
    print("| step | 4 KiB pages ms | huge pages ms | speedup |\n| --- | --- | --- | --- |")
    for case in CASES:
        a, b = (statistics.median(times[(v, case[0])][3:]) * 1e3 for v in variants)
        print(f"| {case[0]} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
