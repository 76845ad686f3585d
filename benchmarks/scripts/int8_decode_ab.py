"""int8 decode: the few-rows kernel this CPU uses against the 15-bit integer kernel (qgemm.cpp), on the
default model in one process, paths taking turns. With AVX512-BF16 the few-rows kernel is attention.cpp's
int8_linear_bf16_rows (off: KUAIDA_NO_BF16_DECODE=1); without AVX-512, qgemm.cpp's int8_linear_rows16
(16-bit activations; off: KUAIDA_NO_ROWS16=1).

    python benchmarks/scripts/int8_decode_ab.py [ROUNDS] [TOKENS]     # default 5 rounds, 64 tokens

Per path: greedy decode tok/s over 8 held-out chitchat prompts (kuaida.optimize.time_decode: the Engine,
DecodePlan, prefill excluded; median of the rounds), and accuracy against the fp32 model: 512
teacher-forced tokens of held-out conversations fed one token per step through the KV cache (the decode
path), top-1 agreement and mean KL(fp32 || int8). Prints Markdown.
"""
import os
import statistics
import sys

import torch

from kuaida import kernels
from kuaida.bench.quality import heldout_prompts
from kuaida.bench.report import code_version, cpu_model
from kuaida.dialogue.template import render_prompt
from kuaida.model.loader import load_model
from kuaida.optimize import QuantizeStep, quantized_copy, time_decode
from kuaida.train.data import DataConfig, load_conversations, split_conversations

# path -> the environment switches it sets (None: unset).
PATHS = {"bf16 rows kernel" if kernels.fused_int8() else "rows16 kernel":
         {"KUAIDA_NO_BF16_DECODE": None, "KUAIDA_NO_ROWS16": None},
         "integer kernel": {"KUAIDA_NO_BF16_DECODE": "1", "KUAIDA_NO_ROWS16": "1"}}


def use(path: str) -> None:
    for name, value in PATHS[path].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def heldout_text(tokenizer, n_tokens: int) -> list[int]:
    _, held = split_conversations(load_conversations("chitchat"), 0.02, 0)
    ids: list[int] = []
    for conv in held:
        ids += render_prompt(tokenizer, conv)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    return ids


@torch.inference_mode()
def stepwise_logits(model, ids: list[int]) -> torch.Tensor:
    """Teacher-forced, one token per forward through the KV cache: [T, V]."""
    cache = model.new_cache(batch=1, max_seq=len(ids) + 1)
    out = [model(torch.tensor([[t]]), torch.tensor([[p]]), cache, rows=slice(0, 1), last_only=True)[0, -1]
           for p, t in enumerate(ids)]
    return torch.stack(out)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    loaded = load_model("default")
    fp32 = loaded.model
    int8 = quantized_copy(fp32, QuantizeStep("int8"))
    prompts = heldout_prompts(loaded.tokenizer, DataConfig(), 8)
    ids = heldout_text(loaded.tokenizer, 512)
    with torch.inference_mode():
        ref = fp32(torch.tensor([ids]), torch.arange(len(ids))[None])[0].float()  # [T, V]
    speeds: dict[str, list[float]] = {p: [] for p in PATHS}
    for r in range(rounds):
        for p in PATHS:
            use(p)
            speeds[p].append(time_decode(int8, prompts, new_tokens))
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, kuaida {code_version()}, default model int8, "
          f"{len(prompts)} prompts x {new_tokens} tokens, {rounds} rounds\n")
    print("| int8 decode path | decode tok/s (median) | rounds | teacher-forced top-1 vs fp32 "
          "| KL(fp32 ‖ int8) |")
    print("| --- | --- | --- | --- | --- |")
    for p in PATHS:
        use(p)
        logits = stepwise_logits(int8, ids).float()
        top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="batchmean").item()
        print(f"| {p} | {statistics.median(speeds[p]):.1f} | {', '.join(f'{s:.1f}' for s in speeds[p])} | "
              f"{top1 * 100:.1f} % | {kl:.5f} |")
    use(next(iter(PATHS)))


if __name__ == "__main__":
    main()
