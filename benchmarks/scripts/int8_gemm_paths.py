"""The three int8 matmul paths over the default model's layer shapes, ms per forward of M rows.

    python benchmarks/scripts/int8_gemm_paths.py [THREADS] [M ...]     # default: 2 threads, M = 4 .. 64

30 layers x 4 shapes, each with its own random int8 weights (group 32), so the weights stream from memory
as in a real forward; median of 5. Paths: the integer kernel (qgemm.cpp, AVX-512 VNNI), dequantize into a
bf16 buffer + oneDNN bf16 GEMM, and the fused AVX-512 BF16 kernel (attention.cpp int8_linear_bf16).
Results: benchmarks/results/kernels.md, "Fused int8 prefill GEMM".
"""
import statistics as st
import sys
import time

import torch

from kuaida import kernels
from kuaida.kernels import reference

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down: [N, K]


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    rows = [int(a) for a in sys.argv[2:]] or [4, 8, 12, 16, 19, 24, 32, 48, 64]
    fused_ext, qgemm = kernels._load("attention"), kernels._load()
    layers = [[reference.quantize_int8(torch.randn(n, k), 32) for n, k in SHAPES] for _ in range(30)]

    def run(f, m: int, reps: int = 5) -> float:
        xs = [torch.randn(m, k) for _, k in SHAPES]
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for layer in layers:
                for x, (q, d) in zip(xs, layer):
                    f(x, q, d)
            times.append(time.perf_counter() - t)
        return st.median(times) * 1e3

    def dequant_gemm(x, q, d):
        return kernels._gemm(x, qgemm.int8_dequantize(q, d, kernels.weight_buffer(*q.shape, torch.bfloat16),
                                                      True), None)

    for m in rows:
        a = run(lambda x, q, d: qgemm.int8_linear(x, q, d, None, True), m)
        b = run(dequant_gemm, m)
        c = run(lambda x, q, d: fused_ext.int8_linear_bf16(x, q, d, None), m)
        print(f"M={m}: integer kernel {a:.1f}  dequantize+oneDNN {b:.1f}  fused {c:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
