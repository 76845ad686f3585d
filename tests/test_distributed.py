"""Fine-tuning on 2 processes (gloo, CPU) gives the same per-step losses as 1 process with the same
global batch: DDP, FSDP (fully_shard) and HSDP (a 1 x 2 mesh), and gradient accumulation. A DDP
checkpoint resumed under FSDP continues like one process resuming it."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kuaida.model import load_model
from kuaida.train.data import DataConfig
from kuaida.train.finetune import FinetuneConfig, finetune
from kuaida.train.loop import TrainConfig

CONVS = [[{"role": "user", "content": f"What is {a} plus {b}?"},
          {"role": "assistant", "content": f"The answer is {a + b}, thank you."}]
         for a in range(6) for b in range(5)]
STEPS = 4
RUNS = {  # name -> (parallel, micro_batch): each process holds 2 of the 4 sequences per step
    "ddp": ("ddp", 0),
    "ddp_accum": ("ddp", 1),
    "fsdp": ("fsdp", 0),
    "hsdp": ("hsdp", 0),
}


def config(data: Path, parallel: str, micro_batch: int, checkpoint_dir: str | None = None,
           steps: int = STEPS) -> FinetuneConfig:
    return FinetuneConfig(
        data=DataConfig(source=str(data), heldout_fraction=0.1, max_len=64), eval_samples=2,
        train=TrainConfig(steps=steps, lr=1e-2, warmup_steps=1, batch_size=4, micro_batch=micro_batch,
                          parallel=parallel, checkpoint_dir=checkpoint_dir))


def _worker(rank: int, world: int, port: int, model_dir: str, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    results = {}
    for name, (parallel, micro) in RUNS.items():
        loaded = load_model(model_dir)
        ckpt = str(Path(out).parent / f"ckpt-{name}")
        model, report = finetune(loaded.model, loaded.tokenizer, config(Path(data), parallel, micro, ckpt),
                                 progress=False)
        state = None if model is None else {k: v.tolist() for k, v in model.state_dict().items()
                                            if k == "layers.0.mlp.down_proj.weight"}
        results[name] = {"losses": report["losses"], "state": state,
                         "ppl_after": report["perplexity_after"], "has_model": model is not None}
        if name == "ddp" and rank == 0:  # kept for the parent's one-process resume
            shutil.copytree(ckpt, Path(out).parent / "ckpt-ddp-copy")
    # resume the DDP run's checkpoint under FSDP for one more step (rank 0 reads it, FSDP shards it)
    loaded = load_model(model_dir)
    _, report = finetune(loaded.model, loaded.tokenizer,
                         config(Path(data), "fsdp", 0, str(Path(out).parent / "ckpt-ddp"), steps=STEPS + 1),
                         progress=False)
    results["fsdp_resume"] = {"losses": report["losses"], "resumed_from": report["resumed_from"]}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "convs.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return path


def test_two_processes_match_one(tiny_llama_dir, data_file, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    ref_model, ref = finetune(loaded.model, loaded.tokenizer, config(data_file, "none", 0), progress=False)
    out = tmp_path / "results.json"
    mp.spawn(_worker, args=(2, free_port(), str(tiny_llama_dir), str(data_file), str(out)), nprocs=2, join=True)
    results = json.loads(out.read_text())
    ref_losses = torch.tensor(ref["losses"])
    ref_weight = ref_model.state_dict()["layers.0.mlp.down_proj.weight"]
    assert ref_losses[-1] < ref_losses[0]
    resumed = results.pop("fsdp_resume")
    loaded = load_model(str(tiny_llama_dir))
    _, single = finetune(loaded.model, loaded.tokenizer,
                         config(data_file, "none", 0, str(tmp_path / "ckpt-ddp-copy"), steps=STEPS + 1), progress=False)
    assert resumed["resumed_from"] == single["resumed_from"] == STEPS
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    for name, got in results.items():
        torch.testing.assert_close(torch.tensor(got["losses"]), ref_losses, rtol=1e-5, atol=0, msg=name)
        assert got["has_model"], f"{name}: rank 0 must get the trained model back"
        torch.testing.assert_close(torch.tensor(got["state"]["layers.0.mlp.down_proj.weight"]), ref_weight,
                                   rtol=1e-4, atol=1e-6, msg=name)
        assert got["ppl_after"]["perplexity"] == pytest.approx(ref["perplexity_after"]["perplexity"], rel=1e-4)
    assert json.loads((tmp_path / "ckpt-fsdp" / "latest").read_text())["step"] == STEPS
