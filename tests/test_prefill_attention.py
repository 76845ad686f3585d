"""The prefill-attention kernels (kernels/attention.cpp) against fp32 SDPA; their use by the model.

Two kernels read the fp16 cache in place: "bf16" (AVX-512 BF16, where the CPU has it) and "fp32" (AVX2 +
FMA + F16C, every CPU the kernels run on; on a BF16 machine the tests select it with
KUAIDA_NO_BF16_ATTENTION=1). Each test runs for both where the CPU allows.

Tolerances. The fp32 kernel does fp32 SDPA's arithmetic in another order (scores as 8-key dot products,
exp by a degree-5 polynomial with relative error ~2e-7): measured max abs error 3.2e-6 over these cases,
asserted at 2e-5. The bf16 kernel rounds q, k, v and the softmax weights P to bf16 (unit roundoff
u = 2^-8) and does everything else in fp32. Against fp32 SDPA over the same bf16-rounded q, k, v
(`emulate`), only P's rounding remains: out = sum_j p_j (1 + e_j) v_j / sum_j p_j with |e_j| <= u, so
|out - emulate| <= u * max |v| (plus fp32 summation order and the exp polynomial, ~1e-6 relative). Against
plain fp32 SDPA the rounding of q and k moves the scores too; measured max abs error 1.2e-2 over these
cases (q ~ 2 N(0, 1), k, v ~ N(0, 1), so |v| <= ~4.5), asserted at 3e-2.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kuaida import kernels
from kuaida.model.args import ModelArgs
from kuaida.model.transformer import Transformer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (no AVX2, or kernels off)")


@pytest.fixture(params=["bf16", "fp32"])
def kind(request, monkeypatch):
    """The kernel under test, selected through the environment as a user would."""
    monkeypatch.delenv("KUAIDA_NO_PREFILL_KERNEL", raising=False)
    if request.param == "bf16":
        if not kernels.bf16_attention():
            pytest.skip("no AVX512-BF16 CPU")
    else:
        monkeypatch.setenv("KUAIDA_NO_BF16_ATTENTION", "1")
    assert kernels.prefill_kernel(torch.float16, 64) == request.param
    return request.param


U = 2.0 ** -8  # bf16 unit roundoff


def sdpa_reference(q, k, v, row, positions):
    """fp32 SDPA of q [H, T, D] over cache row `row` up to positions[-1], masked per token."""
    span = int(positions[-1]) + 1
    mask = torch.arange(span) <= positions[:, None]
    kk, vv = (c[row:row + 1, :, :span].float() for c in (k, v))
    return F.scaled_dot_product_attention(q[None], kk, vv, attn_mask=mask, enable_gqa=True)[0]


def bf16(x):
    return x.bfloat16().float()


def make_case(heads, kv_heads, dim, positions, rows=3, row=1, seed=0):
    """A random fp16 cache (NaN past the last position and in other rows: the kernel must not read them)
    and q [H, T, D] in the model's layout (tokens outermost)."""
    g = torch.Generator().manual_seed(seed)
    S = int(positions[-1]) + 1
    k = torch.full((rows, kv_heads, S + 20, dim), float("nan"), dtype=torch.float16)
    v = k.clone()
    k[row, :, :S] = torch.randn(kv_heads, S, dim, generator=g).half()
    v[row, :, :S] = torch.randn(kv_heads, S, dim, generator=g).half()
    q = (torch.randn(len(positions), heads, dim, generator=g) * 2).transpose(0, 1)  # sharp softmax
    return q, k, v


def gapped(T, S, seed=0):
    """T strictly increasing positions in [0, S), the last one S - 1."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(S - 1, generator=g)[:T - 1].sort().values
    return torch.cat([pos, torch.tensor([S - 1])])


CASES = [  # heads, kv_heads, dim, positions
    (9, 3, 64, torch.arange(1225, 1272)),  # the default model's shape: 47 new tokens over 1,272 keys
    (9, 3, 64, torch.tensor([0])),  # one key
    (9, 3, 64, torch.tensor([36])),  # T = 1 over 37 keys
    (9, 3, 64, torch.arange(70)),  # causal from empty, T not a multiple of the 8-token block
    (4, 4, 32, torch.arange(20, 37)),  # G = 1, S = 37
    (8, 2, 128, gapped(33, 100)),  # G = 4, gaps
    (9, 3, 96, gapped(20, 301, seed=1)),  # D = 96: a 32-wide chunk of P @ V
    (6, 2, 64, torch.cat([torch.arange(0, 10), torch.arange(230, 255)])),  # a passage-sized gap
]


@pytest.mark.parametrize("heads,kv_heads,dim,positions", CASES)
def test_prefill_attention_matches_sdpa(kind, heads, kv_heads, dim, positions):
    q, k, v = make_case(heads, kv_heads, dim, positions)
    out = kernels.prefill_attention(q, k, v, 1, positions)
    assert out.shape == q.shape and out.dtype == torch.float32
    want = sdpa_reference(q, k, v, 1, positions)
    if kind == "fp32":
        torch.testing.assert_close(out, want, atol=2e-5, rtol=0)
        return
    emulated = sdpa_reference(bf16(q), bf16(k.float()), bf16(v.float()), 1, positions)
    vmax = bf16(v[1, :, :int(positions[-1]) + 1].float()).abs().max()
    assert (out - emulated).abs().max() <= (U + 1e-4) * vmax
    torch.testing.assert_close(out, want, atol=3e-2, rtol=0)


@pytest.mark.parametrize("dim", [40, 72])
def test_fp32_kernel_odd_head_dims(dim, monkeypatch):
    """head_dim a multiple of 8 but not of 32 (the bf16 kernel's condition): the fp32 kernel takes it, with
    P @ V's last chunk narrower than 32 dims."""
    monkeypatch.setenv("KUAIDA_NO_PREFILL_KERNEL", "0")
    assert kernels.prefill_kernel(torch.float16, dim) == "fp32"
    positions = torch.arange(13, 50)
    q, k, v = make_case(6, 2, dim, positions)
    torch.testing.assert_close(kernels.prefill_attention(q, k, v, 1, positions),
                               sdpa_reference(q, k, v, 1, positions), atol=2e-5, rtol=0)


@pytest.mark.parametrize("fn", ["prefill_attention", "prefill_attention_fp32"])
def test_prefill_attention_rejects_bad_positions(fn):
    if fn == "prefill_attention" and not kernels.bf16_attention():
        pytest.skip("no AVX512-BF16 CPU")
    q, k, v = make_case(2, 1, 32, torch.arange(4))
    call = getattr(kernels._load("attention"), fn)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        call(q, k, v, 1, torch.tensor([0, 2, 2, 3]), 1.0)
    with pytest.raises(RuntimeError, match="out of the cache's range"):
        call(q, k, v, 1, torch.tensor([0, 1, 2, 24]), 1.0)


def test_env_switch_selects_sdpa(kind, monkeypatch):
    q, k, v = make_case(4, 2, 64, torch.arange(10, 20))
    positions = torch.arange(10, 20)
    monkeypatch.setenv("KUAIDA_NO_PREFILL_KERNEL", "1")
    assert kernels.prefill_kernel(torch.float16, 64) is None
    want = sdpa_reference(q, k, v, 1, positions)
    assert torch.equal(kernels.prefill_attention(q, k, v, 1, positions), want)


def _prefills(monkeypatch, use_kernel: bool):
    """Logits of a tiny model (head_dim 32) with an fp16 cache: a 40-token prefill into row 1, then a
    prompt around a passage (positions 0-9 and 30-39 rewritten, 10-29 kept), then a decode step."""
    monkeypatch.setenv("KUAIDA_NO_PREFILL_KERNEL", "0" if use_kernel else "1")
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", dim=128, n_heads=4, n_kv_heads=2)).eval()
    cache = model.new_cache(batch=2, max_seq=64, dtype=torch.float16)
    assert cache.prefills_in_place() == use_kernel
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 40), generator=g)
    around = torch.cat([torch.arange(10), torch.arange(30, 40)])[None]
    with torch.inference_mode():
        first = model(ids, torch.arange(40)[None], cache, rows=slice(1, 2))
        second = model(torch.randint(0, 256, (1, 20), generator=g), around, cache, rows=torch.tensor([1]))
        step = model(torch.tensor([[7]]), torch.tensor([[40]]), cache, rows=torch.tensor([1]))
    return first, second, step


def test_model_prefill_with_kernel_is_close_to_sdpa(kind, monkeypatch):
    """Same logits within the kernel's noise: for bf16, measured max difference 0.025 on logits of std ~14
    (2e-3 of it), the same argmax everywhere; for fp32, 4e-6 of it. The decode step reads keys/values the
    two prefills wrote."""
    with_kernel, with_sdpa = _prefills(monkeypatch, True), _prefills(monkeypatch, False)
    bound = 5e-3 if kind == "bf16" else 1e-4
    for got, want in zip(with_kernel, with_sdpa):
        assert (got - want).abs().max() <= bound * want.std()
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_fp32_cache_keeps_sdpa(kind):
    model = Transformer(ModelArgs.preset("tiny", dim=128, n_heads=4, n_kv_heads=2)).eval()
    assert not model.new_cache(dtype=torch.float32).prefills_in_place()
    assert model.new_cache(dtype=torch.float16).prefills_in_place()


def test_describe_names_the_paths_in_use(kind, monkeypatch):
    want = {"bf16": "prefill attention AVX-512 BF16", "fp32": "prefill attention AVX2 fp32"}[kind]
    assert kernels.describe().endswith(want)
    monkeypatch.setenv("KUAIDA_NO_PREFILL_KERNEL", "1")
    assert kernels.describe().endswith("prefill attention SDPA")
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert kernels.describe().startswith("PyTorch fallback")
