"""kuaida.export: GGUF files our own GGUF loader (and llama.cpp) reads back with the same logits and
tokenizer; transformers directories of quantized models; `kuaida quantize` end to end on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kuaida.cli import app
from kuaida.compress.quantize import Int4Linear, dequantize, quantize
from kuaida.errors import InvalidArgumentError
from kuaida.export import export_gguf, export_hf, quantize_to_dir
from kuaida.model import load_model

TEXT = "Hello! What is the capital of France? 12345"


def tokens() -> torch.Tensor:
    return torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(4))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens())


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_gguf_f32_round_trip_through_our_gguf_loader(make_hf_dir, tmp_path, model_type, tied):
    src = load_model(str(make_hf_dir(model_type, tie_word_embeddings=tied)))
    path = export_gguf(src.model, src.tokenizer, tmp_path / "m.gguf")
    back = load_model(str(path), cache=tmp_path / "cache")
    # The loader un-permutes q/k (llama) through transformers' GGUF reader: a wrong permutation or name
    # map would change the logits.
    assert torch.equal(logits(back.model), logits(src.model))
    assert back.tokenizer(TEXT)["input_ids"] == src.tokenizer(TEXT)["input_ids"]
    assert back.tokenizer.chat_template == src.tokenizer.chat_template
    assert back.tokenizer.eos_token_id == src.tokenizer.eos_token_id


def test_int8_model_becomes_q8_0_without_loss(tiny_llama_dir, tmp_path):
    import gguf

    src = load_model(str(tiny_llama_dir))
    model = quantize(src.model, "int8")
    path = export_gguf(model, src.tokenizer, tmp_path / "m.gguf", dtype="q8_0")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    back = load_model(str(path), cache=tmp_path / "cache")
    # Same groups of 32, same fp16 scales, same int8 values: the layers' weights come back exactly.
    # (The fp32 embedding, tied to the output, becomes Q8_0 as in llama.cpp's own Q8_0 files.)
    expect = dequantize(model).layers.state_dict()
    assert all(torch.equal(v, expect[k]) for k, v in back.model.layers.state_dict().items())
    assert kinds["token_embd.weight"] == "Q8_0"


def test_f16_gguf_is_close(tiny_llama_dir, tmp_path):
    src = load_model(str(tiny_llama_dir))
    back = load_model(str(export_gguf(src.model, src.tokenizer, tmp_path / "m.gguf", dtype="f16")),
                      cache=tmp_path / "cache")
    # Matrices are the fp16-rounded fp32 ones exactly; norms stay fp32.
    for key, value in src.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value.half().float() if value.ndim == 2 else value)
    expect = logits(src.model)  # fp16 keeps 11 bits (2^-11 = 5e-4 per weight): measured 1.1e-3 here
    assert 0 < ((logits(back.model) - expect).norm() / expect.norm()) < 5e-3


def test_tokenizer_metadata_is_copied_from_the_source_gguf(tiny_llama_gguf, tmp_path):
    import gguf

    src = load_model(str(tiny_llama_gguf), cache=tmp_path / "cache")
    path = export_gguf(src.model, src.tokenizer, tmp_path / "m.gguf", source_gguf=tiny_llama_gguf)

    def tokenizer_fields(p):
        return {k: f.contents() for k, f in gguf.GGUFReader(p).fields.items() if k.startswith("tokenizer.")}

    assert tokenizer_fields(path) == tokenizer_fields(tiny_llama_gguf)
    back = load_model(str(path), cache=tmp_path / "cache")
    assert torch.equal(logits(back.model), logits(src.model))


def test_gguf_refuses_to_overwrite(tiny_llama_dir, tmp_path):
    src = load_model(str(tiny_llama_dir))
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="exists"):
        export_gguf(src.model, src.tokenizer, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "mine"


def test_export_hf_dequantizes_a_copy(tiny_qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = load_model(str(tiny_qwen2_dir))
    model = quantize(src.model, "int4")
    out = export_hf(model, src.tokenizer, tmp_path / "hf")
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)  # the caller's model is untouched
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (hf(tokens()).logits - logits(dequantize(model))).abs().max() < 1e-4


def test_quantize_to_dir(tiny_llama_dir, tmp_path):
    report = quantize_to_dir(str(tiny_llama_dir), tmp_path / "q", "int4", eval_samples=3, progress=False)
    assert report["bytes"]["out"] < report["bytes"]["fp32"]
    ev = report["eval"]
    assert ev["examples"] == 3 and ev["before"]["tokens"] == ev["after"]["tokens"] > 0
    assert ev["after"]["perplexity"] != ev["before"]["perplexity"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["kuaida"]["history"][-1]["step"] == "quantize"
    back = load_model(str(tmp_path / "q"))
    assert back.quantization["dtype"] == "int4"
    with pytest.raises(Exception, match="already quantized"):
        quantize_to_dir(str(tmp_path / "q"), tmp_path / "q2", "int8", eval_samples=0)


def test_cli_export_and_eval(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tiny_llama_dir), str(tmp_path / "m.gguf"), "--gguf"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.gguf").is_file()
    result = runner.invoke(app, ["export", str(tiny_llama_dir), str(tmp_path / "x"), "--hf", "--gguf"])
    assert result.exit_code == 2 and "one of" in result.output
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                                       {"role": "assistant", "content": f"Hello {i}!"}]})
                              for i in range(60)))
    result = runner.invoke(app, ["eval", str(tiny_llama_dir), "--samples", "2", "--data", str(data),
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"]["perplexity"] > 1


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llama_cpp_reads_the_tiny_gguf(make_hf_dir, tmp_path, model_type):
    """llama.cpp itself (when installed): same tokens from the tokenizer metadata, same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src = load_model(str(make_hf_dir(model_type, tie_word_embeddings=model_type == "llama")))
    path = export_gguf(src.model, src.tokenizer, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False) == src.tokenizer(TEXT)["input_ids"]
    ids = tokens()[0].tolist()
    llm.eval(ids)
    theirs, ours = torch.tensor(llm.scores[:len(ids)]), logits(src.model)[0]
    # llama.cpp keeps its KV cache in f16 (~1e-3 relative); a wrong q/k layout would be off by ~100 %.
    err = ((theirs - ours).norm() / ours.norm()).item()
    assert err < 5e-3  # measured 6e-4 (llama), 8e-4 (qwen2); without the permutation: 1.06


@pytest.mark.integration
def test_llama_cpp_loads_the_exported_default_model(tmp_path):
    """The default model exported as f32 GGUF: llama.cpp loads it and its greedy tokens match ours."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from kuaida.dialogue.template import render_prompt
    from kuaida.engine.generate import Engine
    from kuaida.engine.sampling import SamplingParams
    from kuaida.export import export, source_gguf

    path = export("default", tmp_path / "default.f32.gguf", "gguf", dtype="f32")
    ours = load_model("default")
    assert source_gguf(ours.path) is not None  # tokenizer metadata copied from the shipped GGUF
    prompt = render_prompt(ours.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    expect = list(Engine(ours.model, set()).generate(prompt, SamplingParams(max_new_tokens=12, temperature=0)))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    got = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(expect):
            break
    assert got[:8] == expect[:8]
