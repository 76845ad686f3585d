"""Quantized matmuls: C++/AVX2 kernels built on first use, with a pure PyTorch fallback.

`int8_linear` / `int4_linear` take x [..., K] fp32 and weights in the formats of `reference.py` and return
[..., N] fp32. Few rows (decode) go to the integer kernel, which reads each weight byte once; many rows
(long prefill) go to fp32 GEMM on weights dequantized by the kernel, which is faster there. Without the
kernels (no compiler, no AVX2, KUAIDA_NO_KERNELS=1) both go to `reference`: same results, slower.
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

# Rows from which dequantize + fp32 GEMM beats the integer kernel (benchmarks/results/kernels.md).
GEMM_MIN_ROWS = {"int8": 48, "int4": 48}


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


def available() -> bool:
    """True when the compiled kernels are in use (builds them on the first call)."""
    return _load() is not None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> contiguous fp32 [M, K]."""
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def int8_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32, q int8 [N, K], d fp16 [N, K / group] -> [..., N] fp32."""
    ext, x2 = _load(), _rows(x)
    if ext is None:
        y = reference.int8_linear(x2, q, d, bias)
    elif x2.shape[0] >= GEMM_MIN_ROWS["int8"]:
        y = F.linear(x2, ext.int8_dequantize(q, d, False), bias)
    else:
        y = ext.int8_linear(x2, q, d, bias)
    return y.reshape(*x.shape[:-1], q.shape[0])


def int4_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32, q uint8 [N, K / 2], d and m fp16 [N, K / group] -> [..., N] fp32."""
    ext, x2 = _load(), _rows(x)
    if ext is None:
        y = reference.int4_linear(x2, q, d, m, bias)
    elif x2.shape[0] >= GEMM_MIN_ROWS["int4"]:
        y = F.linear(x2, ext.int4_dequantize(q, d, m, False), bias)
    else:
        y = ext.int4_linear(x2, q, d, m, bias)
    return y.reshape(*x.shape[:-1], q.shape[0])
