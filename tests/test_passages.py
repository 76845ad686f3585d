"""Passages encoded once and reused (kuaida.engine.passages): the engine's block-attention prefill against
an explicitly masked reference, position independence, LRU, and the same reply from a cold or warm cache,
through the Engine and through the batching Scheduler."""
import pytest
import torch
from conftest import tiny_transformer

from kuaida.engine.generate import Engine, prefill_prompt
from kuaida.engine.passages import PassageCache
from kuaida.engine.sampling import SamplingParams
from kuaida.engine.scheduler import Scheduler
from kuaida.model.loader import load_model
from kuaida.model.transformer import sdpa

ANCHOR = [1, 2, 3]


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(std=0.2)


def masked_reference(model, anchor, prefix, passages, suffix):
    """Last-token logits of prefix + passages + suffix where each passage attends only to `anchor` (virtual
    tokens placed right before it) and to itself, and every other token to all real tokens before it."""
    return segment_reference(model, anchor, [("text", prefix), *(("passage", p) for p in passages),
                                             ("text", suffix)])


def segment_reference(model, anchor, segments):
    """Last-token logits of the segments' tokens, one forward with explicit positions and mask. Segments:
    ("text", ids) attends to every real token before it; ("passage", ids) to `anchor` (virtual tokens
    placed right before it) and to itself; ("block", ids) only to itself (an anchor written from the
    cache)."""
    # group: -1 a text token, i >= 0: passage or block i, -2 - i: passage i's virtual anchor
    tokens, positions, group, kind = [], [], [], {}
    pos = 0
    for i, (k, ids) in enumerate(segments):
        kind[i] = k
        if k == "passage":
            for j, t in enumerate(anchor):
                tokens.append(t), positions.append(pos - len(anchor) + j), group.append(-2 - i)
        for t in ids:
            tokens.append(t), positions.append(pos), group.append(-1 if k == "text" else i)
            pos += 1
    n = len(tokens)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(a + 1):
            ga, gb = group[a], group[b]
            if ga == -1:  # a text token: every real token (text, passages, blocks) before it
                mask[a, b] = gb >= -1
            elif ga >= 0 and kind[ga] == "passage":  # its anchor and itself
                mask[a, b] = gb in (ga, -2 - ga)
            else:  # a block token, or a virtual anchor token: its own group
                mask[a, b] = gb == ga
    tok = torch.tensor([tokens])
    cos, sin = model.rope(torch.tensor([positions]))
    with torch.inference_mode():
        x = model.embed_tokens(tok)
        for layer in model.layers:
            x = layer(x, cos, sin, lambda q, k, v: sdpa(q, k, v, mask[None, None]))
        return model.lm_head(model.norm(x)).float()[0, -1]


def test_block_prefill_matches_the_masked_reference(model):
    prefix, p1, p2, suffix = [10, 11, 12, 13, 14], [40, 41, 42, 43], [50, 51, 52], [60, 61, 62]
    prompt = prefix + p1 + p2 + suffix
    spans = [(5, 9), (9, 12)]
    cache = model.new_cache(max_seq=64)
    got = prefill_prompt(model, cache, prompt, 0, 0, spans, PassageCache(model, ANCHOR))[0]
    want = masked_reference(model, ANCHOR, prefix, [p1, p2], suffix)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # ... and it is not plain full attention (the test would pass for any prefill otherwise).
    full = prefill_prompt(model, model.new_cache(max_seq=64), prompt, 0, 0, spans, None)[0]
    assert (full - want).abs().max() > 1e-3


def test_the_anchor_before_a_passage_is_written_from_the_cache_as_a_block(model):
    # A later turn's passages message: conversation, then the anchor (header + instruction), then passages.
    prefix, p1, p2, suffix = [10, 11, 12, 13, 14], [40, 41, 42, 43], [50, 51, 52], [60, 61, 62]
    prompt = prefix + ANCHOR + p1 + p2 + suffix
    spans = [(8, 12), (12, 15)]
    passages = PassageCache(model, ANCHOR)
    got = prefill_prompt(model, model.new_cache(max_seq=64), prompt, 0, 0, spans, passages)[0]
    want = segment_reference(model, ANCHOR, [("text", prefix), ("block", ANCHOR), ("passage", p1),
                                             ("passage", p2), ("text", suffix)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Not the anchor prefilled as text (attending to the prefix): that differs.
    as_text = segment_reference(model, ANCHOR, [("text", prefix + ANCHOR), ("passage", p1), ("passage", p2),
                                                ("text", suffix)])
    assert (as_text - want).abs().max() > 1e-3
    # At a prompt's start the block is what full attention computes: the same logits as prefilling it.
    opening = ANCHOR + p1 + suffix
    got = prefill_prompt(model, model.new_cache(max_seq=64), opening, 0, 0, [(3, 7)], passages)[0]
    want = segment_reference(model, ANCHOR, [("text", ANCHOR), ("passage", p1), ("text", suffix)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # An anchor partly inside the cached prefix is left to the prefill (its cached part stays as it was).
    cache = model.new_cache(max_seq=64)
    prefill_prompt(model, cache, prompt[:7], 0, 0, [], passages)
    resumed = prefill_prompt(model, cache, prompt, 7, 0, spans, passages)[0]
    torch.testing.assert_close(resumed, as_text, rtol=1e-4, atol=1e-4)


def test_a_passage_moved_elsewhere_gives_the_same_as_the_reference_there(model):
    passages = PassageCache(model, ANCHOR)
    p = [70, 71, 72, 73, 74, 75]
    for prefix in ([9], [9, 8, 7, 6, 5, 4, 3, 2, 1, 20, 21, 22, 23]):  # same cached passage, two places
        prompt = prefix + p + [80, 81]
        got = prefill_prompt(model, model.new_cache(max_seq=64), prompt, 0, 0,
                             [(len(prefix), len(prefix) + len(p))], passages)[0]
        torch.testing.assert_close(got, masked_reference(model, ANCHOR, prefix, [p], [80, 81]),
                                   rtol=1e-4, atol=1e-4)
    assert passages.stats.misses == 1 and passages.stats.hits == 1


def test_span_partly_inside_the_cached_prefix_and_spans_at_the_end(model):
    passages = PassageCache(model, ANCHOR)
    prompt = [10, 11, 40, 41, 42, 43, 60, 61]
    spans = [(2, 6)]
    whole = prefill_prompt(model, model.new_cache(max_seq=64), prompt, 0, 0, spans, passages)[0]
    cache = model.new_cache(max_seq=64)
    prefill_prompt(model, cache, prompt[:4], 0, 0, [(2, 4)], passages)  # caches 4 tokens, ends mid-span
    resumed = prefill_prompt(model, cache, prompt, 4, 0, spans, passages)[0]
    torch.testing.assert_close(resumed, whole, rtol=1e-5, atol=1e-5)
    # A span reaching the last prompt token is prefilled (its logits start the reply).
    last = prefill_prompt(model, model.new_cache(max_seq=64), prompt, 0, 0, [(6, 8)], passages)[0]
    plain = prefill_prompt(model, model.new_cache(max_seq=64), prompt, 0, 0, [], None)[0]
    torch.testing.assert_close(last, plain)


def test_lru_budget_and_validation(model):
    passages = PassageCache(model, ANCHOR, budget_mb=1)
    k, _ = passages.kv([5, 6, 7])
    per_token = 2 * k.numel() * k.element_size() // 3
    passages.budget = per_token * 10  # room for 10 tokens
    passages.clear()
    passages.kv([1] * 4), passages.kv([2] * 4)
    passages.kv([1] * 4)  # touch: [2]*4 becomes the oldest
    passages.kv([3] * 4)
    assert [1] * 4 in passages and [3] * 4 in passages and [2] * 4 not in passages
    assert passages.stats.evictions == 1 and passages.nbytes <= passages.budget
    with pytest.raises(ValueError):
        PassageCache(model, [])
    with pytest.raises(ValueError):
        passages.kv([1] * (passages.max_tokens + 1))


def test_engine_reply_is_the_same_with_a_cold_or_warm_passage_cache(model):
    prompt = [10, 11, 12] + [40, 41, 42, 43, 44] + [50, 51, 52] + [60, 61]
    spans = [(3, 8), (8, 11)]
    engine = Engine(model, eos_ids=set())
    engine.passages = PassageCache(model, ANCHOR)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    cold = list(engine.generate(prompt, greedy, spans=spans))
    engine.cached_ids = []
    warm = list(engine.generate(prompt, greedy, spans=spans))
    assert cold == warm and engine.passages.stats.hits == 2
    # Without a passage cache the spans are ordinary text (full attention): a different computation.
    plain = Engine(model, eos_ids=set())
    assert list(plain.generate(prompt, greedy, spans=spans)) == list(plain.generate(prompt, greedy))


def test_scheduler_uses_the_passage_cache_like_the_engine(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    m, tok = loaded.model, loaded.tokenizer
    prompt, spans = [10, 11, 12] + [40, 41, 42, 43, 44] + [60, 61], [(3, 8)]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    engine = Engine(m, eos_ids=set())
    engine.passages = PassageCache(m, ANCHOR)
    want = "".join(engine.stream(prompt, greedy, tok, spans=spans))
    sched = Scheduler(m, tok, set(), max_batch=2, max_context=64, cache_budget_mb=1,
                      passages=PassageCache(m, ANCHOR)).start()
    try:
        got = "".join(sched.submit(prompt, greedy, spans=spans))
    finally:
        sched.stop()
    assert got == want and sched.passages.stats.misses == 1


def test_fp16_cache_kernel_writes_match_the_torch_writes(monkeypatch):
    """An fp16 KV cache (the engine's default) takes the C++ writes (kernels.place_passage for passages,
    kernels.write_kv_fp16 for the gapped tokens around them): the same logits as the torch writes."""
    from kuaida import kernels

    if not kernels.available():
        pytest.skip("C++ kernels unavailable")
    model = tiny_transformer(std=0.2)
    model.kv_dtype = torch.float16
    prefix, p1, p2, suffix = [10, 11, 12, 13, 14], [40, 41, 42, 43], [50, 51, 52], [60, 61, 62]
    prompt = prefix + ANCHOR + p1 + p2 + suffix
    spans = [(8, 12), (12, 15)]
    calls = []
    for name in ("place_passage", "write_kv_fp16"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))

    def run():
        cache = model.new_cache(max_seq=64)
        logits = prefill_prompt(model, cache, prompt, 0, 0, spans, PassageCache(model, ANCHOR))[0]
        return logits, cache

    got, got_cache = run()
    assert {"place_passage", "write_kv_fp16"} <= set(calls)
    monkeypatch.setattr(kernels, "place_passage", lambda *a: False)
    monkeypatch.setattr(kernels, "write_kv_fp16", lambda *a: False)
    want, want_cache = run()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=2e-3)
