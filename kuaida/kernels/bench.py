"""Micro-benchmark of the matmuls of one SmolLM2-135M forward, per weight format.

    python -m kuaida.kernels.bench --rows 1 43 256 --threads 2

Each of the 30 layers gets its own random weights (so they stream from memory, as in a real model), plus
the 49152 x 576 output layer. Prints a Markdown table: median ms per forward of M rows, ms per token, and
effective GB/s of weight bytes read.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kuaida import kernels
from kuaida.kernels import reference

# (out, in) of the linear layers of one SmolLM2-135M block: q, k, v, o, gate, up, down.
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LM_HEAD = (49152, 576)
N_LAYERS = 30

Linear = Callable[[torch.Tensor], torch.Tensor]


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def make_format(name: str, w: torch.Tensor) -> tuple[Linear, int]:
    """A matmul x [M, K] -> [M, N] for weight w [N, K] stored as `name`, and its weight bytes."""
    ext = kernels._load()
    if name == "fp32":
        return (lambda x: F.linear(x, w)), _nbytes(w)
    if name.startswith("bf16"):
        wb = w.bfloat16()
        if name == "bf16":
            return (lambda x: F.linear(x.bfloat16(), wb).float()), _nbytes(wb)
        return (lambda x: F.linear(x, wb.float())), _nbytes(wb)  # "bf16-upcast"
    if name.startswith("int8"):
        q, d = reference.quantize_int8(w, 32)
        return _int_op(name, ext.int8_linear, ext.int8_dequantize, q, d), _nbytes(q, d)
    q, d, m = reference.quantize_int4(w, 32)
    return _int_op(name, ext.int4_linear, ext.int4_dequantize, q, d, m), _nbytes(q, d, m)


def _int_op(name: str, kernel, dequantize, *wargs: torch.Tensor) -> Linear:
    """int8 / int4: the integer kernel; -gemm: dequantize to fp32 + GEMM; -bf16: to bf16 + bf16 GEMM."""
    if name.endswith("-gemm"):
        return lambda x: F.linear(x, dequantize(*wargs, False))
    if name.endswith("-bf16"):
        return lambda x: F.linear(x.bfloat16(), dequantize(*wargs, True)).float()
    return lambda x: kernel(x, *wargs, None)


def build(name: str, with_head: bool) -> tuple[list[tuple[Linear, int]], int]:
    """The forward's matmuls as (fn, in_features) and total weight bytes."""
    shapes = LAYER_SHAPES * N_LAYERS + ([LM_HEAD] if with_head else [])
    ops, total = [], 0
    for n, k in shapes:
        fn, nbytes = make_format(name, torch.randn(n, k) * 0.02)
        ops.append((fn, k))
        total += nbytes
    return ops, total


def time_forwards(formats: dict[str, list[tuple[Linear, int]]], rows: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward (every matmul once on `rows` rows), `repeats` times per format. Formats take
    turns within each repeat, so load from other processes skews them alike."""
    xs = {k: torch.randn(rows, k) for k in {k for n, k in LAYER_SHAPES + [LM_HEAD]}}
    times: dict[str, list[float]] = {name: [] for name in formats}
    for _ in range(repeats + 1):  # the first round warms up thread pools and the allocator
        for name, ops in formats.items():
            t0 = time.perf_counter()
            for fn, k in ops:
                fn(xs[k])
            times[name].append(time.perf_counter() - t0)
    return {name: t[1:] for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 43, 256])
    p.add_argument("--formats", nargs="+",
                   default=["fp32", "bf16", "bf16-upcast", "int8", "int8-gemm", "int4", "int4-gemm"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-head", action="store_true", help="leave out the 49152 x 576 output layer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("the kuaida kernels are not available on this machine")
    built = {name: build(name, not args.no_head) for name in args.formats}
    formats = {name: ops for name, (ops, _) in built.items()}
    print(f"threads={args.threads}, lm_head={'no' if args.no_head else 'yes'}, {args.repeats} repeats\n")
    print("| format | M | ms / forward (median) | best | ms / token | weight MB | GB/s (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rows in args.rows:
        for name, ts in time_forwards(formats, rows, args.repeats).items():
            t, nbytes = statistics.median(ts), built[name][1]
            print(f"| {name} | {rows} | {t * 1e3:.1f} | {min(ts) * 1e3:.1f} | {t * 1e3 / rows:.2f} "
                  f"| {nbytes / 1e6:.0f} | {nbytes / t / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
