import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kuaida.engine.sampling import (
    NUCLEUS_CANDIDATES,
    SamplingParams,
    make_generator,
    processed_logits,
    sample,
)
from kuaida.errors import InvalidArgumentError


def _logits(B: int, V: int, scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * scale


def _seen(B: int, V: int, S: int = 40) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))


def _transformers_logits(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """The same filters as transformers' generate() chains them."""
    chain = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    chain.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        chain.append(TopPLogitsWarper(p.top_p))
    return chain(seen, logits.clone())


@pytest.mark.parametrize(
    "V, scale, kwargs",
    [
        (2000, 2.0, dict(temperature=0.7)),
        (2000, 2.0, dict(temperature=1.3, top_k=50)),
        (2000, 2.0, dict(temperature=0.7, top_p=0.9)),
        (2000, 2.0, dict(temperature=1.0, top_k=40, top_p=0.8)),
        (2000, 2.0, dict(temperature=0.8, top_k=100, top_p=0.95, repetition_penalty=1.3)),
        (2000, 2.0, dict(temperature=0.5, repetition_penalty=0.8)),
        # 49k vocabulary: a peaked distribution whose nucleus fits in the candidate list ...
        (49152, 4.0, dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2)),
        # ... and a flat one whose nucleus does not (the full-sort path).
        (49152, 1.0, dict(temperature=1.0, top_p=0.5)),
    ],
)
def test_filters_match_transformers(V, scale, kwargs):
    logits, seen = _logits(3, V, scale), _seen(3, V)
    params = SamplingParams(**kwargs)
    ours = processed_logits(logits, params, seen)
    theirs = _transformers_logits(logits, params, seen)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))  # same surviving tokens
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(theirs, -1), atol=1e-6, rtol=1e-4)


def test_full_sort_path_is_exercised():
    params = SamplingParams(temperature=1.0, top_p=0.5)
    survivors = torch.isfinite(processed_logits(_logits(1, 49152, 1.0), params)).sum()
    assert survivors > NUCLEUS_CANDIDATES


def test_greedy_is_argmax_and_leaves_generator_alone():
    logits, seen = _logits(4, 1000, 1.0), _seen(4, 1000)
    gen = make_generator(3)
    state = gen.get_state()
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    expected = _transformers_logits(logits, SamplingParams(repetition_penalty=1.5), seen).argmax(-1)
    assert torch.equal(sample(logits, params, gen, seen), expected)
    assert torch.equal(sample(logits, SamplingParams(temperature=0), gen), logits.argmax(-1))
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6)])
def test_single_survivor_equals_greedy(kwargs):
    logits = _logits(4, 1000, 1.0)
    params = SamplingParams(temperature=1.5, **kwargs)
    for seed in range(5):
        assert torch.equal(sample(logits, params, make_generator(seed)), logits.argmax(-1))


def _draws(seed: int, params: SamplingParams, n: int = 30) -> list[int]:
    logits, gen = _logits(1, 1000, 0.5), make_generator(seed)
    return [int(sample(logits, params, gen)) for _ in range(n)]


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=50), dict(top_p=0.9)])
def test_seeded_sampling_is_reproducible(kwargs):
    params = SamplingParams(temperature=1.0, **kwargs)
    assert _draws(7, params) == _draws(7, params)
    assert _draws(7, params) != _draws(8, params)


def test_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -math.inf]])
    params = SamplingParams(temperature=1.0)
    gen = make_generator(0)
    draws = sample(logits.expand(20000, -1), params, gen)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0)


def test_draws_stay_among_survivors():
    logits = _logits(8, 1000, 1.0)
    params = SamplingParams(temperature=1.0, top_k=5)
    top5 = logits.topk(5).indices
    for seed in range(10):
        tokens = sample(logits, params, make_generator(seed))
        assert (top5 == tokens[:, None]).any(-1).all()


def test_repetition_penalty_ignores_padding():
    logits = _logits(2, 100, 2.0)
    seen = torch.tensor([[5, 7, 9], [3, -1, -1]])
    params = SamplingParams(temperature=1.0, repetition_penalty=1.4)
    ours = processed_logits(logits, params, seen)
    for row, ids in enumerate([[5, 7, 9], [3]]):
        theirs = _transformers_logits(logits[row : row + 1], params, torch.tensor([ids]))
        torch.testing.assert_close(ours[row : row + 1], theirs)


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(1), make_generator(1)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_stop_is_normalised():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=101.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(seed=-1), "seed"),
        (dict(stop=("",)), "stop"),
        (dict(stop=("a", 3)), "stop"),
        (dict(stop=[str(i) for i in range(17)]), "stop"),
    ],
)
def test_validation(kwargs, word):
    with pytest.raises(InvalidArgumentError, match=word):
        SamplingParams(**kwargs)


def test_greedy_is_the_first_argmax_per_row():
    """Greedy sampling (numpy's argmax on CPU): each row's largest logit, the first one on ties, on views."""
    logits = torch.randn(5, 1000)
    logits[1, 7] = logits[1, 900] = 50.0
    params = SamplingParams(temperature=0.0)
    assert torch.equal(sample(logits, params, None), logits.argmax(-1))
    assert int(sample(logits, params, None)[1]) == 7
    assert torch.equal(sample(logits[:, ::2], params, None), logits[:, ::2].argmax(-1))  # strided view
    assert torch.equal(processed_logits(logits, params).isfinite().nonzero()[:, 1], logits.argmax(-1))
