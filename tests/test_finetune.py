"""Fine-tuning on tiny models: the loss goes down, LoRA (identity at init, exact merge, base frozen),
time budgets, checkpoints (atomic, on Ctrl-C, resume gives the uninterrupted run's losses), pruned
output vocabularies, the `kuaida finetune` command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kuaida.cli import app
from kuaida.errors import InvalidArgumentError
from kuaida.model import ModelArgs, Transformer, load_model
from kuaida.train.data import IGNORE, DataConfig, batches, encode_conversation
from kuaida.train.finetune import FinetuneConfig, finetune, lm_loss, next_token_targets
from kuaida.train.loop import TrainConfig, parse_duration, train
from kuaida.train.lora import LoRALinear, apply_lora, lora_parameters, merge_lora

CONVS = [[{"role": "user", "content": f"What is {a} plus {b}?"},
          {"role": "assistant", "content": f"The answer is {a + b}, thank you."}]
         for a in range(6) for b in range(5)]


def tiny_model(vocab: int = 320, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=vocab, **overrides))
    with torch.no_grad():  # small weights: moderate logits, like a trained model's
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return [encode_conversation(tiny_tokenizer, c, 64) for c in CONVS]


@pytest.fixture()
def jsonl(tmp_path) -> Path:
    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return path


def steps_cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "lr": 1e-2, "warmup_steps": 1, "batch_size": 4, **kw})


def test_loss_goes_down_on_a_repeated_batch(examples):
    batch = next(batches(examples, 4))
    result = train(tiny_model(), lm_loss, iter(lambda: batch, None), steps_cfg(8), progress=False)
    assert len(result.losses) == result.steps == 8
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert result.tokens == 8 * batch.num_tokens and result.tokens_per_s > 0


def test_lm_loss_counts_only_assistant_tokens(examples):
    batch = next(batches(examples, 2))
    model = tiny_model()
    loss, n, _ = lm_loss(model, batch)
    targets = next_token_targets(batch.labels)
    assert n == int((batch.labels != IGNORE).sum()) == int((targets != IGNORE).sum())
    ref = torch.nn.functional.cross_entropy(model(batch.input_ids).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, ref)


def test_lm_loss_on_a_pruned_output_vocabulary(examples):
    batch = next(batches(examples, 2))
    targets = next_token_targets(batch.labels)
    used = sorted(set(targets[targets != IGNORE].tolist()))
    kept = tuple(sorted(set(range(0, 320, 3)) | set(used[1:])))  # drop one target token, used[0]
    model = tiny_model(output_ids=kept)
    loss, n, metrics = lm_loss(model, batch)
    dropped = int((targets == used[0]).sum())
    assert metrics["pruned_targets"] == dropped and n == int((targets != IGNORE).sum()) - dropped
    logits = model(batch.input_ids)  # full vocabulary, -inf at pruned ids
    keep = (targets != IGNORE) & (targets != used[0])
    ref = -logits.log_softmax(-1)[keep].gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, ref)


def test_lora_identity_merge_and_frozen_base(examples):
    batch = next(batches(examples, 4))
    model = tiny_model()
    before = model(batch.input_ids)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * 2
    assert torch.equal(model(batch.input_ids), before), "B = 0: the LoRA model is the base model"
    params = lora_parameters(model)
    assert all(p.requires_grad for p in params) and sum(p.requires_grad for p in model.parameters()) == len(params)
    train(model, lm_loss, iter(lambda: batch, None), steps_cfg(3), params=params, progress=False)
    unmerged = model(batch.input_ids)
    assert not torch.allclose(unmerged, before, atol=1e-4), "LoRA training changed nothing"
    for name, value in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base.", ".")]), f"{name} is frozen but changed"
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base)
    torch.testing.assert_close(model(batch.input_ids), unmerged, rtol=1e-5, atol=1e-5)


def test_time_budget_stops_the_run(examples):
    result = train(tiny_model(), lm_loss, batches(examples, 4), TrainConfig(budget_s=0.5, batch_size=4),
                   progress=False)
    # stops before a step of the average length would overrun the budget (at least one step is done)
    assert result.stopped_by == "budget" and result.steps >= 1
    assert result.seconds > 0.5 - result.seconds / result.steps


def test_resume_after_ctrl_c_gives_the_uninterrupted_losses(examples, tmp_path):
    full = train(tiny_model(), lm_loss, batches(examples, 4), steps_cfg(6), progress=False)
    calls = {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), interrupted, batches(examples, 4), steps_cfg(6, checkpoint_dir=str(ckpt)), progress=False)
    assert json.loads((ckpt / "latest").read_text())["step"] == 3
    resumed = train(tiny_model(seed=1), lm_loss, batches(examples, 4), steps_cfg(6, checkpoint_dir=str(ckpt)),
                    progress=False)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    assert resumed.losses[:3] == full.losses[:3]
    torch.testing.assert_close(torch.tensor(resumed.losses[3:]), torch.tensor(full.losses[3:]), rtol=1e-6, atol=0)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000006"]


def test_periodic_checkpoints_replace_each_other(examples, tmp_path):
    ckpt = tmp_path / "ckpt"
    train(tiny_model(), lm_loss, batches(examples, 4),
          steps_cfg(3, checkpoint_dir=str(ckpt), checkpoint_every_s=1e-6), progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000003"]
    fresh = train(tiny_model(), lm_loss, batches(examples, 4), steps_cfg(3, checkpoint_dir=str(ckpt), resume=False),
                  progress=False)
    assert fresh.resumed_from == 0


def test_finetune_reports_perplexity_before_and_after(tiny_tokenizer, jsonl):
    cfg = FinetuneConfig(data=DataConfig(source=str(jsonl), heldout_fraction=0.1, max_len=64),
                         train=steps_cfg(15), eval_samples=None)
    _, report = finetune(tiny_model(), tiny_tokenizer, cfg, progress=False)
    assert report["steps"] == 15 and report["heldout_conversations"] == 3 and report["train_conversations"] == 27
    assert report["perplexity_after"]["perplexity"] < 0.5 * report["perplexity_before"]["perplexity"]
    lora_model, lora_report = finetune(tiny_model(), tiny_tokenizer, FinetuneConfig(method="lora", data=cfg.data,
                                       train=steps_cfg(5, lr=3e-2)), progress=False)
    assert lora_report["trainable_parameters"] < report["trainable_parameters"] / 5
    assert not any(isinstance(m, LoRALinear) for m in lora_model.modules())
    assert lora_report["perplexity_after"]["perplexity"] < lora_report["perplexity_before"]["perplexity"]


def test_cli_finetune_saves_a_loadable_model(tiny_llama_dir, jsonl, tmp_path):
    out = tmp_path / "tuned"
    result = CliRunner().invoke(app, ["finetune", str(tiny_llama_dir), str(out), "--data", str(jsonl),
                                      "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--max-len", "64"])
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output and "before" in result.output
    assert not (tmp_path / "tuned.checkpoints").exists()
    tuned, base = load_model(str(out)), load_model(str(tiny_llama_dir))
    config = json.loads((out / "config.json").read_text())
    assert config["kuaida"]["history"][0]["step"] == "finetune"
    tokens = torch.tensor([[1, 5, 9, 30]])
    assert not torch.allclose(tuned.model(tokens), base.model(tokens))
    again = CliRunner().invoke(app, ["finetune", str(tiny_llama_dir), str(out), "--data", str(jsonl), "--steps", "1"])
    # rich wraps the message at the terminal width, wherever the temporary path's length puts the break
    assert again.exit_code == 2 and "not empty" in " ".join(again.output.split())


def test_durations_and_config_errors():
    assert [parse_duration(t) for t in ("90s", "10m", "1h30m", "600")] == [90, 600, 5400, 600]
    with pytest.raises(InvalidArgumentError):
        parse_duration("ten minutes")
    with pytest.raises(InvalidArgumentError, match="steps or a time budget"):
        TrainConfig()
    with pytest.raises(InvalidArgumentError, match="parallel"):
        TrainConfig(steps=1, parallel="zero3")
    with pytest.raises(InvalidArgumentError, match="method"):
        FinetuneConfig(method="qlora")


def test_amp_setting_is_validated_and_bf16_autocast_runs():
    import torch

    from kuaida.errors import InvalidArgumentError
    from kuaida.train.loop import TrainConfig

    with pytest.raises(InvalidArgumentError, match="amp"):
        TrainConfig(steps=1, amp="fp8")
    with TrainConfig(steps=1, amp="bf16").autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with TrainConfig(steps=1, amp="none").autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
