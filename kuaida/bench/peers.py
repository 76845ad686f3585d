"""The engines kuaida is measured against, behind the same small interface as kuaida's own runner:

    runner.generate(prompt_ids, n) -> Run            # greedy, exactly n new tokens, cold prompt
    runner.next_tokens(prompt_ids, reference) -> ids  # teacher-forced argmax after each reference token

- transformers `generate` on the fp32 Hugging Face weights: the baseline a user has today;
- llama.cpp (llama-cpp-python) on the GGUF file: the fastest CPU peer.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LLAMACPP_INSTALL = "pip install 'kuaida[llamacpp]' (compiles ~15 min)"


@dataclass
class Run:
    """One prompt's greedy generation and its timings."""
    tokens: list[int]
    ttft_s: float  # call -> first new token
    decode_tok_s: float  # tokens after the first / time from the first to the last


def decode_rate(times: list[float]) -> float:
    """Token arrival times -> decode tokens/s, the first token (prefill) excluded."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


class TokenClock:
    """A transformers streamer that only notes when each new token arrives. transformers calls
    put(prompt ids) once, then put(token) per new token, then end()."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class HFRunner:
    """transformers `AutoModelForCausalLM.generate`, fp32, its default dynamic cache."""

    def __init__(self, path: str | Path) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.backend = f"transformers {transformers.__version__} fp32"

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], n: int) -> Run:
        clock, ids = TokenClock(), torch.tensor([prompt_ids])
        t0 = time.perf_counter()
        # eos_token_id=None: decode exactly n tokens, like the other variants (no early end of turn).
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  eos_token_id=None, streamer=clock)
        return Run(out[0, len(prompt_ids):].tolist(), clock.times[0] - t0, decode_rate(clock.times))

    @torch.inference_mode()
    def next_tokens(self, prompt_ids: list[int], reference: list[int]) -> list[int]:
        logits = self.model(torch.tensor([prompt_ids + reference[:-1]])).logits  # [1, T, V]
        return logits[0, len(prompt_ids) - 1:].argmax(-1).tolist()


def llamacpp_missing() -> str | None:
    """Why the llama.cpp peer cannot run here (None when it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return LLAMACPP_INSTALL
    return None


class LlamaCppRunner:
    """llama-cpp-python on a GGUF file. Timing uses a context that computes only the last logits (as in
    normal use); teacher forcing needs every position's logits, so it opens a second context with
    logits_all=True once timing is done."""

    def __init__(self, gguf: str | Path, context: int, threads: int) -> None:
        import llama_cpp

        self.gguf, self.context, self.threads = str(gguf), context, threads
        self.llm, self.scorer = self._open(logits_all=False), None
        self.backend = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) {Path(self.gguf).name}"

    def _open(self, logits_all: bool):
        from llama_cpp import Llama

        return Llama(model_path=self.gguf, n_ctx=self.context, n_threads=self.threads,
                     n_threads_batch=self.threads, logits_all=logits_all, verbose=False)

    def generate(self, prompt_ids: list[int], n: int) -> Run:
        self.llm.reset()  # cold: forget the previous prompt so no prefix is reused
        times, tokens = [], []
        t0 = time.perf_counter()
        # llm.generate never stops by itself (end of turn is checked by its callers): exactly n tokens.
        for token in self.llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == n:
                break
        return Run(tokens, times[0] - t0, decode_rate(times))

    def next_tokens(self, prompt_ids: list[int], reference: list[int]) -> list[int]:
        if self.scorer is None:
            self.llm = None  # free the timing context before opening the scoring one
            self.scorer = self._open(logits_all=True)
        self.scorer.reset()
        self.scorer.eval(prompt_ids + reference[:-1])
        start = len(prompt_ids) - 1  # the logits after the last prompt token predict reference[0]
        return self.scorer.scores[start:start + len(reference)].argmax(-1).tolist()
