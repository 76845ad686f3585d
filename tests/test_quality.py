"""Quality metrics against values known by construction: a perfect predictor has perplexity 1, a uniform
one V; a model agrees 100 % with itself at KL 0; a pruned vocabulary's uncovered tokens are counted apart."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from kuaida.bench.quality import EvalConfig, compare, evaluate, greedy_agreement, perplexity
from kuaida.model import ModelArgs, Transformer
from kuaida.model.loader import LoadedModel
from kuaida.train.data import IGNORE, DataConfig, Example

V = 50


class Peeking(nn.Module):
    """Logits that put (almost) all probability on the true next token: it reads ahead in the input."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # [B, T]: the token after each position
        return 100.0 * nn.functional.one_hot(nxt, V).float()


class Uniform(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, V)


class Fixed(nn.Module):
    """The same random logits at every position."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*tokens.shape, -1)


def examples(n: int = 5, vocab: int = V, seed: int = 0) -> list[Example]:
    """Random sequences of different lengths; the second half of each is the 'assistant reply'."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (6 + 3 * i,), generator=g).tolist()
        half = len(ids) // 2
        out.append(Example(ids, [IGNORE] * half + ids[half:]))
    return out


def labelled(exs: list[Example]) -> int:
    return sum(e.n_labels for e in exs)


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def pruned(model: Transformer, kept: list[int]) -> Transformer:
    small = Transformer(dataclasses.replace(model.args, output_ids=tuple(kept))).eval()
    sd = dict(model.state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"][kept]
    small.load_state_dict(sd)
    return small


def test_perfect_model_has_perplexity_one():
    exs = examples()
    result = perplexity(Peeking(), exs, batch_size=2, progress=False)
    assert result.perplexity == pytest.approx(1.0, abs=1e-9)
    assert result.tokens == labelled(exs) and result.uncovered == 0 and result.coverage == 1.0


def test_uniform_model_has_perplexity_vocab_size():
    result = perplexity(Uniform(), examples(), batch_size=3, progress=False)
    assert result.perplexity == pytest.approx(V, rel=1e-6)
    assert result.nll == pytest.approx(math.log(V), rel=1e-6)


def test_batching_does_not_change_the_result():
    model, exs = tiny(), examples(7, vocab=256)
    one = perplexity(model, exs, batch_size=1, progress=False)
    many = perplexity(model, exs, batch_size=4, progress=False)
    assert one.tokens == many.tokens == labelled(exs)
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-5)


def test_model_agrees_with_itself():
    model = tiny()
    result = compare(model, model, examples(vocab=256), progress=False)
    assert result.top1 == 1.0 and result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.teacher_mass_pruned == 0.0 and result.tokens == labelled(examples(vocab=256))


def test_kl_against_a_uniform_student_is_log_v_minus_teacher_entropy():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum().item()
    result = compare(Uniform(), Fixed(logits), examples(), progress=False)
    assert result.kl == pytest.approx(math.log(V) - entropy, rel=1e-5)
    assert result.top1 == 0.0  # the uniform argmax is id 0; the teacher's is not
    assert logits.argmax() != 0


def test_pruned_vocabulary_counts_uncovered_tokens():
    model = tiny()
    kept = list(range(0, 256, 2))  # even ids only
    student = pruned(model, kept)
    exs = examples(6, vocab=256)
    targets = [t for e in exs for t in e.labels[1:] if t != IGNORE]
    result = perplexity(student, exs, progress=False)
    assert result.uncovered == sum(t % 2 for t in targets) > 0
    assert result.tokens == sum(1 - t % 2 for t in targets) > 0
    assert result.coverage == pytest.approx(result.tokens / len(targets))
    # Over covered tokens, the pruned model's likelihood is the full model's renormalized on even ids.
    nll = 0.0
    with torch.no_grad():
        for e in exs:
            logp = model(torch.tensor([e.input_ids]))[0, :, kept].log_softmax(-1)
            nll -= sum(logp[t - 1, e.input_ids[t] // 2].item() for t in range(1, len(e.labels))
                       if e.labels[t] != IGNORE and e.labels[t] % 2 == 0)
    assert result.nll == pytest.approx(nll / result.tokens, rel=1e-5)
    assert math.isfinite(result.perplexity)


def test_pruned_student_of_the_same_model():
    model = tiny()
    kept = list(range(0, 256, 2))
    exs = examples(4, vocab=256)
    result = compare(pruned(model, kept), model, exs, progress=False)
    # The student is the teacher renormalized on the kept ids: KL over them is 0, the dropped mass is
    # the teacher's probability on odd ids.
    assert result.kl == pytest.approx(0.0, abs=1e-5)
    mass = []
    with torch.no_grad():
        for e in exs:
            p = model(torch.tensor([e.input_ids]))[0].softmax(-1)
            mass += [p[t - 1, 1::2].sum().item() for t in range(1, len(e.labels)) if e.labels[t] != IGNORE]
    assert result.teacher_mass_pruned == pytest.approx(sum(mass) / len(mass), rel=1e-4)
    assert 0 < result.top1 <= 1


def test_greedy_agreement(tiny_tokenizer):
    model, other = tiny(vocab_size=320), tiny(seed=1, vocab_size=320)
    prompts = [[1, 5, 9, 30], [1, 77, 2, 100, 12], [1, 40]]
    same = greedy_agreement(model, model, tiny_tokenizer, prompts, n_tokens=8, progress=False)
    assert same.prefix == 1.0 and same.exact == 1.0 and same.prompts == 3
    different = greedy_agreement(model, other, tiny_tokenizer, prompts, n_tokens=8, progress=False)
    assert different.prefix < 1.0


def test_evaluate_report(tiny_llama_dir, tmp_path):
    from kuaida.model import load_model

    lines = [{"messages": [{"role": "user", "content": f"Hello number {i}, how are you?"},
                           {"role": "assistant", "content": f"I am fine, thank you. {i}"}]} for i in range(40)]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    loaded: LoadedModel = load_model(str(tiny_llama_dir))
    cfg = EvalConfig(samples=5, prompts=3, reply_tokens=4, data=DataConfig(source=str(data), heldout_fraction=0.25))
    report = evaluate(loaded, loaded, cfg, progress=False)
    assert report["examples"] == 5 and report["perplexity"]["tokens"] > 0
    assert report["perplexity_ratio"] == pytest.approx(1.0)
    assert report["agreement"]["top1"] == 1.0 and report["greedy"]["exact"] == 1.0
    json.dumps(report)  # JSON-ready


def test_only_ids_scores_the_same_tokens_as_a_pruned_student():
    model = tiny()
    kept = list(range(0, 256, 2))
    exs = examples(6, vocab=256)
    student = perplexity(pruned(model, kept), exs, progress=False)
    same = perplexity(model, exs, progress=False, only_ids=torch.tensor(kept))
    assert (same.tokens, same.uncovered) == (student.tokens, student.uncovered)
    # The full model on those tokens: its own probabilities (normalized over all 256 ids), position by position.
    nll = 0.0
    with torch.no_grad():
        for e in exs:
            logp = model(torch.tensor([e.input_ids]))[0].log_softmax(-1)
            nll -= sum(logp[t - 1, e.input_ids[t]].item() for t in range(1, len(e.labels))
                       if e.labels[t] != IGNORE and e.labels[t] % 2 == 0)
    assert same.nll == pytest.approx(nll / same.tokens, rel=1e-5)
    assert same.nll > student.nll  # renormalizing on fewer ids can only raise each probability
