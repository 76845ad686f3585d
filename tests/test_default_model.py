"""Integration tier: the real default model (SmolLM2-135M-Instruct from its GGUF), offline."""
import subprocess
import sys

import pytest
import torch

import kuaida
from kuaida.engine.sampling import SamplingParams

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def fp32_bot():
    return kuaida.load("default", dtype="fp32")


def test_fp32_greedy_tokens_equal_transformers(fp32_bot):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(fp32_bot.loaded.path), dtype=torch.float32).eval()
    prompt = fp32_bot.render(MESSAGES)
    ref.generation_config.eos_token_id = None  # no end of turn on either side: compare all 48 tokens
    ref.generation_config.pad_token_id = 0
    with torch.inference_mode():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)
    expected = out[0, len(prompt):].tolist()
    fp32_bot.engine.eos_ids = set()
    ours = list(fp32_bot.engine.generate(prompt, SamplingParams(max_new_tokens=48, temperature=0)))
    assert ours == expected


@pytest.mark.parametrize("dtype,min_agreement", [("bf16", 0.95), ("int8", 0.95), ("int4", 0.9)])
def test_quantized_next_token_agreement(fp32_bot, dtype, min_agreement):
    """Teacher-forced: the quantized model's argmax matches fp32's at (almost) every position."""
    ids = torch.tensor([fp32_bot.render(MESSAGES) + fp32_bot.tokenizer.encode(
        "The capital of France is Paris, a city known for its art, food and the Eiffel Tower.")])
    bot = kuaida.load("default", dtype=dtype)
    with torch.inference_mode():
        ref = fp32_bot.model(ids).argmax(-1)
        got = bot.model(ids).argmax(-1)
    assert (ref == got).float().mean().item() >= min_agreement


def test_scripted_chat_answers_two_turns():
    script = "Hi! Who are you?\nName one color.\n"
    proc = subprocess.run([sys.executable, "-m", "kuaida.cli", "chat", "--temperature", "0",
                           "--max-new-tokens", "24"], input=script, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2
    assert proc.stderr.count("TTFT") == 2
    assert "(0 reused from cache)" in proc.stderr and "reused from cache" in proc.stderr.split("TTFT")[2]
