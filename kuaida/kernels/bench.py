"""Micro-benchmark of the matmuls of one SmolLM2-135M forward, per weight format.

    python -m kuaida.kernels.bench --rows 1 43 256 --threads 2

Each of the 30 layers gets its own random weights (so they stream from memory, as in a real model), plus
the 49152 x 576 output layer, which sees only the last row (as in generation: prefill needs the last
logits only). Shapes are the model's fused ones: qkv 960x576, o 576x576, gate_up 3072x576, down
576x1536. Prints a Markdown table: median and best ms per forward of M rows, the sum of each matmul's best
time (for a machine shared with other processes), ms per token, and effective GB/s of weight bytes read.

Formats: fp32, bf16 (bf16 GEMM), bf16-upcast (fp32 GEMM on the upcast weight), int8 / int4 (the library's
ops, which pick the integer kernel or bf16 GEMM by row count), and to measure those choices:
-kernel (integer kernel at any M, AVX-512 VNNI path where the CPU has it), -avx2 (integer kernel, AVX2 path),
-bf16 (dequantize to bf16 + bf16 GEMM; -bf16-avx2: dequantize with the AVX2 code), -gemm (to fp32 + fp32
GEMM), int8-rows (the AVX-512 BF16 few-rows kernel, int8_linear_bf16_rows), int8-rows16 (the AVX2 kernel with
16-bit activations, int8_linear_rows16).
The library's AVX-512 paths follow KUAIDA_NO_AVX512 (set to 1 for the AVX2 ones everywhere).
"layers/head" uses one format for the 30 layers and another for the output layer, e.g. int4/int8 (what
`quantize(model, "int4")` builds).

--attention TxS ... times prefill attention instead: T new tokens at positions S - T .. S - 1 over an fp16
cache (SmolLM2-135M's heads: 9 query, 3 kv, head_dim 64; 30 layers, each its own cache), the SDPA path
(prefix copied to fp32, fp32 SDPA with a mask; also without the copy) against `kernels.prefill_attention`
(its AVX-512 BF16 kernel where the CPU has it, else the AVX2 fp32 one; KUAIDA_NO_BF16_ATTENTION=1 picks the
fp32 kernel there too):

    python -m kuaida.kernels.bench --attention 19x422 47x1272 60x1179 300x1179 1000x1000 --repeats 21

--decode SPEC ... times `kernels.decode_attention` (one batched decode step, 30 layers, fp16 caches of their
own): RxL = R rows of L keys each; RxL+P = the same, the first P keys of every row a copy of row 0's (a shared
system prompt), timed read per row and read once (srcs, shared); 1xLdK = one row at L keys with K prompt-
lookup drafts (1 + K entries at consecutive positions):

    python -m kuaida.kernels.bench --decode 1x1200 8x840 8x600+403 8x840+403 8x1200+403 1x1200d7 --repeats 21
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kuaida import kernels
from kuaida.kernels import reference

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in): qkv, o, gate_up, down
LM_HEAD = (49152, 576)
N_LAYERS = 30
DEFAULT_FORMATS = ["fp32", "bf16", "int8", "int4/int8", "int4"]

Linear = Callable[[torch.Tensor], torch.Tensor]


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _int_op(variant: str, ext, int4: bool, wargs: tuple[torch.Tensor, ...]) -> Linear:
    public = kernels.int4_linear if int4 else kernels.int8_linear
    kernel = ext.int4_linear if int4 else ext.int8_linear
    dequantize = ext.int4_dequantize if int4 else ext.int8_dequantize
    n, k = wargs[0].shape[0], wargs[0].shape[1] * (2 if int4 else 1)

    def deq(dtype: torch.dtype, avx512: bool | None = None) -> torch.Tensor:
        wide = kernels.avx512() if avx512 is None else avx512
        return dequantize(*wargs, kernels.weight_buffer(n, k, dtype), wide)

    return {
        "": lambda x: public(x, *wargs),
        "-kernel": lambda x: kernel(x, *wargs, None, kernels.avx512()),
        "-avx2": lambda x: kernel(x, *wargs, None, False),
        "-bf16": lambda x: F.linear(x.bfloat16(), deq(torch.bfloat16)).float(),
        "-bf16-avx2": lambda x: F.linear(x.bfloat16(), deq(torch.bfloat16, False)).float(),
        "-gemm": lambda x: F.linear(x, deq(torch.float32)),
        "-rows": lambda x: kernels._load("attention").int8_linear_bf16_rows(x, *wargs, None),
        "-rows16": lambda x: ext.int8_linear_rows16(x, *wargs, None),
    }[variant]


def make_op(fmt: str, w: torch.Tensor) -> tuple[Linear, int]:
    """A matmul x [M, K] -> [M, N] for weight w [N, K] stored as `fmt`, and its weight bytes."""
    if fmt == "fp32":
        return (lambda x: F.linear(x, w)), _nbytes(w)
    if fmt in ("bf16", "bf16-upcast"):
        wb = w.bfloat16()
        if fmt == "bf16":
            return (lambda x: F.linear(x.bfloat16(), wb).float()), _nbytes(wb)
        return (lambda x: F.linear(x, kernels.weight_buffer(*wb.shape, torch.float32).copy_(wb))), _nbytes(wb)
    kind, variant = fmt[:4], fmt[4:]
    wargs = reference.quantize_int4(w, 32) if kind == "int4" else reference.quantize_int8(w, 32)
    return _int_op(variant, kernels._load(), kind == "int4", wargs), _nbytes(*wargs)


def build(spec: str, with_head: bool) -> tuple[list[tuple[Linear, int]], int]:
    """The forward's matmuls as (fn, in_features), and total weight bytes. spec: "fmt" or "layers/head"."""
    layers, _, head = spec.partition("/")
    shapes = [(s, layers) for s in LAYER_SHAPES * N_LAYERS]
    shapes += [(LM_HEAD, head or layers)] if with_head else []
    ops, total = [], 0
    for (n, k), fmt in shapes:
        fn, nbytes = make_op(fmt, torch.randn(n, k) * 0.02)
        ops.append((fn, k))
        total += nbytes
    return ops, total


def time_forwards(formats: dict[str, list[tuple[Linear, int]]], rows: int,
                  repeats: int) -> dict[str, list[list[float]]]:
    """Seconds of each matmul of a forward (every matmul once on `rows` rows), `repeats` forwards per format:
    [repeats][matmuls]. Formats take turns within each repeat, so load from other processes skews them
    alike."""
    xs = [torch.randn(rows, k) for _, k in formats[next(iter(formats))]]  # one input per matmul
    if len(xs) > len(LAYER_SHAPES) * N_LAYERS:
        xs[-1] = xs[-1][-1:]  # the output layer: last row only
    times: dict[str, list[list[float]]] = {name: [] for name in formats}
    for _ in range(repeats + 1):  # the first round warms up thread pools and the allocator
        for name, ops in formats.items():
            forward = []
            for (fn, _), x in zip(ops, xs):
                t0 = time.perf_counter()  # ~0.1 us, against >= 10 us per matmul
                fn(x)
                forward.append(time.perf_counter() - t0)
            times[name].append(forward)
    return {name: t[1:] for name, t in times.items()}


ATTENTION_HEADS = (9, 3, 64)  # SmolLM2-135M: query heads, kv heads, head_dim


def time_attention(T: int, S: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per layer of each way to attend, one 30-layer sweep each per repeat (taking turns, so load
    from other processes skews them alike): "copy+SDPA" is what Transformer._attention runs without the
    kernel (KVCache.update's fp32 copy of the prefix, then SDPA with a mask), "SDPA" the same without the
    copy (the prefix already fp32), "kernel" kernels.prefill_attention on the fp16 cache."""
    H, Hkv, D = ATTENTION_HEADS
    caches = [(torch.randn(1, Hkv, S, D).half(), torch.randn(1, Hkv, S, D).half()) for _ in range(N_LAYERS)]
    fp32 = [(k.float(), v.float()) for k, v in caches]
    q = torch.randn(1, T, H, D).transpose(1, 2)  # [1, H, T, D] with the model's strides
    positions = torch.arange(S - T, S)
    mask = torch.arange(S)[None, None, None, :] <= positions[None, None, :, None]  # [1, 1, T, S]

    def sdpa(k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    ways = {"copy+SDPA": (lambda k, v: sdpa(k.float(), v.float()), caches), "SDPA": (sdpa, fp32),
            "kernel": (lambda k, v: kernels.prefill_attention(q[0], k, v, 0, positions), caches)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(repeats + 1):  # the first round warms up
        for name, (fn, layers) in ways.items():
            t0 = time.perf_counter()
            for k, v in layers:
                fn(k, v)
            if i:
                times[name].append((time.perf_counter() - t0) / N_LAYERS)
    return times


def attention_main(shapes: list[str], repeats: int) -> None:
    kind = kernels.prefill_kernel(torch.float16, ATTENTION_HEADS[2])
    if kind is None:
        raise SystemExit("no prefill-attention kernel on this machine (kernels not built, or "
                         "KUAIDA_NO_PREFILL_KERNEL=1)")
    print(f"kernel: {kind}, threads={torch.get_num_threads()}, {repeats} repeats, heads {ATTENTION_HEADS} "
          "(query, kv, dim), "
          f"load average {os.getloadavg()[0]:.2f}; ms / layer, median (best)\n")
    print("| T | S | copy+SDPA fp32 | SDPA fp32 | kernel | speedup vs copy+SDPA | vs SDPA |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        T, S = map(int, shape.split("x"))
        times = time_attention(T, S, repeats)
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        cells = " | ".join(f"{med[name]:.3f} ({min(ts) * 1e3:.3f})" for name, ts in times.items())
        print(f"| {T} | {S} | {cells} | {med['copy+SDPA'] / med['kernel']:.2f}x | "
              f"{med['SDPA'] / med['kernel']:.2f}x |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


Step = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def decode_case(spec: str) -> Step:
    """SPEC -> (cache rows, rows, lens, srcs, shared) of one step (see --decode)."""
    if "d" in spec:
        (r, length), drafts = map(int, spec.split("d")[0].split("x")), int(spec.split("d")[1])
        n = 1 + drafts
        return 1, torch.zeros(n, dtype=torch.long), torch.arange(length, length + n), None, None
    head, _, prefix = spec.partition("+")
    r, length = map(int, head.split("x"))
    rows, lens = torch.arange(r), torch.full((r,), length)
    if not prefix:
        return r, rows, lens, None, None
    return r, rows, lens, torch.zeros(r, dtype=torch.long), torch.full((r,), int(prefix))


def decode_main(specs: list[str], repeats: int) -> None:
    if not kernels.available():
        raise SystemExit("the kuaida kernels are not available on this machine")
    H, Hkv, D = ATTENTION_HEADS
    print(f"threads={torch.get_num_threads()}, {repeats} repeats, heads {ATTENTION_HEADS} (query, kv, dim), "
          f"fp16 cache, load average {os.getloadavg()[0]:.2f}; ms per step of 30 layers, median (best)\n")
    print("| step | entries | read per row | shared prefix read once | speedup |")
    print("| --- | --- | --- | --- | --- |")
    cases = {spec: decode_case(spec) for spec in specs}
    # One cache for all steps, shaped like the server's (spare rows and positions, allocated once: fresh
    # per-step tensors made later steps up to 1.6x slower in one run).
    R = max(c[0] for c in cases.values()) + 2
    S = max(int(c[2].max()) for c in cases.values()) + 512
    layers = [(torch.randn(R, Hkv, S, D).half(), torch.randn(R, Hkv, S, D).half()) for _ in range(N_LAYERS)]
    for spec, (n_rows, rows, lens, srcs, shared) in cases.items():
        if shared is not None:  # rows 1.. hold copies of row 0's prefix (as Scheduler._copy_prefix makes)
            p = int(shared[0])
            for k, v in layers:
                k[1:n_rows, :, :p], v[1:n_rows, :, :p] = k[:1, :, :p], v[:1, :, :p]
        q = torch.randn(len(rows), H, D)
        ways = {"per row": (None, None)} | ({"shared": (srcs, shared)} if shared is not None else {})
        times: dict[str, list[float]] = {name: [] for name in ways}
        for i in range(repeats + 1):  # the first round warms up; ways take turns
            for name, (sr, sh) in ways.items():
                t0 = time.perf_counter()
                for k, v in layers:
                    kernels.decode_attention(q, k, v, rows, lens, sr, sh)
                if i:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        cells = [f"{med[name]:.2f} ({min(times[name]) * 1e3:.2f})" for name in times]
        shared_cell, speedup = ("—", "—")
        if len(cells) > 1:
            shared_cell, speedup = cells[1], f"{med['per row'] / med['shared']:.2f}x"
        print(f"| {spec} | {len(rows)} | {cells[0]} | {shared_cell} | {speedup} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 43, 256])
    p.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-head", action="store_true", help="leave out the 49152 x 576 output layer")
    p.add_argument("--attention", nargs="+", metavar="TxS", help="time prefill attention at these shapes")
    p.add_argument("--decode", nargs="+", metavar="SPEC",
                   help="time decode attention steps (RxL, RxL+P, 1xLdK)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.attention:
        return attention_main(args.attention, args.repeats)
    if args.decode:
        return decode_main(args.decode, args.repeats)
    if not kernels.available():
        raise SystemExit("the kuaida kernels are not available on this machine")
    built = {spec: build(spec, not args.no_head) for spec in args.formats}
    print(f"threads={args.threads}, output layer {'left out' if args.no_head else 'included'}, "
          f"{args.repeats} repeats, native bf16 GEMM: {kernels.bf16_gemm_is_fast()}, "
          f"AVX-512 kernels: {kernels.avx512()}, load average {os.getloadavg()[0]:.2f}\n")
    # "per-matmul best": the sum over matmuls of each one's best time, an estimate of a forward on an idle
    # machine when other processes hold the cores (two threads then wait for time slices in every call).
    print("| format | M | ms / forward (median) | best | per-matmul best | ms / token | weight MB "
          "| GB/s (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rows in args.rows:
        timed = time_forwards({s: ops for s, (ops, _) in built.items()}, rows, args.repeats)
        for spec, runs in timed.items():
            ts = [sum(run) for run in runs]
            t, nbytes, each_best = statistics.median(ts), built[spec][1], sum(map(min, zip(*runs)))
            print(f"| {spec} | {rows} | {t * 1e3:.1f} | {min(ts) * 1e3:.1f} | {each_best * 1e3:.1f} "
                  f"| {t * 1e3 / rows:.2f} | {nbytes / 1e6:.0f} | {nbytes / t / 1e9:.1f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
