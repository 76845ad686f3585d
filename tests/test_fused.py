"""kuaida.model.fused: the glue kernels against plain PyTorch, and a fused model against the plain one."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kuaida import kernels
from kuaida.compress.quantize import quantize
from kuaida.engine.generate import Engine
from kuaida.engine.sampling import SamplingParams
from kuaida.model.fused import DecodePlan, FusedAttention, FusedFeedForward, FusedRMSNorm, decode_plan, fuse
from kuaida.model.loader import load_model
from kuaida.model.transformer import RMSNorm, rotate_half

needs_kernels = pytest.mark.skipif(kernels.glue() is None, reason="C++ kernels unavailable")


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (3, 40)])
def test_rms_norm_kernel(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape) * 3
    got = kernels.glue().rms_norm(x, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(got, norm(x).detach(), rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("B,T,H,Hkv,D", [(1, 1, 9, 3, 64), (2, 5, 4, 2, 32), (1, 3, 2, 2, 128)])
def test_rope_qkv_kernel(B, T, H, Hkv, D):
    """q, k rotated as Attention.forward does (x cos + rotate_half(x) sin), v split off, [B, heads, T, D]."""
    torch.manual_seed(1)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D)
    angles = torch.randn(B, T, D // 2) * 10
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, D], as Transformer.rope gives
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    want = (q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v)
    got = kernels.glue().rope_qkv(qkv, cos.contiguous(), sin.contiguous(), H, Hkv)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_silu_mul_kernel():
    """Over the range where silu's two formulas meet (x = 0) and its tails (e^-x overflows for x < -88)."""
    torch.manual_seed(2)
    gate = torch.cat([torch.linspace(-100, 100, 1001), torch.randn(1535) * 4])  # 2536: a ragged tail
    up = torch.randn_like(gate)
    gu = torch.cat([gate, up])[None]
    got = kernels.glue().silu_mul(gu)
    torch.testing.assert_close(got, (F.silu(gate) * up)[None], rtol=2e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_fused_model_matches_plain_and_still_trains(tiny_qwen2_dir, dtype):
    """Same parameters and state_dict; no-grad logits to fp32 rounding (prefill and cached decode, with the
    q/k/v biases of Qwen2); with autograd on, the plain modules' exact result and gradients."""
    loaded = load_model(str(tiny_qwen2_dir))
    plain = loaded.model if dtype == "fp32" else quantize(loaded.model, "int8")
    fused = fuse(copy.deepcopy(plain))
    kinds = {type(m) for m in fused.modules()}
    assert {FusedRMSNorm, FusedAttention, FusedFeedForward} <= kinds and RMSNorm not in kinds
    assert list(fused.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(3, 200, (2, 12))
    # int8 layers quantize their input per 32-block to 15 bits: a rounding-level change in it can move a
    # value by one step of that grid (~1/16256 of the block's absmax), the tolerance's size here.
    tol = 1e-5 if dtype == "fp32" else 2e-4
    with torch.no_grad():
        want, got = plain(tokens), fused(tokens)
        scale = want.abs().max()
        torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)
        caches = [m.new_cache(batch=1, max_seq=32) for m in (plain, fused)]
        for model, cache in zip((plain, fused), caches):
            model(tokens[:1, :10], torch.arange(10)[None], cache)
        step = [m(tokens[:1, 10:11], torch.tensor([[10]]), c) for m, c in zip((plain, fused), caches)]
        torch.testing.assert_close(step[1], step[0], rtol=0, atol=tol * scale)
    if dtype == "fp32":
        assert torch.equal(fused(tokens), plain(tokens))  # grad on: the plain path
        fused(tokens).logsumexp(-1).mean().backward()
        assert fused.layers[0].input_layernorm.weight.grad is not None


@needs_kernels
def test_fused_greedy_reply_close_to_plain(tiny_llama_dir):
    """The engine on a fused model: the same greedy reply as on the plain one for this prompt (the logits
    differ by fp32 rounding only; a near-tie could flip a token, so this is one fixed case)."""
    loaded = load_model(str(tiny_llama_dir))
    eos = {loaded.tokenizer.eos_token_id}
    prompt = torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_new_tokens=16, temperature=0)
    plain = list(Engine(loaded.model, eos, max_context=64).generate(prompt, params))
    fused = list(Engine(fuse(copy.deepcopy(loaded.model)), eos, max_context=64).generate(prompt, params))
    assert fused == plain and len(plain) > 0


def test_fuse_leaves_other_models_alone():
    gru = torch.nn.GRU(4, 4)
    assert fuse(gru) is gru and type(gru) is torch.nn.GRU


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_decode_plan_gives_the_models_logits_bit_for_bit(tiny_qwen2_dir, dtype):
    """The module-free decode step: batched rows at their own positions (one row twice, a token and its
    draft), fp16 or fp32 cache, Qwen2's q/k/v biases; logits equal model(...) exactly."""
    loaded = load_model(str(tiny_qwen2_dir))
    model = fuse(loaded.model if dtype == "fp32" else quantize(loaded.model, dtype))
    plan = decode_plan(model)
    assert isinstance(plan, DecodePlan)
    cache = model.new_cache(batch=3, max_seq=32)
    tokens = torch.randint(3, 200, (3, 12))
    with torch.inference_mode():
        for r in range(3):
            model(tokens[r:r + 1, :8 + r], torch.arange(8 + r)[None], cache, rows=slice(r, r + 1))
        step = (tokens[:, 8:9].repeat(2, 1)[:4], torch.tensor([[8], [9], [10], [9]]),
                torch.tensor([0, 1, 2, 0]))
        want = model(step[0], step[1], copy.deepcopy(cache), rows=step[2], last_only=True)
        got = plan(step[0], step[1], cache, step[2])
    assert torch.equal(got, want)
    assert decode_plan(load_model(str(tiny_qwen2_dir)).model) is None  # not fused: the model's own path


@needs_kernels
def test_engine_uses_the_decode_plan_with_the_same_reply(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    model = fuse(copy.deepcopy(loaded.model))
    eos = {loaded.tokenizer.eos_token_id}
    prompt = torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_new_tokens=16, temperature=0)
    engine = Engine(model, eos, max_context=64)
    assert isinstance(engine.decode_step, DecodePlan)
    with_plan = list(engine.generate(prompt, params))
    engine = Engine(model, eos, max_context=64)
    engine.decode_step = lambda tokens, positions, cache, rows: model(tokens, positions, cache, rows=rows,
                                                                      last_only=True)
    assert list(engine.generate(prompt, params)) == with_plan and len(with_plan) > 0
