"""Re-time a finished `kuaida optimize` run's result with the current code, without retraining.

    python benchmarks/scripts/optimize_speeds.py OUT_DIR [RECIPE] [ROUNDS]

OUT_DIR is the optimize run's --out (it holds `model/`, the fp32 student). Times, as the optimize report
does (held-out prompts of the recipe's data, greedy, decode tok/s, median of interleaved rounds): the
teacher int8, the student int8 and int4 (quantized and fused by `optimize.quantized_copy`), and llama.cpp
on the teacher's GGUF when installed. Prints a Markdown table.
"""
import sys
from pathlib import Path

import torch
import yaml

from kuaida.bench.latency import gguf_for
from kuaida.bench.peers import llamacpp_missing
from kuaida.bench.quality import heldout_prompts
from kuaida.bench.report import code_version, cpu_model
from kuaida.model.loader import load_model
from kuaida.optimize import OptimizeConfig, QuantizeStep, from_dict, interleaved_speeds, quantized_copy


def main() -> None:
    out = Path(sys.argv[1])
    recipe = sys.argv[2] if len(sys.argv) > 2 else "benchmarks/recipes/default-with-baseline.yaml"
    cfg = from_dict(OptimizeConfig, yaml.safe_load(Path(recipe).read_text()), recipe)
    if len(sys.argv) > 3:
        cfg.measure.rounds = int(sys.argv[3])
    teacher = load_model(cfg.teacher)
    student = load_model(str(out / "model"))
    prompts = heldout_prompts(teacher.tokenizer, cfg.distill.data, cfg.measure.speed_prompts)
    targets = {"teacher int8": quantized_copy(teacher.model, QuantizeStep("int8")),
               "student int8": quantized_copy(student.model, QuantizeStep("int8")),
               "student int4": quantized_copy(student.model, QuantizeStep("int4"))}
    gguf = gguf_for(cfg.teacher)
    if gguf is not None and llamacpp_missing() is None:
        targets["llama.cpp (teacher GGUF)"] = gguf
    speeds = interleaved_speeds(targets, prompts, cfg.measure)
    base = speeds["teacher int8"]["tok_s"]
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, kuaida {code_version()}, "
          f"{len(prompts)} prompts x {cfg.measure.new_tokens} tokens, {cfg.measure.rounds} rounds\n")
    print("| variant | decode tok/s (median) | rounds | x teacher int8 |")
    print("| --- | --- | --- | --- |")
    for name, s in speeds.items():
        print(f"| {name} | {s['tok_s']:.1f} | {', '.join(f'{r:.1f}' for r in s['rounds'])} | "
              f"{s['tok_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
