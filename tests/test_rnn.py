"""The GRU student: shapes, stepwise decode = whole-sequence forward, the Engine's extend-only reuse,
quantization and save -> load."""
import pytest
import torch

from kuaida.compress.quantize import Int8Linear, quantize
from kuaida.engine.generate import Engine, GenerationStats
from kuaida.engine.sampling import SamplingParams
from kuaida.errors import UnsupportedModelError
from kuaida.model.loader import load_model
from kuaida.model.rnn import GRUArgs, GRUModel, save_gru


def make_model(seed: int = 0, **overrides) -> GRUModel:
    torch.manual_seed(seed)
    model = GRUModel(GRUArgs.preset("tiny", **overrides)).eval()
    with torch.no_grad():  # larger weights than the default init: logits that differ clearly per token
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_forward_shapes(model):
    tokens = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        assert model(tokens).shape == (3, 11, 256)
        assert model(tokens, last_only=True).shape == (3, 1, 256)
    assert model.new_cache(batch=2).h.shape == (2, 2, 64)  # [n_layers, batch, hidden], whatever max_seq


def test_stepwise_decode_with_state_equals_whole_sequence(model):
    tokens = torch.randint(0, 256, (1, 12))
    state = model.new_cache()
    with torch.no_grad():
        full = model(tokens)
        prefill = model(tokens[:, :5], torch.arange(5)[None], state)
        steps = [model(tokens[:, t:t + 1], torch.tensor([[t]]), state) for t in range(5, 12)]
    assert torch.allclose(torch.cat([prefill] + steps, dim=1), full, atol=1e-5)
    assert state.lengths.tolist() == [12]


def test_state_restarts_at_position_zero_and_refuses_a_gap(model):
    tokens = torch.randint(0, 256, (1, 6))
    state = model.new_cache()
    with torch.no_grad():
        model(tokens, torch.arange(6)[None], state)
        again = model(tokens, torch.arange(6)[None], state)  # position 0: a fresh start
        assert torch.allclose(again, model(tokens), atol=1e-6)
        with pytest.raises(RuntimeError, match="only extended"):
            model(tokens[:, :1], torch.tensor([[3]]), state)


def test_quantized_gru_steps_through_int8_modules(model):
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        want = model(tokens)
        q = quantize(make_model(), "int8")
        assert isinstance(q.layers[0].hh_proj, Int8Linear) and isinstance(q.lm_head, Int8Linear)
        got = q(tokens)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert torch.allclose(got, want, atol=0.1 * want.abs().max().item())


def run(engine, prompt, n):
    stats = GenerationStats()
    return list(engine.generate(prompt, SamplingParams(max_new_tokens=n, temperature=0), stats)), stats


def greedy_reference(model, prompt, n):
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_engine_greedy_generation_and_multi_turn_reuse(model):
    engine = Engine(model, eos_ids=set())
    first, _ = run(engine, [1, 2, 3, 4, 5], 6)
    assert first == greedy_reference(model, [1, 2, 3, 4, 5], 6)
    follow_up = [1, 2, 3, 4, 5] + first + [7, 8, 9]
    warm, stats = run(engine, follow_up, 5)
    # The state saw the prompt and every reply token fed back (not the last one): only the rest is prefilled.
    assert stats.cached_tokens == 5 + len(first) - 1
    assert warm == greedy_reference(model, follow_up, 5)


def test_engine_restarts_when_the_prompt_does_not_extend_the_state(model):
    engine = Engine(model, eos_ids=set())
    run(engine, [1, 2, 3, 4, 5, 6], 3)
    tokens, stats = run(engine, [1, 2, 9, 9, 9], 4)  # shares a prefix, but a state cannot be cut back
    assert stats.cached_tokens == 0
    assert tokens == greedy_reference(model, [1, 2, 9, 9, 9], 4)


def test_save_load_gives_the_same_logits(tmp_path, tiny_tokenizer):
    model = make_model(vocab_size=len(tiny_tokenizer), tie_embeddings=False)
    save_gru(model, tiny_tokenizer, tmp_path / "gru", extra={"history": [{"step": "distill"}]})
    loaded = load_model(str(tmp_path / "gru"))
    assert loaded.backend == "gru"
    assert loaded.model.args == model.args
    tokens = torch.randint(0, len(tiny_tokenizer), (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model(tokens))
    assert loaded.tokenizer.eos_token == tiny_tokenizer.eos_token


def test_save_load_tied(tmp_path, tiny_tokenizer):
    model = make_model(vocab_size=len(tiny_tokenizer))
    loaded = load_model(str(save_gru(model, tiny_tokenizer, tmp_path / "gru")))
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    tokens = torch.randint(0, len(tiny_tokenizer), (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model(tokens))


def test_saving_a_quantized_gru_is_refused(tmp_path, tiny_tokenizer):
    q = quantize(make_model(), "int8")
    with pytest.raises(UnsupportedModelError, match="quantize after loading"):
        save_gru(q, tiny_tokenizer, tmp_path / "q")


def test_bad_args_are_refused():
    with pytest.raises(UnsupportedModelError):
        GRUArgs(hidden=0)


def test_gru_runs_int8_in_the_python_api_but_the_server_refuses_it(tmp_path, tiny_tokenizer):
    from kuaida.bot import load_weights
    from kuaida.errors import UnsupportedModelError
    from kuaida.serve import ServerConfig, create_app

    save_gru(make_model(vocab_size=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "gru")
    loaded = load_weights(str(tmp_path / "gru"), "int8")
    assert loaded.backend == "gru" and type(loaded.model.lm_head).__name__ == "Int8Linear"
    with pytest.raises(UnsupportedModelError, match="GRU"):
        create_app(ServerConfig(model=str(tmp_path / "gru"), db=tmp_path / "s.db"), loaded)
