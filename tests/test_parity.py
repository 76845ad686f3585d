"""Our loaded models against transformers on the same tiny random checkpoints: full-sequence logits,
prefill + decode through the KV cache, cache rewind, greedy generation; and the transformers fallback
adapter for an architecture without a native module."""
import pytest
import torch

from kuaida.model.hf_backend import HFCausalLM
from kuaida.model.loader import load_model
from kuaida.model.transformer import Transformer

TOL = 1e-4  # fp32, same op order: differences are rounding noise, ~1e-6 in practice

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
VARIANTS = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied-llama3-rope": ("llama", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama-linear-rope-wide-heads": ("llama", dict(head_dim=32, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "qwen2-bias-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(tie_word_embeddings=False, sliding_window=None)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine the thread handoff costs
    ~20 ms per op: run this module single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, make_hf_dir):
    """(our LoadedModel, transformers' model) for one checkpoint variant."""
    model_type, overrides = VARIANTS[request.param]
    path = make_hf_dir(model_type, **overrides)
    return load_model(str(path)), hf_reference(path)


def random_tokens(vocab: int, shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(tokens).logits.float()


def run_chunks(model, tokens: torch.Tensor, bounds: list[int], cache, start: int = 0) -> torch.Tensor:
    """Feed tokens[:, start:] through `model` in chunks ending at `bounds`; -> their logits concatenated."""
    out = []
    with torch.inference_mode():
        for lo, hi in zip([start] + bounds[:-1], bounds, strict=True):
            out.append(model(tokens[:, lo:hi], torch.arange(lo, hi)[None], cache))
    return torch.cat(out, dim=1)


def greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding over our model with its KV cache: prefill once, then one token at a time."""
    cache, T = model.new_cache(), prompt.shape[1]
    ids = []
    with torch.inference_mode():
        logits = model(prompt, torch.arange(T)[None], cache, last_only=True)
        for pos in range(T, T + n):
            ids.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[ids[-1]]]), torch.tensor([[pos]]), cache)
    return ids


def test_loads_natively(pair):
    loaded, hf = pair
    assert loaded.backend == "native" and isinstance(loaded.model, Transformer)
    assert loaded.args.tie_embeddings == hf.config.tie_word_embeddings
    assert (loaded.model.lm_head.weight is loaded.model.embed_tokens.weight) == loaded.args.tie_embeddings
    assert not any(t.is_meta for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    assert loaded.model.embed_tokens.weight.dtype == torch.float32 and not loaded.model.training


def test_logits_match_transformers(pair):
    loaded, hf = pair
    tokens = random_tokens(loaded.args.vocab_size, (2, 48))  # batch 2, no cache
    with torch.inference_mode():
        ours = loaded.model(tokens)
    ref = hf_logits(hf, tokens)
    assert ref.abs().max() > 1.0  # the check below would be vacuous on near-zero logits
    assert (ours - ref).abs().max() < TOL


def test_prefill_then_decode_through_cache_matches_full_forward(pair):
    loaded, hf = pair
    tokens = random_tokens(loaded.args.vocab_size, (1, 40), seed=2)
    ours = run_chunks(loaded.model, tokens, [17, 18, 25, *range(26, 41)], loaded.model.new_cache(max_seq=64))
    assert (ours - hf_logits(hf, tokens)).abs().max() < TOL


def test_cache_rewind_reuses_prefix(pair):
    """Positions restarting inside the cached span overwrite it: a shared prefix is reused."""
    loaded, hf = pair
    first = random_tokens(loaded.args.vocab_size, (1, 30), seed=3)
    second = torch.cat([first[:, :12], random_tokens(loaded.args.vocab_size, (1, 10), seed=4)], dim=1)
    cache = loaded.model.new_cache(max_seq=64)
    run_chunks(loaded.model, first, [30], cache)
    ours = run_chunks(loaded.model, second, [20, 22], cache, start=12)
    assert (ours - hf_logits(hf, second)[:, 12:]).abs().max() < TOL


def test_greedy_generation_matches_transformers_generate(pair):
    loaded, hf = pair
    prompt = random_tokens(loaded.args.vocab_size, (1, 12), seed=5)
    # No eos: both sides must produce all 20 tokens.
    ref = hf.generate(prompt, do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert ref.shape[1] == 32
    assert greedy(loaded.model, prompt, 20) == ref[0, 12:].tolist()


# -- the transformers fallback ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_pair(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir)), hf_reference(tiny_gpt2_dir)


def test_gpt2_runs_through_transformers_backend(gpt2_pair):
    loaded, hf = gpt2_pair
    assert loaded.backend == "transformers" and loaded.args is None
    assert isinstance(loaded.model, HFCausalLM)
    assert loaded.model.args.vocab_size == hf.config.vocab_size
    assert loaded.model.args.max_seq_len == hf.config.n_positions
    assert loaded.tokenizer.chat_template


def test_gpt2_adapter_cache_matches_full_forward(gpt2_pair):
    loaded, hf = gpt2_pair
    tokens = random_tokens(hf.config.vocab_size, (1, 30), seed=6)
    ref = hf_logits(hf, tokens)
    assert ref.abs().max() > 1.0
    with torch.inference_mode():
        assert (loaded.model(tokens) - ref).abs().max() < TOL
        last = loaded.model(tokens, last_only=True)
    assert last.shape == (1, 1, hf.config.vocab_size) and (last[:, 0] - ref[:, -1]).abs().max() < TOL
    cache = loaded.model.new_cache()
    ours = run_chunks(loaded.model, tokens, [11, 12, 20, *range(21, 31)], cache)
    assert cache.length == 30 and (ours - ref).abs().max() < TOL
    assert cache.nbytes() == 2 * 2 * 30 * 64 * 4  # layers x (k, v) x tokens x width x fp32


def test_gpt2_adapter_rewind_and_greedy(gpt2_pair):
    loaded, hf = gpt2_pair
    first = random_tokens(hf.config.vocab_size, (1, 25), seed=7)
    second = torch.cat([first[:, :9], random_tokens(hf.config.vocab_size, (1, 8), seed=8)], dim=1)
    cache = loaded.model.new_cache()
    run_chunks(loaded.model, first, [25], cache)
    ours = run_chunks(loaded.model, second, [17], cache, start=9)
    assert (ours - hf_logits(hf, second)[:, 9:]).abs().max() < TOL
    ref = hf.generate(first[:, :10], do_sample=False, max_new_tokens=15, eos_token_id=None, pad_token_id=0)
    assert greedy(loaded.model, first[:, :10], 15) == ref[0, 10:].tolist()


def test_gpt2_adapter_refuses_batches(gpt2_pair):
    from kuaida.errors import UnsupportedModelError

    loaded, _ = gpt2_pair
    with pytest.raises(UnsupportedModelError):
        loaded.model.new_cache(batch=2)
    with pytest.raises(UnsupportedModelError):
        loaded.model(torch.zeros(2, 3, dtype=torch.long))
