"""`kuaida.load(...)` -> Bot: the simplest way to chat with a model from Python.

    bot = kuaida.load("default", dtype="int8")
    reply = bot.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=64, temperature=0)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

from kuaida import kernels
from kuaida.compress.quantize import DTYPES, dequantize, quantize
from kuaida.dialogue.template import end_of_turn_ids, passage_anchor_ids, render_prompt
from kuaida.engine.generate import Engine
from kuaida.engine.lookup import LookupConfig
from kuaida.engine.sampling import SamplingParams
from kuaida.engine.sequence import GenerationStats
from kuaida.errors import InvalidArgumentError
from kuaida.model.fused import fuse
from kuaida.model.loader import LoadedModel, load_model
from kuaida.model.memory import buffers_on_huge_pages

log = logging.getLogger(__name__)


class Bot:
    def __init__(self, loaded: LoadedModel, dtype: str = "fp32", max_context: int | None = None) -> None:
        self.loaded, self.dtype = loaded, dtype
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.engine = Engine(self.model, end_of_turn_ids(self.tokenizer, loaded.path), max_context)
        self.last_stats = GenerationStats()

    def render(self, messages: list[dict[str, str]], spans: list | None = None) -> list[int]:
        """Messages -> prompt token ids through the checkpoint's own chat template (`spans` collects the
        token spans of knowledge-base passages, see kuaida.dialogue.template.render_prompt)."""
        return render_prompt(self.tokenizer, messages, spans)

    def use_passage_cache(self, budget_mb: int = 512) -> None:
        """Encode knowledge-base passages once each and reuse them (block attention, see
        kuaida.engine.passages); 0: prefill them in place (full attention, the default)."""
        self.engine.passages = make_passage_cache(self.model, self.tokenizer, budget_mb)
        self.engine.cached_ids = []  # what the cache row holds was computed the other way

    def use_prompt_lookup(self, config: LookupConfig | None = LookupConfig()) -> None:
        """Greedy replies draft tokens from the prompt and verify them in one forward (the same reply,
        fewer forward passes when it copies: kuaida.engine.lookup); None: off (the default)."""
        self.engine.use_prompt_lookup(config)

    def stream(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """Yield the reply as text pieces (valid UTF-8). Keyword arguments are SamplingParams fields
        (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)."""
        params = SamplingParams(**sampling)
        self.last_stats = GenerationStats()
        spans: list[tuple[int, int]] = []
        ids = self.render(messages, spans)
        yield from self.engine.stream(ids, params, self.tokenizer, self.last_stats, spans)

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """The whole reply as one string; speed figures land in `bot.last_stats`."""
        return "".join(self.stream(messages, **sampling))


def make_passage_cache(model, tokenizer, budget_mb: int):
    """A PassageCache for `model` (passages anchored after the opening of a grounded prompt), or None when
    budget_mb is 0 or the model is not kuaida's Transformer (a GRU, or a model run through transformers)."""
    from kuaida.engine.passages import PassageCache
    from kuaida.model.transformer import Transformer

    if budget_mb <= 0 or not isinstance(model, Transformer):
        return None
    return PassageCache(model, passage_anchor_ids(tokenizer), budget_mb)


def load_weights(model: str = "default", dtype: str | None = "int8",
                 cache: str | Path | None = None) -> LoadedModel:
    """Load a model ("default", a Hugging Face directory or a .gguf file) and convert its weights to
    `dtype` (fp32, bf16, int8, int4) for kuaida's kernels; None: as stored (fp32 unless quantized).

    A directory saved from a quantized model (`kuaida quantize`) runs as saved when `dtype` is its dtype;
    another dtype dequantizes it and quantizes again, with a warning (no better than the saved format)."""
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    loaded = load_model(model, cache=Path(cache) if cache else None)
    saved = loaded.quantization["dtype"] if loaded.quantization else None
    dtype = dtype or saved or "fp32"
    if saved is not None and saved != dtype:
        log.warning("%s is saved quantized to %s; converting it to %s (dequantize, then quantize: never "
                    "better than %s). Pass dtype %s to run it as saved.", model, saved, dtype, saved, saved)
        dequantize(loaded.model)
        saved = None
    if dtype != "fp32":
        if loaded.backend not in ("native", "gru"):
            raise InvalidArgumentError(
                f"dtype {dtype} needs a natively supported architecture; this model runs through "
                "transformers, use dtype='fp32'"
            )
        if saved is None:
            quantize(loaded.model, dtype)
        if dtype in ("int8", "int4"):
            # Build (first run, ~35 s) or load the compiled kernels now, while the caller shows
            # "loading", not inside the first request's time to first token.
            kernels.available()
    fuse(loaded.model)  # inference: norms, RoPE and SwiGLU's glue in one kernel call each
    buffers_on_huge_pages(loaded.model)  # the quantized weights every decode step streams
    log.info("loaded %s (%s, %s) in %.1f s", model, loaded.backend, dtype, time.perf_counter() - t0)
    return loaded


def load(model: str = "default", dtype: str = "int8", max_context: int | None = None,
         cache: str | Path | None = None) -> Bot:
    """Load a model ("default", a Hugging Face directory or a .gguf file) at a weight precision
    (fp32, bf16, int8, int4) and return a Bot."""
    return Bot(load_weights(model, dtype, cache), dtype, max_context)
