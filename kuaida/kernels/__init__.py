"""Quantized matmuls: C++/AVX2 kernels built on first use, with a pure PyTorch fallback.

`int8_linear` / `int4_linear` take x [..., K] fp32 and weights in the formats of `reference.py` and return
[..., N] fp32. They run the integer kernel, which reads each weight byte once, except for many rows
(prefill), where dequantizing the layer and calling a GEMM library is faster: bf16 GEMM (oneDNN) on CPUs
with native bf16 dot products (AVX512-BF16), fp32 GEMM (MKL) elsewhere. Thresholds are measured
(benchmarks/results/kernels.md). The integer kernel has an AVX-512 VNNI path, used where the CPU has it
unless KUAIDA_NO_AVX512=1 (then the AVX2 one). On CPUs with AVX512-BF16, int8 layers take bf16 dot-product
kernels at every row count instead (`fused_int8`). Without the kernels (no compiler, no AVX2,
KUAIDA_NO_KERNELS=1) both go to `reference`: the same weights, fp32 activations, slower.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from kuaida.kernels import reference

log = logging.getLogger(__name__)

_SOURCES = {name: Path(__file__).with_name(f"{name}.cpp") for name in ("qgemm", "attention")}
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]

# Rows from which dequantize + GEMM beats the integer kernel (crossovers measured over the model's layers;
# benchmarks/results/kernels.md). With native bf16, bf16 GEMM: with the AVX-512 paths (VNNI kernel,
# AVX512-BF16 dequantize) from ~19 rows (int8) and ~15 (int4) with one thread, ~27 and ~21 with two (the
# kernel splits its work in two, the GEMM path gains less; more threads: not measured); with the AVX2 ones
# (KUAIDA_NO_AVX512=1, one thread) from ~9 (int8), ~14 (int4). Without native bf16, fp32 GEMM from ~48
# (int8), ~128 (int4), measured against the AVX2 kernel (AVX-512 VNNI without AVX512-BF16 would move them
# up).
BF16_GEMM_MIN_ROWS = {"int8": (19, 27), "int4": (15, 21)}  # (one thread, two or more)
BF16_GEMM_MIN_ROWS_AVX2 = {"int8": 10, "int4": 14}
FP32_GEMM_MIN_ROWS = {"int8": 48, "int4": 128}
# On CPUs without the AVX-512 paths, int8 layers take int8_linear_rows16 (qgemm.cpp: 16-bit activations,
# vpmaddwd) below this many rows, fp32 GEMM from it: measured on Zen 3 (AVX2 only, 2 threads, the model's
# layers), rows16 took 0.51x the GEMM path's time at 48 rows, 1.02x at 128, 1.13x at 192
# (benchmarks/results/kernels.md). (int4 with 16-bit activations was no faster than its 15-bit kernel,
# which reads two nibble blocks per load: not kept.)
ROWS16_MAX_ROWS = 128
# int8 with AVX512-BF16: from this many rows the fused kernel (attention.cpp, int8_linear_bf16: weights
# dequantized tile by tile into bf16 dot products, no layer-sized buffer, no oneDNN reorder) beats both the
# integer kernel and dequantize + oneDNN, with one thread or two (~12 rows either way; at 16-64 rows it
# takes 1.25-1.36x less time than dequantize + oneDNN over the default model's layers, kernels.md).
FUSED_INT8_MIN_ROWS = 12


def cache_dir() -> Path:
    """$KUAIDA_CACHE, else ~/.cache/kuaida."""
    return Path(os.environ.get("KUAIDA_CACHE") or Path.home() / ".cache" / "kuaida")


def _cpu_supported() -> bool:
    # The kernels use AVX2 + FMA; torch reports AVX2 only when both are present.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def _load(name: str = "qgemm") -> ModuleType | None:
    """The compiled extension `name` (qgemm: quantized matmuls, attention: decode and prefill attention),
    built into <cache>/ext/<name> the first time; None when it cannot be used."""
    if os.environ.get("KUAIDA_NO_KERNELS") == "1":
        log.info("KUAIDA_NO_KERNELS=1: using the PyTorch fallback for %s", name)
        return None
    if not _cpu_supported():
        log.warning("CPU lacks AVX2/FMA: %s uses the slow PyTorch fallback", name)
        return None
    from torch.utils import cpp_extension

    build_dir = cache_dir() / "ext" / name
    if not any(build_dir.glob("*.so")):
        # WARNING, not INFO: the CLI shows warnings by default, and a silent minute looks like a hang.
        log.warning("building kuaida kernels (%s), ~1 min, once (into %s)", name, build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=f"kuaida_{name}", sources=[str(_SOURCES[name])], extra_cflags=_FLAGS,
                                  build_directory=str(build_dir), extra_ldflags=["-fopenmp"])
    except Exception as e:  # any build/load failure (no compiler, no ninja, bad toolchain): degrade, not die
        log.warning("could not build kuaida kernels (%s: %s); using the slow PyTorch fallback", name,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


@functools.cache
def _has_avx512_vnni() -> bool:
    return (ext := _load()) is not None and ext.has_avx512_vnni()


def avx512() -> bool:
    """True when the kernels take their AVX-512 paths (VNNI matmul; bf16 dequantize where AVX512-BF16): the
    CPU has VNNI and KUAIDA_NO_AVX512 is not 1 (read on every call, so tests can switch it)."""
    return _has_avx512_vnni() and os.environ.get("KUAIDA_NO_AVX512") != "1"


@functools.cache
def bf16_gemm_is_fast() -> bool:
    """True on CPUs with native bf16 dot products (AVX512-BF16): there oneDNN's bf16 GEMM is ~4x faster
    than fp32 GEMM at many rows; elsewhere it is ~4x slower."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def available() -> bool:
    """True when the compiled kernels are in use (builds them on the first call)."""
    return _load() is not None and _load("attention") is not None


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """What the kernels take: contiguous fp32 (a no-op for the model's activations)."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


_scratch = threading.local()  # per thread: concurrent forwards must not share a buffer
# 16 MB of bf16: any layer of a small model. Bigger weights (the 49152 x 576 output layer) stay on the
# integer kernel, which needs no buffer.
SCRATCH_MAX_ELEMENTS = 8 << 20


def weight_buffer(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized [n, k] buffer for dequantized weights, reused across calls (see qgemm.cpp)."""
    if n * k > SCRATCH_MAX_ELEMENTS:
        return torch.empty(n, k, dtype=dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n * k or buf.dtype != dtype:
        # A normal tensor even when first asked for under inference_mode: an inference tensor could not be
        # written in place by a later call outside it (a model evaluated under no_grad after serving).
        with torch.inference_mode(False):
            buf = _scratch.buf = torch.empty(n * k, dtype=dtype)
    return buf[: n * k].view(n, k)


def bf16_gemm_min_rows(dtype: str, wide: bool) -> int:
    """The bf16 GEMM threshold for the kernels' AVX-512 paths (`wide`) or AVX2 ones, at torch's thread
    count."""
    if not wide:
        return BF16_GEMM_MIN_ROWS_AVX2[dtype]
    return BF16_GEMM_MIN_ROWS[dtype][torch.get_num_threads() > 1]


def _gemm_dtype(x: torch.Tensor, dtype: str, n: int, wide: bool) -> torch.dtype | None:
    """The dtype to dequantize an [n, K] `dtype` weight to for a GEMM library, or None: integer kernel
    (its AVX-512 path if `wide`)."""
    k = x.shape[-1]
    if n * k > SCRATCH_MAX_ELEMENTS:
        return None
    if bf16_gemm_is_fast():
        return torch.bfloat16 if x.numel() >= bf16_gemm_min_rows(dtype, wide) * k else None
    return torch.float32 if x.numel() >= fp32_gemm_min_rows(dtype) * k else None


def rows16() -> bool:
    """True when int8 layers take int8_linear_rows16 (AVX2, 16-bit activations) for decode and for prefill
    below ROWS16_MAX_ROWS: the kernels are loaded, the AVX-512 paths are off (not available, or
    KUAIDA_NO_AVX512=1) and KUAIDA_NO_ROWS16 is not 1 (then the 15-bit integer kernel; read on every call)."""
    return not avx512() and os.environ.get("KUAIDA_NO_ROWS16") != "1" and _load() is not None


def fp32_gemm_min_rows(dtype: str) -> int:
    """Rows from which `dtype` layers take dequantize + fp32 GEMM on CPUs without native bf16."""
    return ROWS16_MAX_ROWS if dtype == "int8" and rows16() else FP32_GEMM_MIN_ROWS[dtype]


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K], w [N, K] fp32 or bf16 -> [..., N] fp32; the bias is added in fp32."""
    y = F.linear(x.to(w.dtype), w).float()
    return y if bias is None else y.add_(bias)


_rows = threading.local()


@contextlib.contextmanager
def row_independent():
    """Within this block (this thread), int8 and int4 layers take a row-independent kernel however many rows
    come in (int8: the bf16 rows kernel with AVX512-BF16, rows16 without AVX-512, else the integer kernel;
    int4: the integer kernel): each row's result is then bitwise the same whatever rows share the call (the
    dequantize + GEMM and fused bf16 paths round differently). The batching scheduler decodes in it, so a
    greedy reply does not depend on the requests or the prompt-lookup drafts that share its steps; from ~12
    rows it costs speed (benchmarks/results/kernels.md)."""
    before = getattr(_rows, "independent", False)
    _rows.independent = True
    try:
        yield
    finally:
        _rows.independent = before


def _batch_paths() -> bool:
    """False inside row_independent()."""
    return not getattr(_rows, "independent", False)


# The two ops below run once per linear layer per token: they stay minimal (a few microseconds of Python).
def int8_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32, q int8 [N, K], d fp16 [N, K / group] -> [..., N] fp32."""
    ext = _load()
    if ext is None:
        return reference.int8_linear(x.float(), q, d, bias)
    wide = avx512()
    if fused_int8():
        if x.numel() >= FUSED_INT8_MIN_ROWS * x.shape[-1] and _batch_paths():
            return _load("attention").int8_linear_bf16(_fp32(x), q, d, bias)
        if os.environ.get("KUAIDA_NO_BF16_DECODE") != "1":
            return _load("attention").int8_linear_bf16_rows(_fp32(x), q, d, bias)
    if _batch_paths() and (gemm := _gemm_dtype(x, "int8", q.shape[0], wide)) is not None:
        return _gemm(x, ext.int8_dequantize(q, d, weight_buffer(*q.shape, gemm), wide), bias)
    if rows16():  # implies not wide
        return ext.int8_linear_rows16(_fp32(x), q, d, bias)
    return ext.int8_linear(_fp32(x), q, d, bias, wide)


def int4_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32, q uint8 [N, K / 2], d and m fp16 [N, K / group] -> [..., N] fp32."""
    ext = _load()
    if ext is None:
        return reference.int4_linear(x.float(), q, d, m, bias)
    wide = avx512()
    if _batch_paths() and (gemm := _gemm_dtype(x, "int4", q.shape[0], wide)) is not None:
        w = ext.int4_dequantize(q, d, m, weight_buffer(q.shape[0], q.shape[1] * 2, gemm), wide)
        return _gemm(x, w, bias)
    return ext.int4_linear(_fp32(x), q, d, m, bias, wide)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                     lens: torch.Tensor, srcs: torch.Tensor | None = None,
                     shared: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per entry over its own cached prefix (GQA), the whole batch in one call.

    q [B, H, D] fp32; k, v: the cache's [R, Hkv, S, D], fp32 or fp16; rows, lens int64 [B] (cache row, keys
    to attend to) -> [B, H, D]. Rows may differ in length: no padding, no copy of any history.

    srcs, shared int64 [B] (optional): entry b reads its first shared[b] keys and values from row srcs[b],
    which must hold the same bits there as its own row (a copied system prompt): entries with one src read
    that prefix from memory once. Entries of one row share their reads too. The result is bitwise the same
    with or without them; only the bytes read change."""
    ext = _load("attention")
    if ext is not None and k.dtype in (torch.float32, torch.float16) and q.shape[-1] <= 256:
        if srcs is None or shared is None:
            srcs, shared = rows, torch.zeros_like(rows)
        return ext.decode_attention(_fp32(q), k, v, rows.contiguous(), lens.contiguous(), srcs.contiguous(),
                                    shared.contiguous(), q.shape[-1] ** -0.5)
    return reference.decode_attention(q, k, v, rows, lens)


def glue() -> ModuleType | None:
    """The compiled module with rms_norm, rope_qkv and silu_mul (kuaida.model.fused), or None: no kernels."""
    return _load("attention")


@functools.cache
def _has_avx512_bf16_attention() -> bool:
    return (ext := _load("attention")) is not None and ext.has_avx512_bf16()


def fused_int8() -> bool:
    """True when int8 layers take the AVX-512 BF16 kernels (attention.cpp): int8_linear_bf16 for many rows
    (prefill), int8_linear_bf16_rows for fewer and for any count inside row_independent() (decode; unless
    KUAIDA_NO_BF16_DECODE=1, then the integer kernel). Needs native bf16 (AVX512-BF16), the AVX-512 paths on
    (KUAIDA_NO_AVX512 not 1) and KUAIDA_NO_FUSED_INT8 not 1 (read on every call: escape hatches, and A/B
    measurements)."""
    return (bf16_gemm_is_fast() and avx512() and _has_avx512_bf16_attention()
            and os.environ.get("KUAIDA_NO_FUSED_INT8") != "1")


def bf16_attention() -> bool:
    """True when `prefill_attention` can run its AVX-512 BF16 kernel: the kernels are loaded, the CPU has
    AVX512-BF16 and KUAIDA_NO_BF16_ATTENTION is not 1 (read on every call, so tests can switch it)."""
    return _has_avx512_bf16_attention() and os.environ.get("KUAIDA_NO_BF16_ATTENTION") != "1"


def prefill_kernel(cache_dtype: torch.dtype, head_dim: int) -> str | None:
    """Which kernel `prefill_attention` runs over a cache of this dtype and head_dim: "bf16" (AVX-512 BF16:
    `bf16_attention()`, head_dim a multiple of 32), "fp32" (AVX2 + FMA + F16C, all in fp32: the other CPUs
    the kernels run on, head_dim a multiple of 8), or None: fp32 SDPA over an upcast copy of the prefix (an
    fp32 cache, no kernels, or KUAIDA_NO_PREFILL_KERNEL=1; read on every call, for A/B runs and tests)."""
    if cache_dtype != torch.float16 or os.environ.get("KUAIDA_NO_PREFILL_KERNEL") == "1":
        return None
    if bf16_attention() and head_dim % 32 == 0:
        return "bf16"
    return "fp32" if head_dim % 8 == 0 and _load("attention") is not None else None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int,
                      positions: torch.Tensor) -> torch.Tensor:
    """T query tokens of one sequence over its cached prefix (GQA), reading an fp16 cache in place.

    q [H, T, D] fp32 (RoPE applied; any strides); k, v: the cache's [R, Hkv, S, D] fp16, the new tokens'
    keys/values already written; positions int64 [T], strictly increasing, gaps allowed (every position up
    to the last must hold a key) -> [H, T, D] fp32, out[h, t] attending to cache positions <= positions[t].
    By `prefill_kernel`: "bf16" rounds q, k, the softmax weights and v to bf16 (fp32 accumulation and
    softmax; ~1e-2 from fp32 SDPA, see tests/test_prefill_attention.py); "fp32" is fp32 SDPA's arithmetic
    in another order (~1e-6); both return a [T, H, D]-strided tensor; None: fp32 SDPA over an upcast copy
    of the prefix."""
    kind = prefill_kernel(k.dtype, q.shape[-1])
    if kind is not None:
        q32 = q if q.dtype == torch.float32 and q.stride(-1) == 1 else q.float().contiguous()
        ext, scale = _load("attention"), q.shape[-1] ** -0.5
        fn = ext.prefill_attention if kind == "bf16" else ext.prefill_attention_fp32
        return fn(q32, k, v, row, positions.contiguous(), scale).to(q.dtype)
    span = int(positions[-1]) + 1
    mask = torch.arange(span) <= positions[:, None]  # [T, span]
    k, v = (c[row:row + 1, :, :span].to(q.dtype) for c in (k, v))
    return F.scaled_dot_product_attention(q[None], k, v, attn_mask=mask, enable_gqa=True)[0]


def describe(head_dim: int = 64) -> str:
    """The compute paths this process takes, in a few words (`kuaida serve` prints it at start: a slow
    server on a CPU without AVX2, or without a compiler, says so)."""
    if not available():
        return "PyTorch fallback (kernels off or not built: slow)"
    if fused_int8():
        matmuls = "int8 AVX-512 BF16, int4 AVX-512 VNNI"
    elif avx512():
        matmuls = "int8/int4 AVX-512 VNNI"
    elif rows16():
        matmuls = "int8 AVX2 (16-bit activations), int4 AVX2"
    else:
        matmuls = "int8/int4 AVX2"
    kind = prefill_kernel(torch.float16, head_dim)
    attention = {"bf16": "AVX-512 BF16", "fp32": "AVX2 fp32", None: "SDPA"}[kind]
    return f"matmuls {matmuls}; prefill attention {attention}"


def _fp16_write_fits(kc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the C++ cache writes take these: kernels in use, a contiguous fp16 cache, fp32 k and v with
    contiguous head dims (a multiple of 8)."""
    return (_load("attention") is not None and kc.dtype == torch.float16 and kc.is_contiguous()
            and k.dtype == torch.float32 and v.dtype == torch.float32 and k.stride(-1) == 1
            and v.stride(-1) == 1 and k.shape[-1] % 8 == 0)


def write_kv_fp16(kc: torch.Tensor, vc: torch.Tensor, row: int, positions: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> bool:
    """k, v [Hkv, T, D] fp32 into row `row` of an fp16 cache kc, vc [R, Hkv, S, D] at `positions` [T] (gaps
    allowed) in one C++ loop; -> False (nothing written) where the kernels are not in use or the layouts
    do not fit, and the caller writes with torch."""
    if not _fp16_write_fits(kc, k, v):
        return False
    _load("attention").write_kv_fp16(kc, vc, row, positions.contiguous(), k, v)
    return True


def write_kv_rows_fp16(kc: torch.Tensor, vc: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor) -> bool:
    """A decode step's k, v [B, Hkv, 1, D] fp32: entry b's into row rows[b] of an fp16 cache kc, vc
    [R, Hkv, S, D] at positions[b] (int64 [B] each); -> False (nothing written) where the kernels are not in
    use or the layouts do not fit, and the caller writes with torch."""
    if not _fp16_write_fits(kc, k, v):
        return False
    _load("attention").write_kv_rows_fp16(kc, vc, rows.contiguous(), positions.contiguous(), k, v)
    return True


def place_passage(kcs: list[torch.Tensor], vcs: list[torch.Tensor], row: int, start: int, k: torch.Tensor,
                  v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """A passage's k, v ([L, Hkv, T, D] fp16) into row `row` of every layer's fp16 cache from `start`, each
    key rotated by cos, sin ([D/2] fp32, the position shift's); -> False (nothing written) where the
    kernels are not in use or the layouts do not fit (see kuaida.engine.passages for the torch path)."""
    ext = _load("attention")
    if (ext is None or k.dtype != torch.float16 or v.dtype != torch.float16 or kcs[0].dtype != torch.float16
            or not (k.is_contiguous() and v.is_contiguous()) or k.shape[-1] % 16):
        return False
    ext.place_passage(kcs, vcs, row, start, k, v, cos.float().contiguous(), sin.float().contiguous())
    return True
