"""Distillation on tiny models: the KD loss goes down, students (fewer blocks, pruned vocabulary, GRU),
sequence-level replies and their cache, 2-process DDP = 1 process, the `kuaida distill` command."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from kuaida.cli import app
from kuaida.compress.prune import prune_vocab
from kuaida.errors import InvalidArgumentError
from kuaida.model import load_model
from kuaida.model.rnn import GRUArgs, GRUModel
from kuaida.train import sequence_kd
from kuaida.train.data import DataConfig, batches, encode_conversation
from kuaida.train.distill import DistillConfig, distill, distill_loss_fn
from kuaida.train.finetune import next_token_targets
from kuaida.train.loop import TrainConfig, train
from kuaida.train.losses import DistillLoss, ForwardKLLoss
from kuaida.train.sequence_kd import ReplyConfig, teacher_conversations
from kuaida.train.students import build_student, gru_student, layer_student, parse_gru_spec, spaced_layers

CONVS = [[{"role": "user", "content": f"What is {a} plus {b}?"},
          {"role": "assistant", "content": f"The answer is {a + b}, thank you."},
          {"role": "user", "content": "And times?"},
          {"role": "assistant", "content": f"That is {a * b}."}]
         for a in range(6) for b in range(5)]


@pytest.fixture(scope="module")
def teacher(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return [encode_conversation(tiny_tokenizer, c, 64) for c in CONVS]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distill") / "convs.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return path


def fixed(batch):
    return iter(lambda: batch, None)


def steps_cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "lr": 1e-2, "warmup_steps": 1, "batch_size": 4, **kw})


def test_distillation_lowers_the_kd_loss(teacher, examples):
    student = layer_student(teacher.model, 1)
    batch = next(batches(examples, 4))
    result = train(student, distill_loss_fn(teacher.model, DistillLoss(0.0, 2.0)), fixed(batch), steps_cfg(10),
                   progress=False)
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert result.metrics["kd"] == pytest.approx(result.losses[-1], rel=1e-5)  # alpha 0: loss = kd


def test_loss_fn_mixes_ce_and_kd_on_shifted_targets(teacher, examples):
    student = layer_student(teacher.model, 1)
    batch = next(batches(examples, 2))
    loss, n, metrics = distill_loss_fn(teacher.model, DistillLoss(0.25, 2.0))(student, batch)
    targets = next_token_targets(batch.labels)
    with torch.no_grad():
        kd = ForwardKLLoss(2.0)(student(batch.input_ids), teacher.model(batch.input_ids), targets)
    assert n == int((batch.labels != -100).sum())  # every reply token is some position's target
    assert metrics["kd"] == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.25 * metrics["ce"] + 0.75 * metrics["kd"], rel=1e-5)


def test_plain_fine_tuning_does_not_run_the_teacher(teacher, examples):
    class Refuses(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher ran")

    batch = next(batches(examples, 2))
    loss, _, metrics = distill_loss_fn(Refuses(), DistillLoss(1.0))(layer_student(teacher.model, 1), batch)
    assert "kd" not in metrics and loss.item() == pytest.approx(metrics["ce"])


def test_ce_first_runs_the_teacher_only_after_its_share_of_the_steps(teacher, examples):
    calls = []

    class Counting(torch.nn.Module):  # the teacher, counting its forward passes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    batch = next(batches(examples, 4))
    loss_fn = distill_loss_fn(Counting(teacher.model), DistillLoss(0.5, 2.0), ce_first=0.5)
    result = train(layer_student(teacher.model, 1), loss_fn, fixed(batch), steps_cfg(6), progress=False)
    assert len(calls) == 3  # steps 0-2 are CE alone (progress 0, 1/6, 2/6 < 0.5), steps 3-5 distill
    assert "kd" in result.metrics  # the last step's metrics
    with pytest.raises(InvalidArgumentError, match="ce_first"):
        DistillConfig(ce_first=1.0)


def test_pruned_vocabulary_student_learns_on_its_kept_ids(teacher, examples):
    batch = next(batches(examples, 2))
    present = sorted(set(batch.input_ids.flatten().tolist()))
    keep = present[::2]  # half the tokens of the batch: some targets are pruned
    student = prune_vocab(layer_student(teacher.model, 1), keep)
    loss, n, metrics = distill_loss_fn(teacher.model, DistillLoss(0.0, 2.0))(student, batch)
    targets = next_token_targets(batch.labels)
    counted = targets[targets != -100]
    dropped = int((~torch.isin(counted, torch.tensor(keep))).sum())
    assert metrics["pruned_targets"] == dropped > 0 and n == counted.numel() - dropped
    with torch.no_grad():
        kept_ids = torch.tensor(keep)
        mapped_targets = torch.where(torch.isin(targets, kept_ids), targets, -100)
        want = ForwardKLLoss(2.0)(student(batch.input_ids, full_vocab=False),
                                  teacher.model(batch.input_ids)[..., kept_ids], mapped_targets)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_distill_reports_perplexity_and_agreement(teacher, data_file):
    student = layer_student(teacher.model, 1)
    # alpha 0: the random teacher disagrees with the data, so only pure KD must bring the student closer
    cfg = DistillConfig(alpha=0.0, temperature=1.0, train=steps_cfg(6), eval_samples=3,
                        data=DataConfig(source=str(data_file), heldout_fraction=0.1, max_len=64))
    trained, report = distill(teacher.model, student, teacher.tokenizer, cfg, progress=False)
    assert trained is student and report["steps"] == 6 and len(report["losses"]) == 6
    before, after = report["before"], report["after"]
    assert after["agreement"]["kl"] < 0.5 * before["agreement"]["kl"]
    assert 0.0 <= after["agreement"]["top1"] <= 1.0
    assert report["teacher_perplexity"]["perplexity"] > 1.0 and after["perplexity"]["tokens"] > 0


def test_distill_without_evaluation(teacher, data_file):
    cfg = DistillConfig(evaluate=False, train=steps_cfg(1),
                        data=DataConfig(source=str(data_file), heldout_fraction=0.1, max_len=64))
    _, report = distill(teacher.model, layer_student(teacher.model, 1), teacher.tokenizer, cfg, progress=False)
    assert report["before"] is None and report["after"] is None and report["heldout_conversations"] == 0
    assert report["steps"] == 1


def test_gru_student_starts_from_the_teacher_embedding_and_learns(teacher, examples):
    student = gru_student(teacher.model, GRUArgs(vocab_size=teacher.args.vocab_size, dim=32, hidden=32,
                                                 max_seq_len=256))
    tokens = torch.tensor([[5, 17, 42]])
    with torch.no_grad():  # out_proj = 0: the untrained GRU is embedding -> norm -> tied output layer
        emb = student.embed_tokens(tokens)
        assert torch.allclose(student(tokens), student.lm_head(student.norm(emb)), atol=1e-6)
        # The embedding is the teacher's projected on its top-32 principal directions: a rank-32 map
        _, _, vh = torch.linalg.svd(teacher.model.embed_tokens.weight, full_matrices=False)
        want = teacher.model.embed_tokens.weight @ vh[:32].T
        assert torch.allclose(student.embed_tokens.weight, want, atol=1e-4)
    batch = next(batches(examples, 4))
    result = train(student, distill_loss_fn(teacher.model, DistillLoss(0.0, 2.0)), fixed(batch), steps_cfg(10),
                   progress=False)
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_student_shorthands(teacher):
    assert spaced_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert spaced_layers(2, 1) == [1] and spaced_layers(4, 4) == [0, 1, 2, 3]
    args = parse_gru_spec("dim=32,layers=3", 320, 256)
    assert (args.dim, args.hidden, args.n_layers, args.tie_embeddings) == (32, 32, 3, True)
    assert parse_gru_spec("dim=32,hidden=48,tie=0", 320, 256).tie_embeddings is False
    for bad in ("dim=x", "width=3"):
        with pytest.raises(InvalidArgumentError, match="GRU spec"):
            parse_gru_spec(bad, 320, 256)
    model, tokenizer, _ = build_student("gru:dim=32,layers=1", teacher.model)
    assert isinstance(model, GRUModel) and tokenizer is None
    assert build_student("layers:1", teacher.model)[0].args.n_layers == 1
    with pytest.raises(InvalidArgumentError, match="neither a directory"):
        build_student("/no/such/student", teacher.model)


def test_sequence_level_replies_are_cached(teacher, monkeypatch, tmp_path):
    cfg = ReplyConfig(max_new_tokens=6, cache=str(tmp_path / "replies.jsonl"), conversations=3)
    first = teacher_conversations(teacher.model, teacher.tokenizer, CONVS, cfg, max_len=64, progress=False)
    lines = (tmp_path / "replies.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for conv, original in zip(first, CONVS):
        assert conv[0] == original[0]  # user turns kept, assistant turns re-generated
        assert all(m["role"] == r for m, r in zip(conv, ("user", "assistant", "user", "assistant")))
        assert conv[1]["content"] != original[1]["content"]

    def refuse(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(sequence_kd, "_regenerate", refuse)
    again = teacher_conversations(teacher.model, teacher.tokenizer, CONVS, cfg, max_len=64, progress=False)
    assert again == first


# -- 2 processes (gloo) = 1 process ------------------------------------------------------------------
def dist_config(data: str) -> DistillConfig:
    return DistillConfig(alpha=0.3, kind="reverse",
                         data=DataConfig(source=data, heldout_fraction=0.1, max_len=64), eval_samples=2,
                         train=TrainConfig(steps=3, lr=1e-2, warmup_steps=1, batch_size=4, parallel="ddp"))


def _worker(rank: int, world: int, port: int, model_dir: str, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    teacher = load_model(model_dir)
    student = layer_student(teacher.model, 1)
    _, report = distill(teacher.model, student, teacher.tokenizer, dist_config(data), progress=False)
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": report["losses"], "kd": report["last_metrics"]["kd"]}))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny_llama_dir, data_file, tmp_path):
    teacher = load_model(str(tiny_llama_dir))
    cfg = dist_config(str(data_file))
    cfg.train.parallel = "none"
    _, ref = distill(teacher.model, layer_student(teacher.model, 1), teacher.tokenizer, cfg, progress=False)
    out = tmp_path / "results.json"
    mp.spawn(_worker, args=(2, free_port(), str(tiny_llama_dir), str(data_file), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    assert ref["losses"][-1] < ref["losses"][0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)


# -- the command ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("student, backend", [("layers:1", "native"), ("gru:dim=32,layers=1", "gru")])
def test_cli_distill_saves_a_loadable_student(tiny_llama_dir, data_file, tmp_path, student, backend):
    out = tmp_path / "student"
    result = CliRunner().invoke(app, ["distill", str(tiny_llama_dir), student, str(out), "--steps", "2",
                                      "--data", str(data_file), "--batch-size", "2", "--max-len", "64"])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output
    loaded = load_model(str(out))
    assert loaded.backend == backend
    history = json.loads((out / "config.json").read_text())["kuaida"]["history"][-1]
    assert history["step"] == "distill" and history["student"] == student
    assert not (tmp_path / "student.checkpoints").exists()


def test_cli_distill_refuses_bad_options(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(app, ["distill", str(tiny_llama_dir), "layers:1", str(tmp_path / "o"),
                                      "--steps", "1", "--kind", "sideways"])
    assert result.exit_code == 2 and "sideways" in result.output
    result = CliRunner().invoke(app, ["distill", str(tiny_llama_dir), "layers:1", str(tmp_path / "o"),
                                      "--steps", "1", "--ce-first", "1.5"])
    assert result.exit_code == 2 and "ce_first" in result.output


def test_teacher_projection_matches_the_full_forward_where_the_loss_reads(teacher, examples):
    """Counted rows and kept columns only: the same logits as the teacher's whole forward, sliced; the
    rows the loss skips are zeros; a teacher without hidden_states runs whole."""
    from kuaida.train.distill import TeacherProjection

    model = teacher.model.eval()
    batch = next(iter(batches(examples, 4, seed=0)))
    counted = next_token_targets(batch.labels) != -100
    assert counted.any() and not counted.all()
    full = model(batch.input_ids)  # [B, T, V]
    kept = torch.arange(0, full.shape[-1], 3)
    project = TeacherProjection(model)
    assert project.direct
    for cols, want in ((None, full), (kept, full[..., kept])):
        got = project(batch.input_ids, counted, cols)
        assert got.shape == want.shape
        torch.testing.assert_close(got[counted], want[counted], rtol=1e-5, atol=1e-5)
        assert not got[~counted].any()

    class Whole(torch.nn.Module):  # e.g. a model run through transformers
        def forward(self, ids):
            return model(ids)

    whole = TeacherProjection(Whole())
    assert not whole.direct
    torch.testing.assert_close(whole(batch.input_ids, counted, kept), full[..., kept])
