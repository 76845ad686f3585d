"""LoRA (Hu et al., 2021): train a low-rank update B @ A beside each frozen linear layer.

    apply_lora(model, rank=8)        # wraps qkv/o/gate_up/down projections; everything else frozen
    train(..., params=lora_parameters(model))
    merge_lora(model)                # W <- W + (alpha / rank) * B @ A: plain nn.Linear layers again

B starts at zero, so the wrapped model computes exactly what the base model does until it trains.
After merging, saving, quantizing and serving see an ordinary model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kuaida.errors import InvalidArgumentError

LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * dropout(x) @ A^T @ B^T, with base frozen.
    A: [rank, in_features], B: [out_features, rank]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., rank] -> [..., out]; the low-rank path never forms an [out, in] matrix
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling  # [out, in]
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               targets: tuple[str, ...] = LORA_TARGETS, dropout: float = 0.0) -> nn.Module:
    """Freeze every parameter of `model` and wrap each nn.Linear whose name ends in one of `targets`
    with a LoRALinear (in place). Returns the model."""
    if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise InvalidArgumentError(f"LoRA needs rank >= 1, alpha > 0, 0 <= dropout < 1 (got {rank}, {alpha}, {dropout})")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        owner, _, attr = name.rpartition(".")
        if attr in targets and type(module) is nn.Linear:
            setattr(model.get_submodule(owner), attr, LoRALinear(module, rank, alpha, dropout))
            wrapped += 1
    if not wrapped:
        raise InvalidArgumentError(f"no nn.Linear named {', '.join(targets)} in the model: nothing for LoRA to adapt")
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA matrices (A and B of every LoRALinear)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear (in place) and make all parameters trainable
    again, as they were before apply_lora froze them. Returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
