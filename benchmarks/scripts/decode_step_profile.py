"""Where a batched decode step's time goes: the default model (int8, as the server loads it), one
DecodePlan step of B rows at L tokens of history (the first 403 a shared system prompt, read once), each
kernel call timed by a wrapper. Prints ms per step by op: the mean over 10 steps after 2 warm-up ones.

    B=8 L=840 python benchmarks/scripts/decode_step_profile.py
    B=1 L=1200 python benchmarks/scripts/decode_step_profile.py

Results: benchmarks/results/kernels.md ("int8 decode with bf16 dot products").
"""
import collections
import os
import time

import torch

from kuaida import kernels
from kuaida.bot import load_weights
from kuaida.model.fused import decode_plan

T: dict[str, float] = collections.defaultdict(float)


def timed(name, f):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = f(*args, **kwargs)
        T[name] += time.perf_counter() - t
        return out
    return wrapper


def main() -> None:
    B, L = int(os.environ.get("B", 8)), int(os.environ.get("L", 840))
    model = load_weights("default", "int8").model
    cache = model.new_cache(batch=max(B, 1), max_seq=L + 8)
    g = torch.Generator().manual_seed(0)
    for t in cache.k + cache.v:  # random history, the first 403 positions a copy of row 0's
        t[:, :, :L].copy_(torch.randn(t[:, :, :L].shape, generator=g).to(t.dtype))
        t[:, :, :403] = t[0:1, :, :403]
    plan = decode_plan(model)
    glue = kernels.glue()
    names = ("rms_norm", "rope_qkv", "silu_mul")
    ops = type("Glue", (), {n: staticmethod(timed(n, getattr(glue, n))) for n in names})
    kernels.glue = lambda: ops  # DecodePlan looks it up per call
    plan.layers = [(n1, e1, timed("qkv", qkv), timed("o", o), n2, e2, timed("gate_up", gu), timed("down", dn))
                   for (n1, e1, qkv, o, n2, e2, gu, dn) in plan.layers]
    plan.lm_head = timed("lm_head", plan.lm_head)
    cache.decode = timed("attention + KV write (cache.decode)", cache.decode)
    tokens, pos, rows = torch.randint(0, 1000, (B, 1)), torch.full((B, 1), L), torch.arange(B)
    srcs, shared = torch.zeros(B, dtype=torch.long), torch.full((B,), 403 if B > 1 else 0)
    steps = []
    for r in range(12):
        if r == 2:
            T.clear()
            steps.clear()
        t = time.perf_counter()
        with torch.inference_mode(), kernels.row_independent(), cache.sharing(srcs, shared):
            plan(tokens, pos, cache, rows)
        steps.append(time.perf_counter() - t)
    n = len(steps)
    print(f"batch {B}, {L} tokens of history: step {sum(steps) / n * 1e3:.2f} ms")
    for name, v in sorted(T.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {v / n * 1e3:.2f} |")
    print(f"| other (Python, embedding, residual adds) | {(sum(steps) - sum(T.values())) / n * 1e3:.2f} |")


if __name__ == "__main__":
    main()
