"""Structured pruning on tiny random models: shapes shrink as asked, the result still runs (with and without
KV cache, through the engine), identity cases change nothing, and what is dropped is what carried least."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from kuaida.compress.calibrate import (
    WidthImportance,
    byte_token_ids,
    calibration_batches,
    layer_distances,
    layer_importance,
    vocab_coverage,
    vocab_from_corpus,
    width_importance,
)
from kuaida.compress.prune import (
    PruneConfig,
    count_params,
    prune,
    prune_2_4,
    prune_depth,
    prune_magnitude,
    prune_vocab,
    prune_width,
    select_layers,
    sparsity_of,
    window_layers,
)
from kuaida.compress.quantize import quantize
from kuaida.engine.generate import Engine
from kuaida.engine.sampling import SamplingParams
from kuaida.errors import InvalidArgumentError
from kuaida.model import ModelArgs, Transformer

X = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 64, 128, 5, 33, 200]])  # [1, 12]


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.preset("tiny", **overrides)).eval()


def calib(n: int = 4, t: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, t), generator=g) for _ in range(n)]


@torch.no_grad()
def assert_runs(model: Transformer) -> None:
    """Cached decoding gives the full forward's logits, and the engine decodes greedily to the end."""
    full = model(X)  # [1, 12, V]
    cache = model.new_cache(1, 32)
    parts = [model(X[:, :8], torch.arange(8)[None], cache)]
    for t in range(8, X.shape[1]):
        parts.append(model(X[:, t:t + 1], torch.tensor([[t]]), cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    out = list(Engine(model, eos_ids=set(), max_context=64).generate(X[0].tolist(), SamplingParams(
        max_new_tokens=6, temperature=0)))
    assert len(out) == 6 and out[0] == int(full[0, -1].argmax())


def block_weights(model: Transformer, i: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.layers[i].state_dict().items()}


# -- depth ---------------------------------------------------------------------------------------------
def test_depth_keeps_the_named_blocks_and_runs():
    model = tiny(n_layers=4)
    small = prune_depth(model, keep_layers=[0, 2])
    assert small.args.n_layers == 2 and len(small.layers) == 2 and model.args.n_layers == 4
    for new, old in [(0, 0), (1, 2)]:
        for k, v in block_weights(small, new).items():
            assert torch.equal(v, block_weights(model, old)[k])
    assert small.new_cache().k[0].shape[0] == 1 and len(small.new_cache().k) == 2
    assert_runs(small)


def test_depth_identity_and_input_left_intact():
    model = tiny(n_layers=3)
    before = copy.deepcopy(model.state_dict())
    same = prune_depth(model, keep_layers=range(3))
    assert torch.equal(same(X), model(X))
    with torch.no_grad():
        same.layers[0].mlp.down_proj.weight.zero_()  # no storage shared with the input
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert same.lm_head.weight is same.embed_tokens.weight  # still tied


def test_identity_block_is_least_important_and_dropped():
    model = tiny(n_layers=4)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: its output equals its input
        model.layers[2].self_attn.o_proj.weight.zero_()
        model.layers[2].mlp.down_proj.weight.zero_()
    imp = layer_importance(model, calib())
    assert len(imp) == 4 and imp[2] < 1e-3 < min(imp[0], imp[1], imp[3])
    assert select_layers(imp, 3) == [0, 1, 3]
    small = prune_depth(model, 3, importance=imp)
    torch.testing.assert_close(small(X), model(X), rtol=1e-4, atol=1e-4)


def test_first_block_is_never_selected_away():
    assert select_layers([0.0, 0.5, 0.2, 0.9], 2) == [0, 3]
    assert select_layers([0.3, 0.1, 0.2], 3) == [0, 1, 2]
    with pytest.raises(InvalidArgumentError):
        select_layers([0.3, 0.1], 0)


def test_window_drops_the_closest_contiguous_window():
    d = torch.ones(6, 6)  # 5 blocks; hidden states 1 and 3 are close: drop blocks 1, 2
    d[1, 3] = 0.1
    d[0, 2] = 0.05  # a window starting at block 0 is never taken
    assert window_layers(d, 3) == [0, 3, 4]
    assert window_layers(d, 5) == list(range(5))


def test_layer_distances_are_angles():
    d = layer_distances(tiny(n_layers=3), calib())
    assert d.shape == (4, 4)
    assert torch.allclose(d.diagonal(), torch.zeros(4), atol=1e-3) and torch.allclose(d, d.T, atol=1e-5)
    assert ((d >= 0) & (d <= 1)).all() and d[0, 3] > 0


# -- width ---------------------------------------------------------------------------------------------
def test_width_identity_gives_identical_logits():
    model = tiny()
    same = prune_width(model, calib(), intermediate_size=128, n_kv_heads=2)
    assert torch.equal(same(X), model(X))


def test_width_shapes_shrink_and_run():
    model = tiny()
    small = prune_width(model, calib(), intermediate_size=64, n_kv_heads=1)
    a = small.args
    assert (a.intermediate_size, a.n_kv_heads, a.n_heads, a.head_dim) == (64, 1, 2, 16)
    layer = small.layers[0]
    assert layer.mlp.gate_up_proj.weight.shape == (128, 64) and layer.mlp.down_proj.weight.shape == (64, 64)
    assert layer.self_attn.qkv_proj.weight.shape == ((2 + 2 * 1) * 16, 64)
    assert layer.self_attn.o_proj.weight.shape == (64, 32)
    assert count_params(small)["params"] < count_params(model)["params"]
    assert_runs(small)
    fewer_q = prune_width(model, calib(), n_heads=2)  # one query head per KV group, both groups kept
    assert (fewer_q.args.n_heads, fewer_q.args.n_kv_heads) == (2, 2)
    assert_runs(fewer_q)


def test_width_drops_dead_channels_and_heads():
    """Channels whose gate and up rows are zero, and a KV group whose values are zero, add exactly nothing:
    pruning must pick them, and the logits stay the same."""
    model = tiny()
    dead = torch.arange(0, 128, 4)[:32]  # 32 of 128 channels
    d = model.args.head_dim
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.gate_up_proj.weight[torch.cat([dead, dead + 128])] = 0
            v_group1 = slice((4 + 2) * d + d, (4 + 2) * d + 2 * d)  # v rows of KV head 1
            layer.self_attn.qkv_proj.weight[v_group1] = 0
    imp = width_importance(model, calib())
    assert (imp.channels[:, dead] == 0).all() and (imp.channels.sum(0) > 0).sum() == 96
    assert (imp.groups(2)[:, 1] == 0).all() and (imp.groups(2)[:, 0] > 0).all()
    small = prune_width(model, intermediate_size=96, n_kv_heads=1, importance=imp)
    live = torch.tensor([c for c in range(128) if c not in set(dead.tolist())])
    for new, old in zip(small.layers, model.layers):
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, live])
        assert torch.equal(new.mlp.gate_up_proj.weight, old.mlp.gate_up_proj.weight[torch.cat([live, live + 128])])
    torch.testing.assert_close(small(X), model(X), rtol=1e-4, atol=1e-4)


def test_width_keeps_gqa_groups_with_qkv_bias():
    """Qwen2-style biases: q rows and biases of the kept query heads, k/v of their own KV head."""
    model = tiny(qkv_bias=True, n_heads=6, n_kv_heads=3, dim=96)  # groups of 2 query heads, head_dim 16
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.qkv_proj.bias.normal_()
    heads = torch.tensor([[1.0, 2.0, 9.0, 0.5, 3.0, 3.5]] * 2)  # groups: 3.0, 9.5, 6.5 -> keep groups 1, 2
    imp = WidthImportance(channels=torch.ones(2, 128), heads=heads)
    small = prune_width(model, n_kv_heads=2, n_heads=2, importance=imp)  # best query head per group: 2, 5
    d = 16
    q_rows = torch.cat([torch.arange(2 * d, 3 * d), torch.arange(5 * d, 6 * d)])
    k_rows, v_rows = torch.arange(7 * d, 9 * d), torch.arange(10 * d, 12 * d)  # KV heads 1 and 2
    rows = torch.cat([q_rows, k_rows, v_rows])
    for new, old in zip(small.layers, model.layers):
        assert torch.equal(new.self_attn.qkv_proj.bias, old.self_attn.qkv_proj.bias[rows])
        assert torch.equal(new.self_attn.qkv_proj.weight, old.self_attn.qkv_proj.weight[rows])
        assert torch.equal(new.self_attn.o_proj.weight, old.self_attn.o_proj.weight[:, q_rows])
    assert (small.args.n_heads, small.args.n_kv_heads) == (2, 2)
    assert_runs(small)


def test_width_rejects_invalid_shapes():
    model = tiny()
    for kwargs in ({"intermediate_size": 100}, {"intermediate_size": 256}, {"n_kv_heads": 3},
                   {"n_kv_heads": 2, "n_heads": 3}, {"n_kv_heads": 1, "n_heads": 4}):
        with pytest.raises(InvalidArgumentError):
            prune_width(model, calib(), **kwargs)
    with pytest.raises(InvalidArgumentError, match="quantize"):
        prune_width(quantize(tiny(), "bf16"), calib(), intermediate_size=64)


# -- output vocabulary ---------------------------------------------------------------------------------
def test_vocab_pruned_logits_equal_at_kept_ids_and_inf_elsewhere():
    model = tiny()
    keep = [0, 3, 7, 42, 99, 200, 255]
    small = prune_vocab(model, keep)
    assert small.lm_head.weight.shape == (7, 64) and small.args.output_size == 7
    assert small.embed_tokens.weight.shape == (256, 64)
    full, pruned = model(X), small(X)
    torch.testing.assert_close(pruned[..., keep], full[..., keep])
    dropped = [i for i in range(256) if i not in keep]
    assert torch.isneginf(pruned[..., dropped]).all()
    torch.testing.assert_close(small(X, full_vocab=False), full[..., keep])
    assert_runs(small)
    out = Engine(small, eos_ids=set()).generate(X[0].tolist(), SamplingParams(max_new_tokens=5, temperature=1.0,
                                                                                seed=0))
    assert set(out) <= set(keep)
    assert count_params(small)["decode_params"] < count_params(model)["decode_params"]


def test_vocab_identity_and_subsets():
    model = tiny()
    assert torch.equal(prune_vocab(model, range(256))(X), model(X))
    once = prune_vocab(model, range(0, 256, 2))
    twice = prune_vocab(once, [4, 10, 100])
    torch.testing.assert_close(twice(X)[..., [4, 10, 100]], model(X)[..., [4, 10, 100]])
    with pytest.raises(InvalidArgumentError, match="subset"):
        prune_vocab(once, [3])


def test_vocab_from_corpus_keeps_required_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "Hello! How are you today?"
    keep = vocab_from_corpus(tok, [text, text, "zebra"], min_count=2)
    assert keep == sorted(keep)
    assert set(tok.encode(text, add_special_tokens=False)) <= set(keep)
    assert tok.eos_token_id in keep and set(tok.all_special_ids) <= set(keep)
    assert len(byte_token_ids(tok)) == 256 and byte_token_ids(tok) <= set(keep)
    seen_once = set(tok.encode("zebra", add_special_tokens=False)) - set(tok.encode(text, add_special_tokens=False))
    multi_byte = seen_once - byte_token_ids(tok)
    assert multi_byte and not multi_byte & set(keep)  # seen once < min_count=2
    no_bytes = vocab_from_corpus(tok, [[5, 300, -100]], byte_tokens=False)
    assert 300 in no_bytes and 5 in no_bytes and len(no_bytes) < 256


def test_vocab_coverage():
    assert vocab_coverage([1, 2, 3], [1, 2, 5, 6]) == 0.5
    assert vocab_coverage([1, 2], [[1, -100, 2], [2, 9]]) == 0.75
    with pytest.raises(InvalidArgumentError):
        vocab_coverage([1], [-100])


# -- unstructured --------------------------------------------------------------------------------------
def test_magnitude_zeroes_the_smallest_in_place():
    model = tiny()
    embed = model.embed_tokens.weight.clone()
    w = model.layers[0].mlp.down_proj.weight.clone()
    assert prune_magnitude(model, 0.5) is model
    assert sparsity_of(model) == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(model.embed_tokens.weight, embed)
    after = model.layers[0].mlp.down_proj.weight
    assert after.abs().min() == 0 and w.abs()[after == 0].max() <= w.abs()[after != 0].min()
    with pytest.raises(InvalidArgumentError):
        prune_magnitude(model, 1.0)


def test_2_4_keeps_the_two_largest_of_every_four():
    model = tiny()
    w = model.layers[1].self_attn.o_proj.weight.clone().view(64, -1, 4)
    prune_2_4(model)
    after = model.layers[1].self_attn.o_proj.weight.view(64, -1, 4)
    assert ((after == 0).sum(-1) == 2).all()
    kept = after != 0
    assert torch.equal(after[kept], w[kept])
    assert (w.abs().masked_fill(kept, -1).amax(-1) <= w.abs().masked_fill(~kept, 1e9).amin(-1)).all()
    assert sparsity_of(model) == pytest.approx(0.5)


def test_prune_config_validates():
    for bad in ({"n_layers": 0}, {"depth_method": "random"}, {"sparsity": 1.0}, {"sparsity": 0.5, "two_four": True},
                {"calib_samples": 0}, {"intermediate_size": -32}):
        with pytest.raises(InvalidArgumentError):
            PruneConfig(**bad)
    assert PruneConfig(n_kv_heads=1).width and not PruneConfig(n_layers=3).width


# -- calibration data, the pipeline, saving ------------------------------------------------------------
def test_calibration_batches_come_from_the_training_split(tiny_tokenizer):
    from kuaida.train.data import DataConfig, encode_conversation, load_conversations, split_conversations

    batches = calibration_batches(tiny_tokenizer, n_samples=5, seq_len=48, seed=3)
    assert len(batches) == 5 and all(b.dtype == torch.long and b.shape[0] == 1 and 1 < b.shape[1] <= 48
                                     for b in batches)
    assert [b.tolist() for b in batches] == [b.tolist() for b in calibration_batches(tiny_tokenizer, 5, 48, 3)]
    cfg = DataConfig()
    _, held = split_conversations(load_conversations("chitchat"), cfg.heldout_fraction, cfg.seed)
    held_ids = {tuple(encode_conversation(tiny_tokenizer, c, 48).input_ids) for c in held}
    assert not held_ids & {tuple(b[0].tolist()) for b in batches}


def write_jsonl(path, n: int = 6):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Hello number {i}, how are you?"},
                                      {"role": "assistant", "content": f"I am fine, thank you {i} times!"}]})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prune_pipeline_report_and_save_round_trip(tiny_tokenizer, tmp_path):
    from kuaida.model import load_model
    from kuaida.model.save import save_model

    model = tiny(n_layers=3, vocab_size=len(tiny_tokenizer))
    before = copy.deepcopy(model.state_dict())
    data = str(write_jsonl(tmp_path / "c.jsonl"))
    cfg = PruneConfig(n_layers=2, intermediate_size=64, n_kv_heads=1, vocab_from=data, sparsity=0.25,
                      calib_from=data, calib_samples=3, calib_seq_len=32)
    small, report = prune(model, tiny_tokenizer, cfg)
    a = small.args
    assert (a.n_layers, a.intermediate_size, a.n_kv_heads, a.n_heads) == (2, 64, 1, 2)
    assert [s["step"] for s in report["steps"]] == ["depth", "width", "vocab", "magnitude"]
    depth = report["steps"][0]
    assert len(depth["layer_importance"]) == 3 and len(depth["layers_dropped"]) == 1 and 0 in depth["layers_kept"]
    vocab = report["steps"][2]
    assert vocab["output_rows_before"] == 320 and vocab["output_rows_after"] == a.output_size < 320
    assert 0 < vocab["heldout_coverage"] <= 1
    assert report["before"]["params"] > report["after"]["params"] == count_params(small)["params"]
    assert report["after"]["sparsity"] == pytest.approx(0.25, abs=0.01) and report["seconds"] > 0
    for k, v in model.state_dict().items():  # the input model is left intact
        assert torch.equal(v, before[k]), k
    assert_runs(small)
    save_model(small, tiny_tokenizer, tmp_path / "out", extra={"history": [{"step": "prune"}]})
    loaded = load_model(str(tmp_path / "out"))
    assert loaded.args.output_ids == a.output_ids and loaded.args.n_layers == 2
    torch.testing.assert_close(loaded.model(X), small(X))


def test_cli_prune_writes_a_loadable_smaller_model(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from kuaida.cli import app
    from kuaida.model import load_model

    out = tmp_path / "pruned"
    data = str(write_jsonl(tmp_path / "c.jsonl"))
    result = CliRunner().invoke(app, ["prune", str(tiny_llama_dir), str(out), "--layers", "1",
                                      "--intermediate-size", "64", "--kv-heads", "1", "--calib-from", data,
                                      "--calib-samples", "2"])
    assert result.exit_code == 0, result.output
    assert "blocks" in result.output and "layers dropped [1]" in result.output
    loaded = load_model(str(out))
    a = loaded.args
    assert (a.n_layers, a.intermediate_size, a.n_kv_heads, a.n_heads) == (1, 64, 1, 2)
    config = json.loads((out / "config.json").read_text())
    assert config["kuaida"]["history"][0]["steps"][0]["layers_dropped"] == [1]
    bad = CliRunner().invoke(app, ["prune", str(tiny_llama_dir), str(tmp_path / "x"), "--intermediate-size", "100"])
    assert bad.exit_code == 2 and "multiple of 32" in bad.output


def test_pruned_model_loads_in_transformers(tiny_tokenizer, tmp_path):
    """Uniform shapes per layer make a plain Llama config (head_dim no longer dim / n_heads) that
    transformers runs to the same logits."""
    from transformers import AutoModelForCausalLM

    from kuaida.model.save import save_model

    model = tiny(n_layers=3, vocab_size=len(tiny_tokenizer))
    small = prune_width(prune_depth(model, keep_layers=[0, 2]), calib(), intermediate_size=96, n_kv_heads=1)
    save_model(small, tiny_tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf.config.num_hidden_layers, hf.config.num_attention_heads, hf.config.head_dim) == (2, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, small(X), rtol=1e-4, atol=1e-4)
