"""kuaida optimize: the recipe format (the shipped default recipe, typos refused) and the default recipe's
pipeline end to end on a tiny model: prune -> distill -> quantize -> report, model directories that load."""
import dataclasses
import json

import pytest

import kuaida.optimize
from kuaida.errors import InvalidArgumentError
from kuaida.model import load_model
from kuaida.optimize import OptimizeConfig, from_dict, optimize


def test_default_recipe_parses_into_the_configs():
    cfg = OptimizeConfig.from_yaml("default")
    assert cfg.teacher == "default" and cfg.prune.n_layers == 14 and cfg.prune.vocab_from == "chitchat"
    assert cfg.teacher_correction_s == 180 and cfg.teacher_correction_lr == 0.0003
    assert cfg.distill.train.lr == 0.001  # the student's rate (benchmarks/results/kd-vs-ce-lr.md)
    assert cfg.distill.train.budget_s == 600 and cfg.quantize.dtype == "int8"
    assert cfg.distill.alpha == 0.5 and cfg.distill.temperature == 2.0


def test_recipe_typos_and_bad_values_are_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="unknown field.*n_layer"):
        from_dict(OptimizeConfig, {"prune": {"n_layer": 3}}, "recipe")
    with pytest.raises(InvalidArgumentError, match="quantize.dtype"):
        from_dict(OptimizeConfig, {"quantize": {"dtype": "int3"}}, "recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [1, 2")
    with pytest.raises(InvalidArgumentError, match="cannot read the recipe"):
        OptimizeConfig.from_yaml(bad)


def tiny_default_recipe(teacher: str, vocab_corpus) -> OptimizeConfig:
    """The shipped recipe with sizes and budgets scaled down to the tiny model (2 blocks), its output
    vocabulary from a small JSONL instead of all of chitchat (tokenizing that takes the tiny tokenizer 30 s)."""
    cfg = OptimizeConfig.from_yaml("default")
    d = cfg.distill
    return dataclasses.replace(
        cfg, teacher=teacher, teacher_correction_s=1.0,
        prune=dataclasses.replace(cfg.prune, n_layers=1, calib_samples=4, calib_seq_len=32,
                                  vocab_from=str(vocab_corpus)),
        distill=dataclasses.replace(d, eval_samples=2, data=dataclasses.replace(d.data, max_len=64,
                                                                               max_conversations=16),
                                    train=dataclasses.replace(d.train, budget_s=None, steps=3, batch_size=2)),
        measure=dataclasses.replace(cfg.measure, eval_samples=3, speed_prompts=1, new_tokens=4, rounds=2,
                                    llamacpp=False, baseline_finetune=True))


@pytest.fixture
def vocab_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"hello there number {i}"},
                           {"role": "assistant", "content": "hi! how are you doing today?"}]} for i in range(30)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_default_recipe_end_to_end_on_a_tiny_model(tiny_llama_dir, tmp_path, vocab_corpus, monkeypatch):
    recipe = tiny_default_recipe(str(tiny_llama_dir), vocab_corpus)
    recipe = dataclasses.replace(recipe, measure=dataclasses.replace(recipe.measure, baseline_lr=2e-4))
    rates = []  # the learning rate of each CE fine-tuning: teacher correction, then the baseline

    def finetune_baseline(model, tok, dcfg, progress):
        rates.append(dcfg.train.lr)
        return real_finetune_baseline(model, tok, dcfg, progress)

    real_finetune_baseline = kuaida.optimize.finetune_baseline
    monkeypatch.setattr(kuaida.optimize, "finetune_baseline", finetune_baseline)
    report = optimize(recipe, tmp_path / "run", progress=False)
    assert rates == [recipe.teacher_correction_lr, 2e-4] and recipe.distill.train.lr not in rates
    steps = {r["step"]: r for r in report["steps"]}
    assert list(steps) == ["teacher", "pruned", "teacher, corrected (fine-tuned on the data)",
                           "pruned + fine-tuned (CE only, baseline)", "distilled"]
    corrected = steps["teacher, corrected (fine-tuned on the data)"]
    assert corrected["n_layers"] == 2 and corrected["perplexity"]["perplexity"] != steps["teacher"]["perplexity"]["perplexity"]
    assert steps["teacher"]["n_layers"] == 2 and steps["pruned"]["n_layers"] == steps["distilled"]["n_layers"] == 1
    assert steps["pruned"]["output_size"] < steps["teacher"]["output_size"] and steps["distilled"]["distill"]["steps"] == 3
    for name in ("teacher", "pruned", "distilled"):
        assert steps[name]["decode_tok_s"] > 0 and len(steps[name]["decode_rounds"]) == 2
    assert set(report["targets"]) == {"speedup_vs_teacher", "perplexity_vs_teacher", "distill_beats_finetune",
                                      "distill_vs_finetune_top1_agreement_with_teacher"}
    # The teacher is also scored on the pruned students' tokens only, and the target uses that.
    same = steps["teacher"]["perplexity_same_tokens"]
    assert same["tokens"] == steps["distilled"]["perplexity"]["tokens"] < steps["teacher"]["perplexity"]["tokens"]
    ratio = steps["distilled"]["perplexity_quantized"]["perplexity"] / same["perplexity"]
    assert report["targets"]["perplexity_vs_teacher"]["value"] == round(ratio, 3)
    assert 0 <= steps["distilled"]["agreement"]["top1"] <= 1
    out = tmp_path / "run"
    assert json.loads((out / "report.json").read_text())["targets"] == report["targets"]
    md = (out / "report.md").read_text()
    assert "| distilled | 1 |" in md and "speedup_vs_teacher" in md
    assert (out / "report.png").stat().st_size > 10_000
    hf, q = load_model(str(out / "model")), load_model(str(out / "model-int8"))
    assert hf.args.n_layers == q.args.n_layers == 1 and q.quantization["dtype"] == "int8"
    with pytest.raises(InvalidArgumentError, match="not empty"):
        optimize(recipe, out, progress=False)


def test_learning_rates_of_the_correction_and_the_baseline():
    cfg = from_dict(OptimizeConfig, {"teacher_correction_lr": 0.0003, "measure": {"baseline_lr": 0.0003},
                                     "distill": {"train": {"lr": 0.001, "steps": 10}}}, "recipe")
    assert cfg.teacher_correction_lr == cfg.measure.baseline_lr == 0.0003 and cfg.distill.train.lr == 0.001
    assert OptimizeConfig().teacher_correction_lr is None  # None: the distillation's rate
    for bad in ("3e-4", 0, -1.0, True):  # YAML reads 3e-4 (no dot) as a string
        with pytest.raises(InvalidArgumentError, match="teacher_correction_lr must be a number"):
            from_dict(OptimizeConfig, {"teacher_correction_lr": bad}, "recipe")
        with pytest.raises(InvalidArgumentError, match="measure.baseline_lr must be a number"):
            from_dict(OptimizeConfig, {"measure": {"baseline_lr": bad}}, "recipe")
