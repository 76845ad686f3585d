"""save_model: fp32 directories load back (ours and transformers') with the same logits; quantized
directories load back bit-identical without quantizing again; writes are atomic and never overwrite by
accident."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from kuaida.compress.quantize import dequantize, quantize
from kuaida.errors import InvalidArgumentError
from kuaida.model import load_model
from kuaida.model import save as save_mod
from kuaida.model.fused import fuse
from kuaida.model.save import save_model
from kuaida.model.transformer import Transformer

KEPT = list(range(0, 320, 3))  # a pruned output vocabulary: every third token id


def tokens(vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))


def pruned(model: Transformer, kept: list[int] = KEPT) -> Transformer:
    """The same model scoring only `kept` output ids."""
    small = Transformer(dataclasses.replace(model.args, output_ids=tuple(kept))).eval()
    sd = dict(model.state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"][kept]
    small.load_state_dict(sd)
    return small


@pytest.fixture(params=["tiny_llama_dir", "tiny_qwen2_dir"])
def loaded(request):
    return load_model(str(request.getfixturevalue(request.param)))


@torch.no_grad()
def test_fp32_round_trip_same_logits(loaded, tmp_path):
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
        loaded.args.model_type]]
    assert config["eos_token_id"] == loaded.tokenizer.eos_token_id and "kuaida" not in config
    names = load_file(out / "model.safetensors").keys()
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert not any("qkv_proj" in n or "gate_up" in n for n in names)
    assert ("lm_head.weight" in names) == (not loaded.args.tie_embeddings)
    back = load_model(str(out))
    assert torch.equal(back.model(tokens()), loaded.model(tokens()))
    assert back.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@torch.no_grad()
def test_transformers_loads_the_saved_directory(loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours = loaded.model(tokens())
    assert ours.abs().max() > 1  # random weights of std 0.2: logits far from zero, a meaningful check
    assert (hf(tokens()).logits - ours).abs().max() < 1e-4


@torch.no_grad()
def test_pruned_vocabulary_round_trip(tiny_qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = load_model(str(tiny_qwen2_dir))
    model = pruned(src.model)
    out = save_model(model, src.tokenizer, tmp_path / "out", extra={"history": [{"step": "prune"}]})
    config = json.loads((out / "config.json").read_text())
    assert config["kuaida"] == {"history": [{"step": "prune"}], "output_ids": KEPT}
    assert config["tie_word_embeddings"] is False
    head = load_file(out / "model.safetensors")["lm_head.weight"]
    dropped = sorted(set(range(320)) - set(KEPT))
    assert head.shape[0] == 320 and not head[dropped].any() and head[KEPT].abs().min() > 0
    expect = model(tokens())
    back = load_model(str(out))
    assert back.args.output_ids == tuple(KEPT) and torch.equal(back.model(tokens()), expect)
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert (hf(tokens()).logits[..., KEPT] - expect[..., KEPT]).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("prune", [False, True])
@torch.no_grad()
def test_quantized_round_trip_is_bit_identical(dtype, prune, tiny_llama_dir, tmp_path, monkeypatch):
    src = load_model(str(tiny_llama_dir))
    model = quantize(pruned(src.model) if prune else src.model, dtype)
    expect = model(tokens())
    out = save_model(model, src.tokenizer, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["kuaida"]["quantization"] == {"dtype": dtype, "group_size": 32,
                                                "head_dtype": "int8" if dtype == "int4" else dtype}
    calls = []

    def only_on_meta(m, *args, **kwargs):
        calls.append(all(t.is_meta for t in m.state_dict().values()))
        return quantize(m, *args, **kwargs)

    monkeypatch.setattr(save_mod, "quantize", only_on_meta)
    back = load_model(str(out))
    assert calls == [True]  # quantized once, an empty model: the saved buffers are adopted as they are
    assert back.quantization == config["kuaida"]["quantization"]
    saved, loaded = model.state_dict(), back.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) and saved[k].dtype == loaded[k].dtype for k in saved)
    assert torch.equal(back.model(tokens()), expect)
    assert type(back.model.lm_head) is type(model.lm_head)
    assert back.args.tie_embeddings == (not prune)  # a pruned head is never tied


def test_tied_fp32_head_with_quantized_layers_stays_tied(tiny_llama_dir, tmp_path):
    src = load_model(str(tiny_llama_dir))
    model = quantize(src.model, "int8", head_dtype="fp32")
    out = save_model(model, src.tokenizer, tmp_path / "out")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    back = load_model(str(out)).model
    assert back.lm_head.weight is back.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(tokens()), model(tokens()))


def test_refuses_to_overwrite_and_replaces_with_overwrite(tiny_llama_dir, tmp_path):
    src = load_model(str(tiny_llama_dir))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="not empty"):
        save_model(src.model, src.tokenizer, out)
    assert (out / "notes.txt").read_text() == "mine"
    save_model(src.model, src.tokenizer, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old copies left


def test_failed_write_leaves_nothing(tiny_llama_dir, tmp_path):
    src = load_model(str(tiny_llama_dir))

    class BrokenTokenizer:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(src.model, BrokenTokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@torch.no_grad()
def test_dequantize_gives_the_weights_the_format_holds(tiny_llama_dir):
    from kuaida.kernels import reference

    model = quantize(load_model(str(tiny_llama_dir)).model, "int4")
    qkv = model.layers[0].self_attn.qkv_proj
    expect = reference.dequantize_int4(qkv.qweight, qkv.scales, qkv.mins)
    dequantize(model)
    assert type(model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    assert torch.equal(model.layers[0].self_attn.qkv_proj.weight, expect)
    assert model.lm_head.weight is model.embed_tokens.weight  # tied again: the fp32 embedding


def test_load_weights_runs_a_quantized_directory_as_saved(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    from kuaida import bot

    src = load_model(str(tiny_llama_dir))
    model = fuse(quantize(src.model, "int4"))  # load_weights fuses the glue too (kuaida.model.fused)
    with torch.no_grad():
        expect = model(tokens())
    out = save_model(model, src.tokenizer, tmp_path / "out")
    real_quantize = bot.quantize
    monkeypatch.setattr(bot, "quantize", lambda *a, **k: pytest.fail("quantized a pre-quantized model"))
    same = bot.load_weights(str(out), "int4")
    with torch.no_grad():
        assert torch.equal(same.model(tokens()), expect)
    monkeypatch.setattr(bot, "quantize", real_quantize)
    with caplog.at_level("WARNING"):
        other = bot.load_weights(str(out), "int8")
    assert "saved quantized to int4" in caplog.text
    assert type(other.model.layers[0].mlp.down_proj).__name__ == "Int8Linear"
    requantized = fuse(real_quantize(dequantize(copy.deepcopy(model)), "int8"))  # int8 of the int4 weights
    with torch.no_grad():
        assert torch.equal(other.model(tokens()), requantized(tokens()))
