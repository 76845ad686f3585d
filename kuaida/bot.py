"""`kuaida.load(...)` -> Bot: the simplest way to chat with a model from Python.

    bot = kuaida.load("default", dtype="int8")
    reply = bot.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=64, temperature=0)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from kuaida.compress.quantize import DTYPES, quantize
from kuaida.engine.generate import Engine, GenerationStats
from kuaida.engine.sampling import SamplingParams
from kuaida.errors import InvalidArgumentError
from kuaida.model.loader import LoadedModel, load_model

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# End-of-turn markers of common chat templates: generation stops at whichever the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check the OpenAI-style message list a user passed; -> a clean copy."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {'role', 'content'} dicts")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidArgumentError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InvalidArgumentError(f"messages[{i}].role is {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InvalidArgumentError(f"messages[{i}].content must be a string")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def end_of_turn_ids(tokenizer, model_dir: Path | None) -> set[int]:
    """Token ids that end the assistant's turn: the tokenizer's eos, the generation config's, and the
    chat template's end-of-turn marker."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if model_dir is not None and (model_dir / "generation_config.json").exists():
        eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


class Bot:
    def __init__(self, loaded: LoadedModel, dtype: str = "fp32", max_context: int | None = None) -> None:
        self.loaded, self.dtype = loaded, dtype
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.engine = Engine(self.model, end_of_turn_ids(self.tokenizer, loaded.path), max_context)
        self.last_stats = GenerationStats()

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages -> prompt token ids through the checkpoint's own chat template."""
        text = self.tokenizer.apply_chat_template(validate_messages(messages), tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """Yield the reply as text pieces (valid UTF-8). Keyword arguments are SamplingParams fields
        (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)."""
        params = SamplingParams(**sampling)
        self.last_stats = GenerationStats()
        yield from self.engine.stream(self.render(messages), params, self.tokenizer, self.last_stats)

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """The whole reply as one string; speed figures land in `bot.last_stats`."""
        return "".join(self.stream(messages, **sampling))


def load(model: str = "default", dtype: str = "int8", max_context: int | None = None,
         cache: str | Path | None = None) -> Bot:
    """Load a model ("default", a Hugging Face directory or a .gguf file) at a weight precision
    (fp32, bf16, int8, int4) and return a Bot."""
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    loaded = load_model(model, cache=Path(cache) if cache else None)
    if dtype != "fp32":
        if loaded.backend != "native":
            raise InvalidArgumentError(
                f"dtype {dtype} needs a natively supported architecture; this model runs through "
                "transformers, use dtype='fp32'"
            )
        quantize(loaded.model, dtype)
    log.info("loaded %s (%s, %s) in %.1f s", model, loaded.backend, dtype, time.perf_counter() - t0)
    return Bot(loaded, dtype, max_context)
