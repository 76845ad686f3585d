"""Run an architecture we have no native module for (gpt2, phi3, gemma, ...) through transformers' own
AutoModelForCausalLM, behind the interface of our Transformer so the engine drives both alike:
`new_cache(batch, max_seq)` and `forward(tokens, positions, cache, rows, last_only) -> fp32 logits`.

One sequence at a time (batch 1): transformers' DynamicCache grows as tokens arrive and is cropped when
the engine rewinds to reuse a shorter prefix.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from kuaida.errors import ModelFormatError, UnsupportedModelError

DEFAULT_CONTEXT = 2048  # for configs that name no context length


def context_length(config: dict[str, Any]) -> int | None:
    """The context window a config declares, under the names architectures use for it."""
    return config.get("max_position_embeddings") or config.get("n_positions") or config.get("n_ctx")


@dataclass(frozen=True)
class HFArgs:
    """The few ModelArgs fields the engine reads, for a model that has no ModelArgs."""
    vocab_size: int
    max_seq_len: int
    model_type: str


class HFCache:
    """A transformers DynamicCache for one sequence; `length` tokens are cached, positions 0..length-1."""

    def __init__(self, config, max_seq: int) -> None:
        from transformers import DynamicCache

        self.dc = DynamicCache(config=config)
        self.batch, self.max_seq = 1, max_seq

    @property
    def length(self) -> int:
        return self.dc.get_seq_length()

    def rewind(self, start: int) -> None:
        """Keep only positions < start, so the next tokens (at `start`..) continue a cached prefix."""
        extra = self.length - start
        if extra < 0:
            raise ValueError(f"positions start at {start} but only {self.length} tokens are cached")
        if extra:
            self.dc.crop(-extra)  # transformers 5: a negative count removes that many tokens

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.dc.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


class HFCausalLM(nn.Module):
    """Adapter: a transformers causal LM with the native Transformer's forward and new_cache."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        text = hf_model.config.get_text_config()
        self.args = HFArgs(
            vocab_size=hf_model.get_output_embeddings().weight.shape[0],
            max_seq_len=context_length(text.to_dict()) or DEFAULT_CONTEXT,
            model_type=text.model_type,
        )
        # Computing logits for the last position only saves a [T, vocab] matmul in prefill.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(hf_model.forward).parameters

    def new_cache(self, batch: int = 1, max_seq: int | None = None) -> HFCache:
        if batch != 1:
            raise UnsupportedModelError(
                f"the transformers backend ({self.args.model_type}) runs one sequence at a time, not {batch}"
            )
        return HFCache(self.hf.config, min(max_seq or self.args.max_seq_len, self.args.max_seq_len))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: HFCache | None = None, rows: slice | torch.Tensor = slice(0, 1),
                last_only: bool = False) -> torch.Tensor:
        """tokens, positions: [1, T] -> logits [1, T, vocab] (or [1, 1, vocab] with last_only).

        positions are absolute and contiguous; with a cache, those before positions[0, 0] are the
        cached prefix (a cache holding more is cropped back to it). `rows` is always row 0 here.
        """
        B, T = tokens.shape
        if B != 1:
            raise UnsupportedModelError(f"the transformers backend runs batch 1, got a batch of {B}")
        if positions is None:
            positions = torch.arange(T)[None]
        if cache is not None:
            cache.rewind(int(positions[0, 0]))
        kwargs = {"logits_to_keep": 1} if last_only and self._logits_to_keep else {}
        out = self.hf(input_ids=tokens, position_ids=positions, past_key_values=cache.dc if cache else None,
                      use_cache=cache is not None, **kwargs)
        logits = out.logits[:, -1:] if last_only else out.logits
        return logits.float()


def load_hf_model(hf_dir: Path) -> HFCausalLM:
    """transformers' model for the directory in fp32, safetensors only (never a pickle)."""
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, use_safetensors=True, local_files_only=True
        )
    except SafetensorError as e:
        raise ModelFormatError(
            f"{hf_dir}: a weights file is not a readable safetensors file ({e}); re-download or re-save it"
        ) from e
    except (OSError, ValueError, KeyError) as e:
        raise ModelFormatError(f"transformers cannot load {hf_dir}: {e}") from e
    return HFCausalLM(hf_model.eval())
