"""Inference glue in one kernel call each: RMSNorm, RoPE on the fused q/k/v projection, silu(gate) * up.

At one token per step, each of these is a few microseconds of arithmetic spread over several PyTorch ops
(about 35 per layer in all, counting views), and on 2 cores their dispatch made up a third of a decode step
of the default model (benchmarks/results/kernels.md). `fuse(model)` swaps a Transformer's norms, attention
and MLP modules for the subclasses below, in place (a function from model to model, as quantization is):
same parameters, same state_dict; each forward runs the kernel when autograd is off and the input is fp32,
and the parent's plain PyTorch otherwise, so a fused model still trains, and runs where the kernels do not.
Results match the plain modules to fp32 rounding (the kernels sum in another order), not bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from kuaida import kernels
from kuaida.model.transformer import Attention, FeedForward, RMSNorm, Transformer


def _use_kernel(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and not torch.is_grad_enabled() and kernels.glue() is not None


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_kernel(x) or self.weight.dtype != torch.float32:
            return super().forward(x)
        return kernels.glue().rms_norm(x.contiguous(), self.weight.detach(), self.eps)


class FusedAttention(Attention):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        if not _use_kernel(x):
            return super().forward(x, cos, sin, attend)
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).contiguous()  # [B, T, (H + 2 Hkv) D]
        # q [B, H, T, D], k and v [B, Hkv, T, D]: q and k rotated; cos, sin [B, 1, T, D]
        glue = kernels.glue()
        q, k, v = glue.rope_qkv(qkv, cos.contiguous(), sin.contiguous(), self.n_heads, self.n_kv_heads)
        y = attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FusedFeedForward(FeedForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_kernel(x):
            return super().forward(x)
        return self.down_proj(kernels.glue().silu_mul(self.gate_up_proj(x).contiguous()))


_FUSED: dict[type, type] = {RMSNorm: FusedRMSNorm, Attention: FusedAttention, FeedForward: FusedFeedForward}


def fuse(model: nn.Module) -> nn.Module:
    """Swap the glue modules of a kuaida Transformer for their fused versions, in place; -> the model.
    Anything else (a GRU student, a model run through transformers) is returned unchanged."""
    if isinstance(model, Transformer):
        for m in model.modules():
            if type(m) in _FUSED:
                m.__class__ = _FUSED[type(m)]
    return model
