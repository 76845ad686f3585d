"""Prompt-lookup drafts: the n-gram index, and an engine that verifies drafts gives greedy's reply."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_transformer

from kuaida.compress.quantize import quantize
from kuaida.engine.generate import Engine, GenerationStats
from kuaida.engine.lookup import LookupConfig, NgramIndex
from kuaida.engine.sampling import SamplingParams
from kuaida.errors import InvalidArgumentError
from kuaida.model.transformer import Transformer


def test_draft_copies_what_followed_the_longest_matching_tail():
    index = NgramIndex(LookupConfig(max_ngram=3, min_ngram=2, draft_tokens=3), [1, 2, 3, 4, 5, 9, 2, 3])
    assert index.draft() == [4, 5, 9]  # "2 3" occurred at 1..2, followed by 4 5 9
    index.extend([7])
    assert index.draft() == []  # "3 7" and "2 3 7" never occurred before
    config = LookupConfig(max_ngram=3, min_ngram=2, draft_tokens=4)
    index = NgramIndex(config, [8, 2, 3, 6, 1, 2, 3, 5, 1, 2, 3])
    assert index.draft() == [5, 1, 2, 3]  # "1 2 3" (at 4..6, then 5) beats the older, shorter "2 3 6"
    assert index.draft(limit=2) == [5, 1]
    assert index.draft(limit=0) == []


def test_draft_uses_the_latest_occurrence_and_single_tokens_only_when_asked():
    ids = [4, 9, 1, 4, 7, 2, 4]
    assert NgramIndex(LookupConfig(min_ngram=2), ids).draft() == []
    assert NgramIndex(LookupConfig(min_ngram=1, draft_tokens=2), ids).draft() == [7, 2]  # latest "4"


def test_bad_lookup_settings_are_refused():
    for bad in ({"min_ngram": 0}, {"min_ngram": 4, "max_ngram": 3}, {"draft_tokens": 0}):
        with pytest.raises(InvalidArgumentError):
            LookupConfig(**bad)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(std=0.02)


def generate(engine, prompt, n, **kw):
    stats = GenerationStats()
    return list(engine.generate(prompt, SamplingParams(max_new_tokens=n, temperature=0, **kw), stats)), stats


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_verified_drafts_give_the_greedy_reply(model, dtype):
    """Prompts that repeat themselves (drafts get proposed, some kept): with lookup the reply is token for
    token greedy decoding's, through the fp32 model and the int8 kernels (whose per-row sums must not
    depend on how many rows a call has)."""
    m = model if dtype == "fp32" else quantize(_copy(model), "int8")
    torch.manual_seed(1)
    kept = drafted = 0
    for trial in range(6):
        base = torch.randint(3, 250, (12,)).tolist()
        prompt = base + base[:5] + [int(torch.randint(3, 250, ()))] + base
        plain, _ = generate(Engine(m, eos_ids=set()), prompt, 24)
        engine = Engine(m, eos_ids=set())
        engine.use_prompt_lookup(LookupConfig(draft_tokens=4))
        drafted_tokens, stats = generate(engine, prompt, 24)
        assert drafted_tokens == plain, f"trial {trial}"
        assert stats.completion_tokens == 24 and stats.finish_reason == "length"
        kept += engine.lookup_stats.accepted
        drafted += engine.lookup_stats.drafted
    assert drafted > 0 and kept > 0  # the prompts repeat: drafts were made and some held


def _copy(model):
    clone = Transformer(model.args).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def test_lookup_respects_the_budget_and_stays_off_when_sampling(model):
    engine = Engine(model, eos_ids=set())
    engine.use_prompt_lookup(LookupConfig(draft_tokens=8))
    prompt = [5, 6, 7, 8, 9] * 4
    tokens, stats = generate(engine, prompt, 3)
    assert len(tokens) == 3 and stats.finish_reason == "length"
    before = engine.lookup_stats.steps
    stats = GenerationStats()
    list(engine.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0.8, seed=0), stats))
    assert engine.lookup_stats.steps == before  # sampled replies decode one token at a time


@pytest.mark.parametrize("dtype,max_batch,lookup_rows", [("fp32", 3, 8), ("int8", 3, 8), ("int8", 5, 20)])
def test_scheduler_drafts_give_each_request_its_greedy_reply(tiny_llama_dir, dtype, max_batch, lookup_rows):
    """Concurrent greedy requests with prompt lookup in the batching scheduler (drafts as extra rows of
    the decode step): each reply is the single-stream greedy reply, drafts were made and some kept. With
    20 rows a step the int8 layers would take the many-row paths (bf16 GEMM, fused bf16 kernel), which
    round differently: the scheduler keeps them on the row-independent integer kernel."""
    from kuaida.engine.scheduler import Scheduler
    from kuaida.model.loader import load_model

    loaded = load_model(str(tiny_llama_dir))
    m = loaded.model if dtype == "fp32" else quantize(loaded.model, "int8")
    eos = {loaded.tokenizer.eos_token_id}
    torch.manual_seed(2)
    prompts = []
    for _ in range(5):
        base = torch.randint(3, 250, (10,)).tolist()
        prompts.append(base + base[:4] + [7] + base)
    params = SamplingParams(max_new_tokens=48, temperature=0)

    def plain(prompt):
        return "".join(Engine(m, eos, max_context=128).stream(prompt, params, loaded.tokenizer))

    want = [plain(p) for p in prompts]
    sched = Scheduler(m, loaded.tokenizer, eos, max_batch=max_batch, max_context=128, cache_budget_mb=1,
                      lookup=LookupConfig(draft_tokens=4), lookup_rows=lookup_rows).start()
    try:
        streams = [sched.submit(p, params) for p in prompts]
        got = ["".join(s) for s in streams]
        sampled = sched.submit(prompts[0], SamplingParams(max_new_tokens=8, temperature=0.8, seed=1))
        "".join(sampled)
    finally:
        sched.stop()
    assert got == want
    assert sched.metrics.drafted_tokens > 0  # the prompts repeat: drafts were verified (kept or not)


class Cycler(torch.nn.Module):
    """A model whose greedy next token depends only on the current one (t -> CYCLE's next, else
    CYCLE[0]), computed through a real tiny model (its KV cache written as usual): replies repeat, so
    prompt-lookup drafts hold, on any CPU."""

    CYCLE = [11, 23, 35, 47, 59, 71]

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.args = inner, inner.args
        nxt = torch.full((inner.args.vocab_size,), self.CYCLE[0])
        nxt[self.CYCLE] = torch.tensor(self.CYCLE[1:] + self.CYCLE[:1])
        self.register_buffer("nxt", nxt)

    def new_cache(self, **kw):
        return self.inner.new_cache(**kw)

    def forward(self, tokens, positions=None, cache=None, rows=slice(0, 1), last_only=False):
        logits = self.inner(tokens, positions, cache, rows=rows, last_only=last_only)
        picked = tokens[:, -1:] if last_only else tokens
        return logits + 100 * torch.nn.functional.one_hot(self.nxt[picked], logits.shape[-1])


def test_scheduler_keeps_drafts_that_hold_and_budgets_rows(tiny_llama_dir):
    from kuaida.engine.scheduler import Scheduler
    from kuaida.model.loader import load_model

    loaded = load_model(str(tiny_llama_dir))
    m, eos = Cycler(loaded.model), {loaded.tokenizer.eos_token_id}
    params = SamplingParams(max_new_tokens=30, temperature=0)
    prompts = [[5, 6, 7, 11], [9, 23, 35], [100, 101]]
    want = ["".join(Engine(m, eos, max_context=128).stream(p, params, loaded.tokenizer)) for p in prompts]
    sched = Scheduler(m, loaded.tokenizer, eos, max_batch=3, max_context=128, cache_budget_mb=1,
                      lookup=LookupConfig(draft_tokens=4), lookup_rows=7).start()
    try:
        streams = [sched.submit(p, params) for p in prompts]
        got = ["".join(s) for s in streams]
    finally:
        sched.stop()
    assert got == want and all(s.stats.completion_tokens == 30 for s in streams)
    metrics = sched.metrics
    assert metrics.accepted_tokens == metrics.drafted_tokens > 30  # a cycle: every draft holds
    # 3 requests share 7 rows a step: at most 4 drafts a step, so at least (90 - 3) / 7 steps.
    assert 87 / 7 <= metrics.decode_steps < 87 / 3
