"""The quantized weight formats in pure PyTorch: packing, unpacking, and the fallback matmul.

These define the formats the C++ kernels (qgemm.cpp) read. Every function here is plain tensor math, so
it also runs on the `meta` device (building an empty quantized model to load a checkpoint into).

int8: q int8 [N, K], w = q * d, symmetric per group (d = absmax / 127).
int4: q uint8 [N, K / 2], w = q * d + m with q in 0..15 per group (d = (max - min) / 15, m = min). Each
      32-block of K packs into 16 bytes: the low nibbles hold elements 0..15, the high nibbles 16..31
      (llama.cpp's Q4_1 layout, so one 128-bit load unpacks a block).
d and m are fp16 [N, K / group]; group is a multiple of 32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 32  # int4 packing unit and the kernels' activation block
FP16_MAX = 65504.0


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = w.shape
    return w.float().reshape(N, K // group_size, group_size)  # [N, groups, group_size]


def _divisor(d: torch.Tensor) -> torch.Tensor:
    """fp16 scales [N, groups] -> fp32 [N, groups, 1]; a zero scale (all-zero group) divides by 1."""
    return torch.where(d > 0, d.float(), 1.0)[..., None]


def quantize_int8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> q int8 [N, K], d fp16 [N, K / group_size]."""
    g = _groups(w, group_size)
    d = (g.abs().amax(-1) / 127).clamp(max=FP16_MAX).half()
    # Divide by the fp16-rounded scale that will be used, so q * d reproduces a Q8_0 weight exactly.
    q = (g / _divisor(d)).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), d


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> q uint8 [N, K / 2] (two per byte), d fp16 and m fp16 [N, K / group_size]."""
    g = _groups(w, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15).clamp(max=FP16_MAX).half()
    m = lo.clamp(-FP16_MAX, FP16_MAX).half()
    q = ((g - m.float()[..., None]) / _divisor(d)).round().clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(w.shape)), d, m


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> [N, K / 2]: per 32-block, element j | element j + 16 << 4."""
    N, K = q.shape
    b = q.reshape(N, K // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 2] -> uint8 [N, K] in 0..15 (inverse of pack_int4)."""
    N, half = packed.shape
    b = packed.reshape(N, half * 2 // BLOCK, 1, BLOCK // 2)
    return torch.cat((b & 0x0F, b >> 4), dim=2).reshape(N, half * 2)


def _expand(v: torch.Tensor, K: int) -> torch.Tensor:
    """Per-group values [N, groups] -> per-element [N, K] fp32."""
    return v.float().repeat_interleave(K // v.shape[1], dim=1)


def dequantize_int8(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """-> fp32 [N, K]."""
    return q.float() * _expand(d, q.shape[1])


def dequantize_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """-> fp32 [N, K]."""
    u = unpack_int4(q)
    K = u.shape[1]
    return u.float() * _expand(d, K) + _expand(m, K)


def int8_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] fp32 -> [..., N]: the fallback, fp32 activations (more exact than the kernel)."""
    return F.linear(x, dequantize_int8(q, d), bias)


def int4_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(q, d, m), bias)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                     lens: torch.Tensor) -> torch.Tensor:
    """What kernels/attention.cpp computes, one SDPA per sequence: q [B, H, D] -> [B, H, D]."""
    out = [F.scaled_dot_product_attention(q[b:b + 1, :, None], k[r:r + 1, :, :n].to(q.dtype),
                                          v[r:r + 1, :, :n].to(q.dtype), enable_gqa=True)[:, :, 0]
           for b, (r, n) in enumerate(zip(rows.tolist(), lens.tolist()))]
    return torch.cat(out)
