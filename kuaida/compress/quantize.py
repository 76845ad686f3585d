"""Weight-only quantization: a model -> model transform that swaps nn.Linear for quantized modules.

    model = quantize(model, "int4")          # in place; returns the model (output layer: int8)

Formats (kuaida/kernels/reference.py): int8 symmetric and int4 asymmetric (scale + min), both per group of
`group_size` weights along K with fp16 scales; bf16 weights. Activations stay fp32 at the interface.

Loading a quantized checkpoint: build the model on the meta device, `quantize` it (every step here is plain
tensor math, so on meta it only creates empty buffers of the right shapes), then
`model.load_state_dict(state_dict, assign=True)`. The state dict holds `qweight`, `scales`, (`mins`) and
`bias` per quantized layer; group_size and head_dtype must match the ones used to write it (the buffers'
shapes and names tell them apart: a mismatch fails loudly in load_state_dict).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kuaida import kernels
from kuaida.errors import InvalidArgumentError
from kuaida.kernels import reference

log = logging.getLogger(__name__)

DTYPES = ("fp32", "bf16", "int8", "int4")

# Rows from which upcasting bf16 weights (into a reused buffer) for fp32 GEMM beats bf16 GEMM on CPUs
# without native bf16 (measured: bf16 1.7x faster at 1 row, 1.2x slower at 4; benchmarks/results/kernels.md).
BF16_UPCAST_MIN_ROWS = 3


class _QuantLinear(nn.Module):
    """Shared shape bookkeeping and fp32 bias of the quantized linear layers."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    """int8 weights, symmetric per group: qweight int8 [N, K], scales fp16 [N, K / group_size]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int8Linear":
        return cls(*reference.quantize_int8(linear.weight.detach(), group_size), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self.qweight, self.scales, self.bias)


class Int4Linear(_QuantLinear):
    """int4 weights, asymmetric per group: qweight uint8 [N, K / 2], scales and mins fp16 [N, K / group_size]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__(qweight.shape[1] * 2, qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        return cls(*reference.quantize_int4(linear.weight.detach(), group_size), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int4_linear(x, self.qweight, self.scales, self.mins, self.bias)


class BF16Linear(_QuantLinear):
    """bf16 weight [N, K]. Few rows (decode): bf16 GEMM (oneDNN), which reads half the bytes of fp32.
    Many rows (prefill) on CPUs without native bf16 dot products: bf16 GEMM is ~4x slower than fp32 there,
    so upcast the weight and use fp32 GEMM. With AVX512-BF16, bf16 GEMM is fastest at every row count."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "BF16Linear":
        """group_size is unused (bf16 has no groups); accepted so every format builds the same way."""
        return cls(linear.weight.detach().bfloat16(), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] >= BF16_UPCAST_MIN_ROWS and not kernels.bf16_gemm_is_fast():
            w = kernels.weight_buffer(self.out_features, self.in_features, torch.float32).copy_(self.weight)
            return F.linear(x.float(), w, self.bias)
        y = F.linear(x.bfloat16(), self.weight).float()
        return y if self.bias is None else y + self.bias


_MODULES: dict[str, type[_QuantLinear]] = {"bf16": BF16Linear, "int8": Int8Linear, "int4": Int4Linear}


def _quantizable(name: str, linear: nn.Linear, group_size: int) -> bool:
    if linear.in_features % group_size:
        log.info("keeping %s in fp32: in_features=%d is not a multiple of group_size=%d",
                 name, linear.in_features, group_size)
        return False
    return True


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def default_head_dtype(dtype: str) -> str:
    """The output layer's format for a model quantized to `dtype`: int8 under int4, as llama.cpp's Q4 files
    keep it at 8 bits. It is the most sensitive layer: on the default model, an int4 output layer drops
    top-1 agreement with fp32 from 100 % to 86 % (512 tokens), and costs only 12 MB less a token."""
    return "int8" if dtype == "int4" else dtype


def quantize(model: nn.Module, dtype: str, group_size: int = 32, head_dtype: str | None = None) -> nn.Module:
    """Replace (in place) every nn.Linear in `model.layers` by the `dtype` module, and `model.lm_head` by
    the `head_dtype` one (default: `default_head_dtype(dtype)`, which is int8 for int4).

    The embedding keeps its fp32 weight even when lm_head shares it (tied): only the lm_head module is
    replaced. "fp32" leaves those layers unchanged. Layers whose in_features is not a multiple of
    group_size stay fp32 (logged)."""
    head_dtype = head_dtype or default_head_dtype(dtype)
    _check_dtype(dtype)
    _check_dtype(head_dtype)
    if group_size <= 0 or group_size % reference.BLOCK:
        raise InvalidArgumentError(f"group_size must be a positive multiple of {reference.BLOCK}, got {group_size}")
    targets = [(f"layers.{n}", m, dtype) for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(model.lm_head, nn.Linear):
        targets.append(("lm_head", model.lm_head, head_dtype))
    done = 0
    for name, linear, kind in targets:
        if kind != "fp32" and _quantizable(name, linear, group_size):
            model.set_submodule(name, _MODULES[kind].from_linear(linear, group_size))
            done += 1
    log.info("quantized %d of %d linear layers to %s, output layer %s (group %d)", done, len(targets), dtype,
             head_dtype, group_size)
    if dtype != "fp32":
        # KV caches of a quantized model store fp16 (Transformer.new_cache): half the bytes every decode step
        # streams, an error far below the weights' own.
        model.kv_dtype = torch.float16
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """The inverse swap (in place): every quantized module becomes an fp32 nn.Linear holding the weights
    its format represents (exactly what the reference matmul computes with). A head that was tied to the
    embedding before quantizing (args.tie_embeddings, no pruned vocabulary) is tied again: the embedding
    was never quantized, so the head gets its original fp32 weights back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _QuantLinear):
            with torch.device("meta"):  # no init of weights about to be replaced
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(_fp32_weight(module))
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.clone())
            model.set_submodule(name, linear)
    args = getattr(model, "args", None)
    if args is not None and args.tie_embeddings and args.output_ids is None:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _fp32_weight(module: _QuantLinear) -> torch.Tensor:
    if isinstance(module, Int8Linear):
        return reference.dequantize_int8(module.qweight, module.scales)
    if isinstance(module, Int4Linear):
        return reference.dequantize_int4(module.qweight, module.scales, module.mins)
    return module.weight.float()
