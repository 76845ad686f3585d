"""The token generator on a tiny random model: prefix reuse, limits, end of turn, seeded sampling."""
import pytest
import torch
from conftest import tiny_transformer

from kuaida.engine.generate import Engine, GenerationStats
from kuaida.engine.sampling import SamplingParams
from kuaida.errors import ContextLengthError


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(std=0.02)


def run(engine, prompt, **kw):
    stats = GenerationStats()
    return list(engine.generate(prompt, SamplingParams(**kw), stats)), stats


def greedy_reference(model, prompt, n):
    """Greedy decoding by re-running the whole sequence each step: no cache involved."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_matches_uncached_reference(model):
    prompt = [5, 17, 42, 99, 3, 250]
    tokens, stats = run(Engine(model, eos_ids=set()), prompt, max_new_tokens=12, temperature=0)
    assert tokens == greedy_reference(model, prompt, 12)
    assert stats.completion_tokens == 12 and stats.finish_reason == "length"


def test_next_turn_reuses_cached_prefix(model):
    engine = Engine(model, eos_ids=set())
    first, _ = run(engine, [1, 2, 3, 4, 5], max_new_tokens=6, temperature=0)
    follow_up = [1, 2, 3, 4, 5] + first + [7, 8, 9]
    warm, stats = run(engine, follow_up, max_new_tokens=8, temperature=0)
    # Every token of the previous turn whose KV was computed is reused (the last reply token was not fed back).
    assert stats.cached_tokens == 5 + len(first) - 1
    cold, cold_stats = run(Engine(model, eos_ids=set()), follow_up, max_new_tokens=8, temperature=0)
    assert cold_stats.cached_tokens == 0
    assert warm == cold


def test_diverging_prompt_recomputes_from_divergence(model):
    engine = Engine(model, eos_ids=set())
    run(engine, [1, 2, 3, 4, 5, 6], max_new_tokens=2, temperature=0)
    tokens, stats = run(engine, [1, 2, 9, 9, 9], max_new_tokens=5, temperature=0)
    assert stats.cached_tokens == 2
    assert tokens == greedy_reference(model, [1, 2, 9, 9, 9], 5)


def test_end_of_turn_token_stops_and_is_not_yielded(model):
    prompt = [10, 20, 30]
    expected = greedy_reference(model, prompt, 4)
    tokens, stats = run(Engine(model, eos_ids={expected[2]}), prompt, max_new_tokens=10, temperature=0)
    assert tokens == expected[:expected.index(expected[2])]
    assert stats.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(model):
    engine = Engine(model, eos_ids=set())
    a, _ = run(engine, [3, 1, 4], max_new_tokens=16, temperature=1.0, seed=123)
    b, _ = run(engine, [3, 1, 4], max_new_tokens=16, temperature=1.0, seed=123)
    c, _ = run(engine, [3, 1, 4], max_new_tokens=16, temperature=1.0, seed=7)
    assert a == b
    assert a != c


def test_prompt_longer_than_context_is_a_clear_error(model):
    engine = Engine(model, eos_ids=set(), max_context=16)
    with pytest.raises(ContextLengthError, match="16"):
        run(engine, list(range(16)), max_new_tokens=4)


def test_reply_is_clipped_to_the_context_window(model):
    engine = Engine(model, eos_ids=set(), max_context=20)
    tokens, stats = run(engine, list(range(15)), max_new_tokens=100, temperature=0)
    assert len(tokens) == 5 and stats.finish_reason == "length"


def test_batched_rows_match_single_rows(model):
    """Two sequences of different lengths decoded together in one forward match each decoded alone."""
    cache = model.new_cache(batch=2, max_seq=32)
    a, b = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[9, 8, 7]])
    with torch.inference_mode():
        model(a, torch.arange(5)[None], cache, rows=torch.tensor([0]))
        model(b, torch.arange(3)[None], cache, rows=torch.tensor([1]))
        step = model(torch.tensor([[6], [6]]), torch.tensor([[5], [3]]), cache, rows=torch.tensor([0, 1]))
        ref_a = model(torch.tensor([[1, 2, 3, 4, 5, 6]]))[:, -1]
        ref_b = model(torch.tensor([[9, 8, 7, 6]]))[:, -1]
    torch.testing.assert_close(step[0, -1], ref_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[1, -1], ref_b[0], atol=1e-4, rtol=1e-4)


def test_common_prefix_matches_a_token_by_token_scan():
    """The bisecting common_prefix against the plain loop it replaced, on random near-equal lists."""
    import random

    from kuaida.engine.generate import common_prefix

    def scan(cached, prompt):
        n, limit = 0, min(len(cached), len(prompt) - 1)
        while n < limit and cached[n] == prompt[n]:
            n += 1
        return n

    rng = random.Random(0)
    for _ in range(3000):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 200))]
        b = a[:rng.randint(0, len(a))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 200))]
        assert common_prefix(a, b) == scan(a, b) and common_prefix(b, a) == scan(b, a)
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 2  # one prompt token is always left to prefill
    assert common_prefix([], []) == 0
