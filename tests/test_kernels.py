"""The quantized matmul kernels against the reference math, and the PyTorch fallback.

Tolerances. The kernels quantize activations per 32-block to 15-bit integers (d = absmax / 16256, round
to nearest), so each x_i moves by at most absmax_b / 32512. The kernel's result therefore differs from the
exact dequantized-weights matmul by at most  sum_b  absmax_b / 32512 * sum_{i in b} |w_i|  per output (w
without the int4 min, whose term uses exact sums of x), plus fp32 rounding. `test_*_matches_exact` asserts that bound;
`test_*_matches_emulation` checks the kernel against that same activation quantization done in PyTorch,
where only summation order differs (1e-5 relative).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kuaida import kernels
from kuaida.kernels import reference as ref

ACT_MAX = 16256  # the kernels' activation grid per 32-block: integers in [-16256, 16256]

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="C++ kernels unavailable (no compiler/AVX2)")
needs_vnni = pytest.mark.skipif(not kernels.available() or not kernels._load().has_avx512_vnni(),
                                reason="CPU without AVX-512 VNNI")

# K = 96: an odd number of 32-blocks (the int4 kernel works on block pairs plus a last single block).
SHAPES = [(m, k, n) for m in (1, 3, 17, 64) for k in (64, 96, 576, 1536) for n in (5, 192, 577)]


def make(dtype: str, n: int, k: int, group: int = 32, seed: int = 0):
    """Random weights quantized as `dtype`: (weight args for the ops, dequantized [N, K], scaled part)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if dtype == "int8":
        q, d = ref.quantize_int8(w, group)
        deq = ref.dequantize_int8(q, d)
        return (q, d), deq, deq
    q, d, m = ref.quantize_int4(w, group)
    deq = ref.dequantize_int4(q, d, m)
    return (q, d, m), deq, deq - m.float().repeat_interleave(group, dim=1)


def kernel_op(dtype: str, avx512: bool | None = None):
    """The integer kernel of `dtype` (x, *weights, bias); avx512: its path, by default the one the ops use."""
    ext = kernels._load()
    op = ext.int8_linear if dtype == "int8" else ext.int4_linear
    isa = kernels.avx512() if avx512 is None else avx512
    return lambda *args: op(*args, isa)


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """[M, K] -> per-element absmax of its 32-block, [M, K]."""
    M, K = x.shape
    return x.reshape(M, K // 32, 32).abs().amax(-1).repeat_interleave(32, dim=1)


def fake_quant_acts(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activation quantization, done in PyTorch with the same fp32 ops."""
    a = block_absmax(x)
    # torch computes `c / a` as c * (1 / a), which can differ in the last bit: divide for real.
    inv = torch.where(a > 0, torch.full_like(a, ACT_MAX).div(a), torch.zeros_like(a))
    return (x * inv).round() * (a / ACT_MAX)


def emulation(x, deq, scaled, bias):
    """What the kernels compute, in PyTorch: int4's min term on exact x, the scaled part on quantized x;
    and the scale of the outputs, for tolerances."""
    expect = F.linear(fake_quant_acts(x), scaled, bias) + F.linear(x, deq - scaled)
    return expect, F.linear(x.abs(), deq.abs()) + (0 if bias is None else bias.abs())


def inputs(m: int, k: int, n: int, with_bias: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    return x, bias


@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_emulation(dtype, with_bias, m, k, n):
    wargs, deq, scaled = make(dtype, n, k)
    x, bias = inputs(m, k, n, with_bias)
    y = kernel_op(dtype)(x, *wargs, bias)
    expect, scale = emulation(x, deq, scaled, bias)
    torch.testing.assert_close(y, expect, rtol=0, atol=(1e-5 * scale.max()).item())


@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_exact(dtype, m, k, n):
    wargs, deq, scaled = make(dtype, n, k)
    x, bias = inputs(m, k, n, True)
    assert_within_act_rounding(kernel_op(dtype)(x, *wargs, bias), x, deq, scaled, bias)


def assert_within_act_rounding(y, x, deq, scaled, bias):
    """y is the exact dequantized-weights matmul (the reference fallback) up to the activation rounding."""
    exact = F.linear(x, deq, bias)
    bound = F.linear(block_absmax(x) / (2 * ACT_MAX), scaled.abs()) * 1.001 + 1e-5 * F.linear(x.abs(), deq.abs())
    assert ((y - exact).abs() <= bound).all()


@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("group", [64, 96, 192])
def test_kernel_larger_groups(dtype, group):
    wargs, deq, scaled = make(dtype, 67, 576, group)
    x, bias = inputs(2, 576, 67, False)
    expect = F.linear(fake_quant_acts(x), scaled) + F.linear(x, deq - scaled)
    torch.testing.assert_close(kernel_op(dtype)(x, *wargs, None), expect, rtol=0, atol=1e-4)


@needs_vnni
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k,group", [(32, 32), (64, 32), (96, 32), (576, 64), (1536, 32)])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 16, 33, 64])
def test_avx512_path_matches_avx2_and_emulation(dtype, with_bias, k, group, m):
    """The AVX-512 VNNI path computes the same integers as the AVX2 one (odd N: a partial row tile; K = 32
    and 96: a last single block; M: full and partial activation tiles); only fp32 summation order differs."""
    n = 77
    wargs, deq, scaled = make(dtype, n, k, group)
    x, bias = inputs(m, k, n, with_bias)
    y512, y2 = kernel_op(dtype, True)(x, *wargs, bias), kernel_op(dtype, False)(x, *wargs, bias)
    expect, scale = emulation(x, deq, scaled, bias)
    atol = (1e-5 * scale.max()).item()
    torch.testing.assert_close(y512, y2, rtol=0, atol=atol)
    torch.testing.assert_close(y512, expect, rtol=0, atol=atol)
    assert_within_act_rounding(y512, x, deq, scaled, bias)


@needs_kernels
def test_no_avx512_env_switch(monkeypatch):
    """KUAIDA_NO_AVX512=1 sends the public ops to the AVX2 path (bit for bit); unset, they take the AVX-512
    one where the CPU has it (whose fp32 sums, in another order, differ in the last bits)."""
    wargs, _, _ = make("int8", 77, 576)
    x, bias = inputs(3, 576, 77, True)
    monkeypatch.setenv("KUAIDA_NO_BF16_DECODE", "1")  # int8 rows stay on the integer kernel
    monkeypatch.setenv("KUAIDA_NO_ROWS16", "1")  # here too, without AVX-512
    monkeypatch.setenv("KUAIDA_NO_AVX512", "1")
    assert not kernels.avx512()
    y2 = kernels.int8_linear(x, *wargs, bias)
    assert torch.equal(y2, kernel_op("int8", False)(x, *wargs, bias))
    monkeypatch.delenv("KUAIDA_NO_AVX512")
    assert kernels.avx512() == kernels._load().has_avx512_vnni()
    y = kernels.int8_linear(x, *wargs, bias)
    assert torch.equal(y, kernel_op("int8", kernels.avx512())(x, *wargs, bias))
    if kernels.avx512():
        assert not torch.equal(y, y2)
    else:
        with pytest.raises(RuntimeError, match="without AVX-512 VNNI"):
            kernel_op("int8", True)(x, *wargs, bias)


@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("avx512", [False, True])
def test_kernel_dequantize_is_exact(dtype, bf16, avx512):
    """fp32: bit-exact; bf16: bit-exact with torch's rounding (to nearest even), by either path (avx512 on
    a CPU without AVX512-BF16 takes the AVX2 one)."""
    wargs, deq, _ = make(dtype, 33, 1536, 64)
    ext = kernels._load()
    out = torch.empty(33, 1536, dtype=torch.bfloat16 if bf16 else torch.float32)
    op = ext.int8_dequantize if dtype == "int8" else ext.int4_dequantize
    got = op(*wargs, out, avx512)
    assert got is out and torch.equal(out, deq.bfloat16() if bf16 else deq)


@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 7, 12, 20, 130, 200])
@pytest.mark.parametrize("bf16_fast", [False, True])
@pytest.mark.parametrize("no_avx512", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_dispatch_agrees_with_fallback(dtype, m, bf16_fast, no_avx512, threads, monkeypatch):
    """The public ops against the pure PyTorch fallback, on 3-d input with a bias, on both kinds of CPU
    (with or without native bf16 GEMM), at row counts on both sides of the GEMM thresholds. Integer
    kernel: the activation-quantization bound above; fp32 GEMM is exact up to rounding, well inside it.
    bf16 GEMM: x and w each rounded to bf16 (unit roundoff 2^-8), so the error is at most 2^-7 sum |x w|."""
    wargs, deq, scaled = make(dtype, 192, 576)
    x, bias = inputs(m, 576, 192, True)
    x = x[None]  # [1, m, 576]
    op = kernels.int8_linear if dtype == "int8" else kernels.int4_linear
    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: bf16_fast)
    if no_avx512:
        monkeypatch.setenv("KUAIDA_NO_AVX512", "1")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the thresholds depend on it
    bf16_rows = kernels.bf16_gemm_min_rows(dtype, kernels.avx512())
    fp32_rows = kernels.fp32_gemm_min_rows(dtype)
    fused = dtype == "int8" and kernels.fused_int8()  # bf16 kernels at every row count
    y = op(x, *wargs, bias)
    monkeypatch.setattr(kernels, "_load", lambda: None)
    fallback = op(x, *wargs, bias)
    assert fallback.shape == y.shape == (1, m, 192)
    torch.testing.assert_close(fallback, F.linear(x, deq, bias), rtol=0, atol=1e-5)
    if (bf16_fast and m >= bf16_rows) or fused:
        bound = 2**-7 * 1.01 * F.linear(x[0].abs(), deq.abs()) + 1e-5
    elif not bf16_fast and m >= fp32_rows:
        bound = torch.full_like(fallback[0], 1e-5)  # the same fp32 GEMM as the fallback
    else:
        bound = F.linear(block_absmax(x[0]) / (2 * ACT_MAX), scaled.abs()) * 1.001 + 1e-5
    assert ((y - fallback)[0].abs() <= bound).all()


needs_fused = pytest.mark.skipif(not kernels.available() or not kernels._has_avx512_bf16_attention(),
                                 reason="the fused int8 kernel needs AVX512-BF16")


@needs_fused
@pytest.mark.parametrize("m", [1, 12, 15, 16, 17, 33, 70])
@pytest.mark.parametrize("n, k, group", [(192, 576, 32), (13, 96, 32), (100, 256, 64)])
def test_fused_int8_kernel_matches_the_reference(m, n, k, group):
    """int8_linear_bf16 (weights dequantized tile by tile into bf16 dot products): within bf16 rounding of
    the exact product (x and w each rounded to bf16: at most 2^-7 sum |x w|), any row count, N not a
    multiple of its tile, panels partly empty, 3-d input, with and without a bias."""
    torch.manual_seed(m + n)
    q, d = ref.quantize_int8(torch.randn(n, k), group)
    deq = ref.dequantize_int8(q, d)
    x, bias = torch.randn(2, m, k), torch.randn(n)
    ext = kernels._load("attention")
    for b in (bias, None):
        got = ext.int8_linear_bf16(x, q, d, b)
        want = F.linear(x, deq, b)
        assert got.shape == (2, m, n)
        assert ((got - want).abs() <= 2**-7 * 1.01 * F.linear(x.abs(), deq.abs()) + 1e-5).all()
    assert (got - F.linear(x.bfloat16().float(), deq.bfloat16().float())).abs().max() < 1e-3  # bf16 inputs


@needs_fused
def test_fused_int8_dispatch_and_switch(monkeypatch):
    q, d = ref.quantize_int8(torch.randn(64, 128), 32)
    x = torch.randn(kernels.FUSED_INT8_MIN_ROWS, 128)
    fused = kernels._load("attention").int8_linear_bf16(x, q, d, None)
    assert torch.equal(kernels.int8_linear(x, q, d), fused)
    monkeypatch.setenv("KUAIDA_NO_FUSED_INT8", "1")
    assert not kernels.fused_int8() and not torch.equal(kernels.int8_linear(x, q, d), fused)
    monkeypatch.delenv("KUAIDA_NO_FUSED_INT8")
    fewer = x[:-1]  # below the threshold: the few-rows kernel, which sums in another order
    rows = kernels._load("attention").int8_linear_bf16_rows(fewer, q, d, None)
    assert torch.equal(kernels.int8_linear(fewer, q, d), rows)
    assert not torch.equal(rows, kernels._load("attention").int8_linear_bf16(fewer, q, d, None))
    with kernels.row_independent():  # any row count
        assert torch.equal(kernels.int8_linear(x, q, d),
                           kernels._load("attention").int8_linear_bf16_rows(x, q, d, None))
    monkeypatch.setenv("KUAIDA_NO_BF16_DECODE", "1")
    assert torch.equal(kernels.int8_linear(fewer, q, d), kernels._load().int8_linear(fewer, q, d, None, True))


@needs_fused
@pytest.mark.parametrize("n, k, group", [(192, 576, 32), (13, 96, 32), (100, 256, 64), (77, 1536, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_rows_kernel_matches_the_reference_and_is_row_independent(n, k, group, threads):
    """int8_linear_bf16_rows (decode): within bf16 rounding of the exact product at 1-33 rows (full and
    partial 8-row tiles, an odd N for the single-weight-row tail, 3-d input, with and without bias), equal to
    the product of bf16-rounded inputs up to fp32 summation order, and each row's output bitwise the same as
    that row alone, whatever the rows around it and the thread count."""
    torch.manual_seed(n + k)
    q, d = ref.quantize_int8(torch.randn(n, k), group)
    deq = ref.dequantize_int8(q, d)
    ext = kernels._load("attention")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, bias = torch.randn(33, k), torch.randn(n)
        alone = {b is None: torch.cat([ext.int8_linear_bf16_rows(x[i:i + 1], q, d, b) for i in range(33)])
                 for b in (bias, None)}
        for m in (1, 3, 4, 7, 8, 9, 16, 33):
            for b in (bias, None):
                got = ext.int8_linear_bf16_rows(x[:m][None], q, d, b)[0]
                want = F.linear(x[:m], deq, b)
                assert ((got - want).abs() <= 2**-7 * 1.01 * F.linear(x[:m].abs(), deq.abs()) + 1e-5).all()
                bf16_inputs = F.linear(x[:m].bfloat16().double(), deq.bfloat16().double(),
                                       None if b is None else b.double())
                assert (got - bf16_inputs).abs().max() < 1e-4 * (1 + bf16_inputs.abs().max())
                assert torch.equal(got, alone[b is None][:m])
                window = ext.int8_linear_bf16_rows(x[m - 1:m + 2], q, d, b)
                assert torch.equal(window, alone[b is None][m - 1:m + 2])
    finally:
        torch.set_num_threads(before)


ACT16_MAX = 32767  # int8_linear_rows16's activation grid per 32-block


@needs_kernels
@pytest.mark.parametrize("n, k, group", [(192, 576, 32), (13, 96, 32), (100, 256, 64), (77, 1536, 32)])
@pytest.mark.parametrize("tile", [(4, 2), (1, 1), (3, 4), (8, 1), (6, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_rows16_kernel_matches_the_reference_and_is_row_independent(n, k, group, tile, threads):
    """int8_linear_rows16 (AVX2: activations on a 16-bit grid per 32-block, vpmaddwd): within that grid's
    bound of the exact dequantized product (each x_i moves by at most absmax_b / 65534), at 1-33 rows (full
    and partial tiles, an N not a multiple of the weight-row tile, an odd number of 32-blocks, 3-d input,
    with and without bias), and each row's output bitwise the same as that row alone, whatever the rows
    around it, the register tile and the thread count (the scheduler's row_independent() relies on it)."""
    wargs, deq, scaled = make("int8", n, k, group, seed=n + k)
    ext = kernels._load()
    op = ext.int8_linear_rows16
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(k)
        x, bias = torch.randn(33, k, generator=g) * 3, torch.randn(n, generator=g)
        ext.set_rows16_tile(1, 1)
        alone = {b is None: torch.cat([op(x[i:i + 1], *wargs, b) for i in range(33)]) for b in (bias, None)}
        ext.set_rows16_tile(*tile)
        for m in (1, 2, 3, 4, 7, 8, 9, 16, 33):
            for b in (bias, None):
                got = op(x[:m][None], *wargs, b)[0]
                want = F.linear(x[:m], deq, b)
                bound = F.linear(block_absmax(x[:m]) / (2 * ACT16_MAX), scaled.abs()) * 1.001 + 1e-4
                assert ((got - want).abs() <= bound).all()
                assert torch.equal(got, alone[b is None][:m])
                window = op(x[m - 1:m + 2], *wargs, b)
                assert torch.equal(window, alone[b is None][m - 1:m + 2])
    finally:
        ext.set_rows16_tile(4, 2)
        torch.set_num_threads(before)


@needs_kernels
def test_int8_rows16_is_finer_than_the_15_bit_kernel_and_handles_zeros():
    """The 16-bit grid halves the 15-bit kernel's worst-case activation rounding; an all-zero block and an
    all-zero row give exact zeros (no division by a zero absmax)."""
    wargs, deq, _ = make("int8", 192, 576)
    x, _ = inputs(8, 576, 192, False)
    x[3] = 0
    x[5, :32] = 0
    ext = kernels._load()
    exact = F.linear(x, deq)
    err16 = (ext.int8_linear_rows16(x, *wargs, None) - exact).abs()
    err15 = (ext.int8_linear(x, *wargs, None, False) - exact).abs()
    assert err16.mean() < 0.75 * err15.mean()
    assert torch.equal(ext.int8_linear_rows16(x, *wargs, None)[3], torch.zeros(192))
    with pytest.raises(RuntimeError, match="tile"):
        ext.set_rows16_tile(5, 2)


@needs_kernels
def test_rows16_dispatch_and_switch(monkeypatch):
    """Without the AVX-512 paths, int8 layers take rows16 for decode (inside row_independent(): any row count)
    and for prefill below ROWS16_MAX_ROWS, fp32 GEMM from it (where bf16 GEMM is slow);
    KUAIDA_NO_ROWS16=1 gives back the 15-bit kernel below FP32_GEMM_MIN_ROWS."""
    monkeypatch.setenv("KUAIDA_NO_AVX512", "1")
    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: False)
    (q, d), _, _ = make("int8", 64, 128)
    ext = kernels._load()
    x = torch.randn(kernels.ROWS16_MAX_ROWS, 128)
    below = x[:-1]
    assert kernels.rows16() and kernels.fp32_gemm_min_rows("int8") == kernels.ROWS16_MAX_ROWS
    assert torch.equal(kernels.int8_linear(below, q, d), ext.int8_linear_rows16(below, q, d, None))
    assert not torch.equal(kernels.int8_linear(x, q, d), ext.int8_linear_rows16(x, q, d, None))  # fp32 GEMM
    with kernels.row_independent():
        assert torch.equal(kernels.int8_linear(x, q, d), ext.int8_linear_rows16(x, q, d, None))
    monkeypatch.setenv("KUAIDA_NO_ROWS16", "1")
    assert not kernels.rows16() and kernels.fp32_gemm_min_rows("int8") == kernels.FP32_GEMM_MIN_ROWS["int8"]
    few = x[:8]
    assert torch.equal(kernels.int8_linear(few, q, d), ext.int8_linear(few, q, d, None, False))


@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("bf16_fast", [False, True])
def test_row_independent_rows_match_single_row_calls(dtype, bf16_fast, monkeypatch):
    """Inside kernels.row_independent() every row count takes the integer kernel, so each row's output is
    bitwise the output of that row alone (what the batching scheduler relies on); outside it, 200 rows take
    a GEMM path (bf16 with native bf16, fp32 otherwise), which rounds each row differently."""
    monkeypatch.setattr(kernels, "bf16_gemm_is_fast", lambda: bf16_fast)
    wargs, _, _ = make(dtype, 192, 576)
    x, bias = inputs(200, 576, 192, True)
    op = kernels.int8_linear if dtype == "int8" else kernels.int4_linear
    alone = torch.cat([op(x[i:i + 1], *wargs, bias) for i in range(len(x))])
    with kernels.row_independent():
        together = op(x, *wargs, bias)
    assert torch.equal(together, alone)
    assert not torch.equal(op(x, *wargs, bias), alone)  # the batch paths are back outside the block


def test_build_failure_falls_back(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'kuaida_qgemm': c++ not found")

    monkeypatch.delenv("KUAIDA_NO_KERNELS", raising=False)
    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(kernels, "_cpu_supported", lambda: True)
    with caplog.at_level(logging.WARNING, logger="kuaida.kernels"):
        assert kernels._load.__wrapped__() is None
    assert "could not build kuaida kernels" in caplog.text and "c++ not found" in caplog.text


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (3, 96), dtype=torch.uint8)
    packed = ref.pack_int4(q)
    assert packed.shape == (3, 48)
    assert torch.equal(packed[0, 0], q[0, 0] | (q[0, 16] << 4))
    assert torch.equal(ref.unpack_int4(packed), q)


def test_int4_reproduces_q4_1_weights():
    """Weights that are already dequantized Q4_1 (fp16 d, m; q in 0..15 using the full range) come back
    exactly: the default model's weights are such, so int4 loses nothing on them."""
    g = torch.Generator().manual_seed(3)
    d = (torch.rand(8, 4, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (torch.randn(8, 4, 1, generator=g) * 0.05).half().float()
    q = torch.randint(0, 16, (8, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    w = (q * d + m).reshape(8, 128)
    assert torch.equal(ref.dequantize_int4(*ref.quantize_int4(w, 32)), w)


def test_int8_reproduces_q8_0_weights():
    g = torch.Generator().manual_seed(4)
    d = (torch.rand(8, 4, 1, generator=g) * 0.01 + 1e-3).half().float()
    q = torch.randint(-127, 128, (8, 4, 32), generator=g).float()
    q[..., 0] = 127
    w = (q * d).reshape(8, 128)
    assert torch.equal(ref.dequantize_int8(*ref.quantize_int8(w, 32)), w)


def test_quantize_handles_constant_and_zero_groups():
    w = torch.zeros(2, 64)
    w[1] = 0.25
    torch.testing.assert_close(ref.dequantize_int8(*ref.quantize_int8(w, 32)), w, rtol=0, atol=2e-3)
    assert torch.equal(ref.dequantize_int4(*ref.quantize_int4(w, 32)), w)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim",
                         [(9, 3, 64), (4, 4, 32), (8, 2, 128), (12, 2, 40), (20, 2, 64)])
def test_decode_attention_matches_sdpa(heads, kv_heads, dim, cache_dtype):
    """Ragged rows (lengths 1 .. 300, scattered cache rows, one row twice) against one SDPA per row
    (over the same fp16 values upcast, for an fp16 cache)."""
    g = torch.Generator().manual_seed(2)
    k = torch.randn(6, kv_heads, 320, dim, generator=g).to(cache_dtype)
    v = torch.randn(6, kv_heads, 320, dim, generator=g).to(cache_dtype)
    rows = torch.tensor([5, 0, 3, 3, 1])
    lens = torch.tensor([300, 1, 7, 129, 64])
    q = torch.randn(5, heads, dim, generator=g) * 3  # sharp softmax: exercises the exp range
    out = kernels.decode_attention(q, k, v, rows, lens)
    want = ref.decode_attention(q, k, v, rows, lens)
    assert out.shape == (5, heads, dim)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decode_attention_shared_prefixes_are_read_from_their_source(cache_dtype):
    """Rows 2 and 4 hold a copy of row 0's first 200 positions (a system prompt copied into two slots);
    two entries of row 2 are a token and its draft. Reading the prefix from row 0 once (srcs, shared)
    gives bitwise the result of reading each row, and each entry's result is the one it gets alone."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(5, 3, 320, 64, generator=g).to(cache_dtype)
    v = torch.randn(5, 3, 320, 64, generator=g).to(cache_dtype)
    for row in (2, 4):
        k[row, :, :200], v[row, :, :200] = k[0, :, :200], v[0, :, :200]
    rows, lens = torch.tensor([2, 4, 2, 1]), torch.tensor([250, 300, 251, 90])
    q = torch.randn(4, 9, 64, generator=g) * 3
    plain = kernels.decode_attention(q, k, v, rows, lens)
    srcs, shared = torch.tensor([0, 0, 0, 1]), torch.tensor([200, 150, 200, 0])
    assert torch.equal(kernels.decode_attention(q, k, v, rows, lens, srcs, shared), plain)
    for b in range(4):
        alone = kernels.decode_attention(q[b:b + 1], k, v, rows[b:b + 1], lens[b:b + 1])
        assert torch.equal(alone[0], plain[b])
    torch.testing.assert_close(plain, ref.decode_attention(q, k, v, rows, lens), atol=2e-5, rtol=1e-4)
    # The prefix is really read from row 0: change it there and the shared read (only) sees the change.
    k[0, :, 10] += 1.0
    assert not torch.equal(kernels.decode_attention(q, k, v, rows, lens, srcs, shared), plain)
    assert torch.equal(kernels.decode_attention(q, k, v, rows, lens), plain)


@needs_kernels
def test_decode_attention_rejects_out_of_range_rows():
    k = v = torch.zeros(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="out of the cache's range"):
        kernels.decode_attention(torch.zeros(1, 2, 8), k, v, torch.tensor([2]), torch.tensor([1]))


@needs_kernels
def test_write_kv_fp16_matches_torch_indexed_write():
    from kuaida.model.kv_cache import KVCache

    torch.manual_seed(0)
    ours, theirs = (KVCache(2, 3, 3, 48, 64, torch.float16) for _ in range(2))
    pos = torch.tensor([[2, 3, 4, 17, 18, 40]])  # gaps: a prompt around passages written from a cache
    k = torch.randn(1, 6, 3, 64).transpose(1, 2)  # [1, Hkv, T, D], not contiguous: as the model makes it
    v = torch.randn(1, 3, 6, 64)
    for layer in range(2):
        ours.write(layer, pos, k, v, slice(1, 2))
        theirs.k[layer][torch.tensor([[1]]), :, pos] = k.transpose(1, 2).half()
        theirs.v[layer][torch.tensor([[1]]), :, pos] = v.transpose(1, 2).half()
    for a, b in zip(ours.k + ours.v, theirs.k + theirs.v):
        assert torch.equal(a, b)
    assert ours.k[0][[0, 2]].abs().sum() == 0  # other rows untouched
    with pytest.raises(RuntimeError, match="out of the cache's range"):
        kernels.write_kv_fp16(ours.k[0], ours.v[0], 1, torch.tensor([2, 48]), k[0, :, :2], v[0, :, :2])


@needs_kernels
def test_write_kv_rows_fp16_matches_torch_indexed_write():
    """A decode step's keys/values (one per row and position, as KVCache.decode writes them) in C++."""
    torch.manual_seed(0)
    kc, vc = torch.zeros(4, 3, 32, 64, dtype=torch.float16), torch.zeros(4, 3, 32, 64, dtype=torch.float16)
    want_k, want_v = kc.clone(), vc.clone()
    rows, pos = torch.tensor([2, 0, 2]), torch.tensor([5, 31, 6])  # a row twice: a token and its draft
    k = torch.randn(3, 1, 3, 64).transpose(1, 2)  # [B, Hkv, 1, D] with the model's strides
    v = torch.randn(3, 3, 1, 64)
    assert kernels.write_kv_rows_fp16(kc, vc, rows, pos, k, v)
    want_k[rows, :, pos], want_v[rows, :, pos] = k[:, :, 0].half(), v[:, :, 0].half()
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    with pytest.raises(RuntimeError, match="out of the cache's range"):
        kernels.write_kv_rows_fp16(kc, vc, torch.tensor([4]), torch.tensor([0]), k[:1], v[:1])
    assert not kernels.write_kv_rows_fp16(kc.float(), vc.float(), rows, pos, k, v)  # fp32 cache: torch writes


@needs_kernels
def test_place_passage_matches_the_torch_rotation():
    torch.manual_seed(0)
    L, H, T, D, S, row, start = 3, 3, 13, 64, 64, 1, 20
    k, v = torch.randn(L, H, T, D).half(), torch.randn(L, H, T, D).half()
    angle = torch.rand(D // 2) * 6
    c, s = angle.cos(), angle.sin()
    kcs = [torch.zeros(2, H, S, D, dtype=torch.float16) for _ in range(L)]
    vcs = [torch.zeros(2, H, S, D, dtype=torch.float16) for _ in range(L)]
    assert kernels.place_passage(kcs, vcs, row, start, k, v, c, s)
    x1, x2 = k.float()[..., :D // 2], k.float()[..., D // 2:]
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).half()
    for layer in range(L):
        got = kcs[layer][row, :, start:start + T]
        assert (got.float() - want[layer].float()).abs().max() <= 1e-3 * want.float().abs().max()
        assert torch.equal(vcs[layer][row, :, start:start + T], v[layer])
        assert kcs[layer][row, :, :start].abs().sum() == 0 and kcs[layer][0].abs().sum() == 0
    with pytest.raises(RuntimeError, match="out of the cache's range"):
        kernels.place_passage(kcs, vcs, row, S - 5, k, v, c, s)
