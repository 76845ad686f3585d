"""Quantized matmuls: C++/AVX2 kernels built on first use, with a pure PyTorch fallback.

`int8_linear` / `int4_linear` take x [..., K] fp32 and weights in the formats of `reference.py` and return
[..., N] fp32. They run the integer kernel, which reads each weight byte once, except for many rows (long
prefill) on CPUs with native bf16 dot products (AVX512-BF16), where dequantizing to bf16 for oneDNN's bf16
GEMM is faster. On AVX2-only CPUs the integer kernel beats dequantize + fp32 GEMM at every row count
measured (up to 256; benchmarks/results/kernels.md). Without the kernels (no compiler, no AVX2,
KUAIDA_NO_KERNELS=1) both go to `reference`: the same weights, fp32 activations, slower.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from kuaida.kernels import reference

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("qgemm.cpp")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]

# Rows from which dequantize to bf16 + bf16 GEMM beats the integer kernel where bf16 GEMM is native
# (measured crossover ~26-30 rows for int4 and int8; benchmarks/results/kernels.md).
BF16_GEMM_MIN_ROWS = 32


def cache_dir() -> Path:
    """$KUAIDA_CACHE, else ~/.cache/kuaida."""
    return Path(os.environ.get("KUAIDA_CACHE") or Path.home() / ".cache" / "kuaida")


def _cpu_supported() -> bool:
    # The kernels use AVX2 + FMA; torch reports AVX2 only when both are present.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def _load() -> ModuleType | None:
    """The compiled extension, built into <cache>/ext the first time; None when it cannot be used."""
    if os.environ.get("KUAIDA_NO_KERNELS") == "1":
        log.info("KUAIDA_NO_KERNELS=1: using the PyTorch fallback for quantized matmuls")
        return None
    if not _cpu_supported():
        log.warning("CPU lacks AVX2/FMA: quantized matmuls use the slow PyTorch fallback")
        return None
    from torch.utils import cpp_extension

    build_dir = cache_dir() / "ext" / "qgemm"
    if not any(build_dir.glob("*.so")):
        log.info("building kuaida kernels, ~1 min, once (into %s)", build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name="kuaida_qgemm", sources=[str(_SOURCE)], build_directory=str(build_dir),
                                  extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as e:  # any build/load failure (no compiler, no ninja, bad toolchain): degrade, not die
        log.warning("could not build kuaida kernels (%s); quantized matmuls use the slow PyTorch fallback",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


@functools.cache
def bf16_gemm_is_fast() -> bool:
    """True on CPUs with native bf16 dot products (AVX512-BF16): there oneDNN's bf16 GEMM is ~4x faster
    than fp32 GEMM at many rows; elsewhere it is ~4x slower."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def available() -> bool:
    """True when the compiled kernels are in use (builds them on the first call)."""
    return _load() is not None


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """What the kernels take: contiguous fp32 (a no-op for the model's activations)."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def _bf16_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K], w [N, K] bf16 -> [..., N] fp32; the bias is added in fp32."""
    y = F.linear(x.bfloat16(), w).float()
    return y if bias is None else y.add_(bias)


def _use_bf16_gemm(x: torch.Tensor) -> bool:
    return x.numel() >= BF16_GEMM_MIN_ROWS * x.shape[-1] and bf16_gemm_is_fast()


# The two ops below run once per linear layer per token: they stay minimal (a few microseconds of Python).
def int8_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32, q int8 [N, K], d fp16 [N, K / group] -> [..., N] fp32."""
    ext = _load()
    if ext is None:
        return reference.int8_linear(x.float(), q, d, bias)
    if _use_bf16_gemm(x):
        return _bf16_gemm(x, ext.int8_dequantize(q, d, True), bias)
    return ext.int8_linear(_fp32(x), q, d, bias)


def int4_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32, q uint8 [N, K / 2], d and m fp16 [N, K / group] -> [..., N] fp32."""
    ext = _load()
    if ext is None:
        return reference.int4_linear(x.float(), q, d, m, bias)
    if _use_bf16_gemm(x):
        return _bf16_gemm(x, ext.int4_dequantize(q, d, m, True), bias)
    return ext.int4_linear(_fp32(x), q, d, m, bias)
