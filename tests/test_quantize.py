"""quantize(model, dtype): the tiny model still runs, stays close to fp32, round-trips through safetensors.

Logit tolerances (relative L2 error vs fp32, tiny random model): random Gaussian weights are the worst
case for group quantization. Rounding to a grid of step s adds error of std s / sqrt(12): int4 groups of 32
span ~4.1 sigma, so s / sqrt(12) = 4.1 / 15 / 3.46 = 7.9 % of a weight's size; int8 spans ~2 * 2.1 sigma
over 254 steps, ~0.5 %; bf16 keeps 8 bits of mantissa, ~0.2 %. Bounds below are ~2x those.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kuaida import kernels
from kuaida.compress.quantize import DTYPES, BF16Linear, Int4Linear, Int8Linear, quantize
from kuaida.errors import InvalidArgumentError
from kuaida.model.args import ModelArgs
from kuaida.model.transformer import Transformer, rope_inv_freq

REL_TOL = {"bf16": 0.01, "int8": 0.02, "int4": 0.16}
MODULE = {"bf16": BF16Linear, "int8": Int8Linear, "int4": Int4Linear}
HEAD_MODULE = {"bf16": BF16Linear, "int8": Int8Linear, "int4": Int8Linear}  # int4 keeps an int8 output layer
QUANTIZED = list(MODULE)


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.preset("tiny", **overrides)).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_quantized_model_close_to_fp32(dtype):
    model = tiny()
    expect = model(tokens())
    embed = model.embed_tokens.weight.detach().clone()
    assert quantize(model, dtype) is model
    assert isinstance(model.lm_head, HEAD_MODULE[dtype])
    assert all(isinstance(m, MODULE[dtype]) for m in model.layers.modules() if hasattr(m, "in_features"))
    # The tied embedding keeps its fp32 weight, untouched.
    assert model.embed_tokens.weight.dtype == torch.float32 and torch.equal(model.embed_tokens.weight, embed)
    assert rel_err(model(tokens()), expect) < REL_TOL[dtype]


@torch.no_grad()
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_state_dict_round_trip_through_safetensors(dtype, tmp_path):
    model = quantize(tiny(), dtype)
    expect = model(tokens())
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    other = quantize(tiny(seed=1), dtype)
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(other(tokens()), expect)


@torch.no_grad()
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_load_into_meta_skeleton(dtype, tmp_path):
    """The loader's path: quantize a meta-device model (no memory, no work), then assign the tensors."""
    model = quantize(tiny(), dtype)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    with torch.device("meta"):
        skeleton = Transformer(ModelArgs.preset("tiny"))
    quantize(skeleton, dtype)
    skeleton.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True)
    skeleton.inv_freq = rope_inv_freq(skeleton.args)  # non-persistent buffer: not in the checkpoint
    assert torch.equal(skeleton(tokens()), model(tokens()))


def test_fp32_is_unchanged():
    model = tiny()
    head = model.lm_head
    assert quantize(model, "fp32") is model and model.lm_head is head
    assert "fp32" in DTYPES


@torch.no_grad()
def test_head_dtype_can_be_chosen():
    model = quantize(tiny(), "int4", head_dtype="int4")
    assert isinstance(model.lm_head, Int4Linear)
    model = quantize(tiny(), "int8", head_dtype="fp32")
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed_tokens.weight
    assert isinstance(model.layers[1].mlp.down_proj, Int8Linear)
    with pytest.raises(InvalidArgumentError, match="choose one of"):
        quantize(tiny(), "int4", head_dtype="int2")


def test_unknown_dtype_lists_choices():
    with pytest.raises(InvalidArgumentError, match="fp32, bf16, int8, int4"):
        quantize(tiny(), "int3")
    with pytest.raises(InvalidArgumentError, match="multiple of 32"):
        quantize(tiny(), "int8", group_size=48)


def test_layers_with_k_not_multiple_of_group_stay_fp32(caplog):
    model = tiny(dim=48, intermediate_size=128)  # q/k/v/o/gate/up/lm_head: K = 48; down: K = 128
    with caplog.at_level(logging.INFO, logger="kuaida.compress.quantize"):
        quantize(model, "int4")
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(model.layers[0].self_attn.qkv_proj, nn.Linear)
    assert isinstance(model.lm_head, nn.Linear)
    assert "keeping layers.0.self_attn.qkv_proj in fp32: in_features=48" in caplog.text
    model(tokens())


@torch.no_grad()
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_bias_is_kept_in_fp32(dtype):
    model = tiny(qkv_bias=True)
    expect = model(tokens())
    quantize(model, dtype)
    qkv_proj = model.layers[0].self_attn.qkv_proj
    assert qkv_proj.bias.dtype == torch.float32 and "qkv_proj.bias" in "".join(model.state_dict())
    assert model.layers[0].self_attn.o_proj.bias is None
    assert rel_err(model(tokens()), expect) < REL_TOL[dtype]


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("int8_bf16", [False, True])
def test_kernel_and_fallback_models_agree(dtype, int8_bf16, monkeypatch):
    """Whole model, kernel path vs pure PyTorch fallback. Integer kernel: they differ only by its 15-bit
    activations (per 32-block), ~3e-5 of each matmul; measured 4e-5 (int8), 1.2e-4 (int4) at the logits.
    With AVX512-BF16, int8 layers (int4's output layer too) take bf16 dot products (weights and activations
    rounded to bf16, ~2^-9 each): measured ~2.5e-3 at the logits."""
    if not kernels.available():
        pytest.skip("C++ kernels unavailable")
    if int8_bf16 and not kernels.fused_int8():
        pytest.skip("no AVX512-BF16: int8 layers take the integer kernel")
    if not int8_bf16:
        monkeypatch.setenv("KUAIDA_NO_BF16_DECODE", "1")
    model = quantize(tiny(), dtype)
    x = tokens()[:1, :5]  # 5 rows: not the many-row GEMM paths
    with_kernel = model(x)
    monkeypatch.setattr(kernels, "_load", lambda: None)
    assert rel_err(with_kernel, model(x)) < (1e-2 if int8_bf16 else 1e-3)


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("bf16_fast", [False, True])
def test_bf16_linear_paths(rows, bf16_fast, monkeypatch):
    """bf16 GEMM (x rounded to bf16 too: error <= 2^-8 sum |x w|) or, for many rows without native bf16,
    fp32 GEMM on the upcast weight (exact up to fp32 rounding)."""
    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: bf16_fast)
    linear = nn.Linear(64, 48)
    layer = BF16Linear.from_linear(linear)
    x = torch.randn(2, rows, 64)
    w = layer.weight.float()
    expect = torch.nn.functional.linear(x, w, linear.bias)
    bound = 2**-8 * 1.01 * torch.nn.functional.linear(x.abs(), w.abs()) + 1e-5
    assert ((layer(x) - expect).abs() <= bound).all()


def test_weight_buffer_first_made_under_inference_mode_is_writable_outside(monkeypatch):
    """The reused dequantization buffer, first allocated while serving (inference_mode), must still take the
    next call's weights under plain no_grad (an inference tensor refuses in-place writes there). This failed
    on CPUs without native bf16, whose many-row BF16Linear path upcasts into the buffer."""
    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: False)
    monkeypatch.setattr(kernels._scratch, "buf", None, raising=False)
    layer = BF16Linear.from_linear(nn.Linear(64, 48))
    x = torch.randn(20, 64)
    with torch.inference_mode():
        first = layer(x)
    assert not kernels.weight_buffer(48, 64, torch.float32).is_inference()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), first)


def test_quantized_model_caches_fp16_and_decodes_like_fp32_cache():
    """quantize() makes new caches fp16; decoding through one stays within fp16 rounding of an fp32 cache."""
    torch.manual_seed(0)
    model = quantize(Transformer(ModelArgs.preset("tiny")).eval(), "int8")
    cache16, cache32 = model.new_cache(batch=2, max_seq=64), model.new_cache(batch=2, max_seq=64,
                                                                             dtype=torch.float32)
    assert cache16.k[0].dtype == torch.float16 and cache32.k[0].dtype == torch.float32
    ids = torch.randint(0, 256, (1, 20))
    with torch.inference_mode():
        for cache in (cache16, cache32):
            model(ids, torch.arange(20)[None], cache, rows=slice(1, 2))
        step = [model(torch.tensor([[7]]), torch.tensor([[20]]), c, rows=torch.tensor([1]))
                for c in (cache16, cache32)]
    torch.testing.assert_close(step[0], step[1], atol=2e-2, rtol=1e-2)
    assert step[0].argmax() == step[1].argmax()
