"""Save a model as a directory `load_model` reads back, and that transformers reads too when it is not
quantized.

    save_model(model, tokenizer, "out/")              # -> Path("out")

Unquantized: a Hugging Face directory (config.json with LlamaConfig-style keys, model.safetensors with HF
names, fused q/k/v and gate/up split back, tokenizer files, generation_config.json). A pruned output
vocabulary is saved as a full-size lm_head with zero rows for pruned ids, the kept ids in
`config["kuaida"]["output_ids"]` (transformers then scores pruned ids 0 instead of -inf).

Quantized (kuaida.compress.quantize modules): our own names and buffers (qweight, scales, mins), and
`config["kuaida"]["quantization"] = {"dtype", "group_size", "head_dtype"}`. Only kuaida loads such a
directory: it rebuilds the model on the meta device, quantizes the empty model (shapes only) and adopts
the saved buffers, so the logits are bit-identical and nothing is quantized twice. `kuaida export`
writes a transformers- or llama.cpp-loadable copy.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kuaida.compress.quantize import BF16Linear, Int4Linear, Int8Linear, quantize
from kuaida.errors import InvalidArgumentError, ModelFormatError, UnsupportedModelError
from kuaida.model.args import ModelArgs
from kuaida.model.convert import kuaida_to_hf
from kuaida.model.transformer import Transformer

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_KINDS = {Int8Linear: "int8", Int4Linear: "int4", BF16Linear: "bf16", nn.Linear: "fp32"}
_DEFAULT_GROUP = 32  # quantize()'s default; what a bf16-only model (no groups to measure) was built with


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, extra: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Write `model` (a kuaida Transformer, quantized or not) and `tokenizer` into `out_dir`.

    `extra` goes into config["kuaida"] (e.g. {"history": [{"step": "prune", ...}]}). The directory is
    written next to its target and renamed into place at the end, so it is either complete or absent.
    A non-empty `out_dir` is replaced only with overwrite=True.
    """
    args = getattr(model, "args", None)
    if not isinstance(model, Transformer) or not isinstance(args, ModelArgs):
        raise UnsupportedModelError(f"save_model saves kuaida Transformers, got {type(model).__name__}")
    out = Path(out_dir).expanduser()
    check_target(out, overwrite)
    quantization = quantization_of(model)
    tensors = _quantized_tensors(model) if quantization else hf_tensors(model, args)
    ours = dict(extra or {})
    if args.output_ids is not None:
        ours["output_ids"] = list(args.output_ids)
    if quantization:
        ours["quantization"] = quantization
    config = hf_config(args, tokenizer, model.embed_tokens.weight.dtype)
    if ours:
        config.kuaida = ours
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(partial)
        _generation_config(config).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        _move_into_place(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("saved %s model to %s", quantization["dtype"] if quantization else "fp32", out)
    return out


def hf_config(args: ModelArgs, tokenizer: Any, dtype: torch.dtype = torch.float32):
    """A transformers config (LlamaConfig, Qwen2Config or MistralConfig) describing `args`."""
    from transformers import AutoConfig

    if args.model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"cannot save model_type {args.model_type!r} "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    if args.qkv_bias and args.model_type != "qwen2":
        # HF Llama/Mistral's attention_bias also puts a bias on o_proj, which our block does not have.
        raise UnsupportedModelError(f"a {args.model_type} with q/k/v biases has no Hugging Face equivalent")
    rope = {**(args.rope_scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta}
    keys = {
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "rms_norm_eps": args.norm_eps,
        "rope_parameters": rope, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings and args.output_ids is None,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if args.model_type != "qwen2":
        keys["attention_bias"] = False
    if args.model_type == "mistral":
        keys["sliding_window"] = None  # our attention is full; a capped window was folded into max_seq_len
    config = AutoConfig.for_model(args.model_type, **keys)
    config.architectures = [ARCHITECTURES[args.model_type]]
    config.dtype = dtype
    return config


def _generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig.from_model_config(config)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy where it is a view into a larger storage (kuaida.model.memory packs an inference
    model's buffers into one arena; safetensors refuses tensors that share memory)."""
    t = t.detach().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def hf_tensors(model: Transformer, args: ModelArgs) -> dict[str, torch.Tensor]:
    """An fp32 model's tensors under HF names (what model.safetensors holds)."""
    sd = {k: _own_storage(v) for k, v in model.state_dict().items()}
    if args.output_ids is not None:
        # Full-vocabulary head, zero rows where pruned: transformers loads it; our loader keeps the rows.
        kept = sd["lm_head.weight"]  # [len(output_ids), dim]
        head = kept.new_zeros(args.vocab_size, kept.shape[1])
        head[list(args.output_ids)] = kept
        sd["lm_head.weight"] = head
    return {k: v.contiguous() for k, v in kuaida_to_hf(sd, args).items()}


def _quantized_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: _own_storage(v) for k, v in model.state_dict().items()}
    if model.lm_head.__class__ is nn.Linear and model.lm_head.weight is model.embed_tokens.weight:
        del sd["lm_head.weight"]  # tied: one tensor on disk, re-tied by load_quantized
    return sd


# -- the quantized format ---------------------------------------------------------------------------
def quantization_of(model: Transformer) -> dict[str, Any] | None:
    """{"dtype", "group_size", "head_dtype"} of a quantized model, None for an fp32 one.

    Raises when the model's modules are not what `quantize(meta_model, **that)` builds (a mix of
    formats in the layers, say): the loader could not rebuild it."""
    layer_kinds = {_kind(m) for m in model.layers.modules() if type(m) in _KINDS}
    head = _kind(model.lm_head)
    quantized = sorted(layer_kinds - {"fp32"})
    if len(quantized) > 1:
        raise UnsupportedModelError(f"layers mix formats {quantized}: save supports one format per model")
    dtype = quantized[0] if quantized else "fp32"
    if dtype == "fp32" and head == "fp32":
        return None
    grouped = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    group_size = grouped[0].in_features // grouped[0].scales.shape[1] if grouped else _DEFAULT_GROUP
    found = {"dtype": dtype, "group_size": group_size, "head_dtype": head}
    expected = _skeleton(model.args, found).state_dict()
    actual = model.state_dict()
    if {k: (v.shape, v.dtype) for k, v in expected.items()} != {k: (v.shape, v.dtype) for k, v in actual.items()}:
        raise UnsupportedModelError(f"this quantized model is not what quantize(model, {found}) builds "
                                    "(quantized by hand?); the loader could not rebuild it")
    return found


def _kind(module: nn.Module) -> str:
    return _KINDS[type(module)]


def _skeleton(args: ModelArgs, quantization: dict[str, Any]) -> Transformer:
    """An empty model (meta device) with the quantized modules `quantization` describes."""
    with torch.device("meta"):
        model = Transformer(args)
    return quantize(model, quantization["dtype"], quantization["group_size"], quantization["head_dtype"])


def load_quantized(files: list[Path], args: ModelArgs, quantization: dict[str, Any]) -> Transformer:
    """The model `save_model` wrote from a quantized one: buffers adopted as saved (no re-quantization).
    The caller sets the non-persistent buffers (inv_freq, output_ids), as for an fp32 load."""
    try:
        model = _skeleton(args, quantization)
    except (KeyError, TypeError, InvalidArgumentError) as e:
        raise ModelFormatError(f"config.json kuaida.quantization {quantization} is not valid: {e}") from e
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    tied = type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed_tokens.weight
    if tied:
        sd["lm_head.weight"] = sd.get("embed_tokens.weight")
    try:
        model.load_state_dict(sd, assign=True, strict=True)
    except RuntimeError as e:
        raise ModelFormatError(f"the quantized weights do not match config.json ({e}); re-save the model") from e
    if tied:  # assign=True made two Parameter objects: make them one again
        model.lm_head.weight = model.embed_tokens.weight
    return model


# -- writing the directory --------------------------------------------------------------------------
def check_target(out: Path, overwrite: bool) -> None:
    """Refuse a path that is a file, or a non-empty directory unless overwrite (callers check early,
    before minutes of work)."""
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InvalidArgumentError(f"{out} is not empty; choose another directory or pass overwrite=True "
                                   "(--overwrite on the command line)")


def _move_into_place(partial: Path, out: Path) -> None:
    """Rename the finished directory to `out`; an existing `out` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
