"""int8 matmuls on AVX2: the 15-bit integer kernel, int8_linear_rows16 (16-bit activations) and
dequantize + fp32 GEMM, over the default model's 30 layers (random weights, each layer its own, no output
layer), 2 threads, paths taking turns in one process. Prints a Markdown row per row count: ms per forward,
median of 7.

    python benchmarks/scripts/rows16_ab.py 1 2 4 8 16 48 128 192 256

Results: benchmarks/results/kernels.md ("int8 on AVX2 with 16-bit activations").
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kuaida import kernels
from kuaida.kernels import reference

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30


def main() -> None:
    ext = kernels._load()
    torch.manual_seed(0)
    weights = [reference.quantize_int8(torch.randn(n, k) * 0.05, 32) for n, k in SHAPES]

    def gemm(x, q, d):
        return F.linear(x, ext.int8_dequantize(q, d, kernels.weight_buffer(*q.shape, torch.float32), False))

    paths = {"15-bit kernel": lambda x, q, d: ext.int8_linear(x, q, d, None, False),
             "rows16": lambda x, q, d: ext.int8_linear_rows16(x, q, d, None),
             "fp32 GEMM": gemm}
    print("| rows | " + " | ".join(paths) + " |")
    print("| --- |" + " --- |" * len(paths))
    for m in [int(a) for a in sys.argv[1:]] or [1, 8, 48]:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        times: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(7):
            for name, op in paths.items():
                t0 = time.perf_counter()
                for q, d in weights:
                    op(xs[q.shape[1]], q, d)
                times[name].append((time.perf_counter() - t0) * 1e3)
        print(f"| {m} | " + " | ".join(f"{statistics.median(v):.1f}" for v in times.values()) + " |")


if __name__ == "__main__":
    main()
