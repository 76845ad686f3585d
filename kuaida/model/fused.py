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


class DecodePlan:
    """A fused Transformer's decode step (one new token per row) as a flat loop over prepared tensors.

    The module path spends ~3 ms of a ~10 ms int4 step of the default model in Python around the kernels
    (about 270 module calls, 850 module attribute lookups, wrappers). This runs the same ops in the same
    order on the same tensors (logits equal the model's bit for bit, tests check it), looking nothing up.
    Build it when the model is final (quantized, fused, weights loaded): it holds its tensors, so a model
    changed afterwards needs a new plan. `decode_plan(model)` returns None where it does not apply."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.embed = model.embed_tokens.weight
        self.layers = [(blk.input_layernorm.weight.detach(), blk.input_layernorm.eps,
                        _direct(blk.self_attn.qkv_proj), _direct(blk.self_attn.o_proj),
                        blk.post_attention_layernorm.weight.detach(), blk.post_attention_layernorm.eps,
                        _direct(blk.mlp.gate_up_proj), _direct(blk.mlp.down_proj))
                       for blk in model.layers]
        self.heads = (model.layers[0].self_attn.n_heads, model.layers[0].self_attn.n_kv_heads)
        self.norm = (model.norm.weight.detach(), model.norm.eps)
        self.lm_head = _direct(model.lm_head)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, rows) -> torch.Tensor:
        """tokens, positions [B, 1] -> logits [B, 1, vocab], as model(tokens, positions, cache, rows=rows,
        last_only=True)."""
        m, glue = self.model, kernels.glue()
        if torch.is_grad_enabled() or glue is None:
            return m(tokens, positions, cache, rows=rows, last_only=True)
        B = tokens.shape[0]
        cos, sin = m.rope(positions)
        cos, sin = cos.contiguous(), sin.contiguous()
        row_ids = torch.arange(cache.batch)[rows] if isinstance(rows, slice) else rows
        pos = positions[:, 0]
        H, Hkv = self.heads
        x = torch.nn.functional.embedding(tokens, self.embed)  # [B, 1, dim]
        for i, (n1, e1, qkv, o, n2, e2, gate_up, down) in enumerate(self.layers):
            h = glue.rms_norm(x.contiguous(), n1, e1)
            q, k, v = glue.rope_qkv(qkv(h).contiguous(), cos, sin, H, Hkv)
            y = cache.decode(i, row_ids, pos, q, k, v)
            x = x + o(y.transpose(1, 2).reshape(B, 1, -1))
            h = glue.rms_norm(x.contiguous(), n2, e2)
            x = x + down(glue.silu_mul(gate_up(h).contiguous()))
        logits = self.lm_head(glue.rms_norm(x[:, -1:].contiguous(), *self.norm)).float()
        if m.output_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], m.args.vocab_size), float("-inf"))
        return full.index_copy_(-1, m.output_ids, logits)


def _direct(module: nn.Module):
    """The module's forward as a plain function (no Module.__call__): a quantized layer's kernel call with
    its tensors bound, else the bound forward."""
    from kuaida.compress.quantize import Int4Linear, Int8Linear

    if type(module) is Int8Linear:
        q, d, b = module.qweight, module.scales, module.bias
        return lambda x: kernels.int8_linear(x, q, d, b)
    if type(module) is Int4Linear:
        q, d, mn, b = module.qweight, module.scales, module.mins, module.bias
        return lambda x: kernels.int4_linear(x, q, d, mn, b)
    return module.forward


def decode_plan(model: nn.Module) -> DecodePlan | None:
    """A DecodePlan for a fused Transformer with fp32 activations and norms, else None (use the model)."""
    if not isinstance(model, Transformer) or kernels.glue() is None:
        return None
    if model.embed_tokens.weight.dtype != torch.float32:
        return None
    for m in model.modules():
        if isinstance(m, (RMSNorm, Attention, FeedForward)) and type(m) not in _FUSED.values():
            return None  # not fused
        if isinstance(m, RMSNorm) and m.weight.dtype != torch.float32:
            return None
    return DecodePlan(model)
