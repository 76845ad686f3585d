"""Weight conversions: a Hugging Face state dict -> ours, and a GGUF file -> a Hugging Face directory.

Our module names are Hugging Face's without the `model.` prefix, so the first is a rename plus the
bookkeeping HF checkpoints need: rotary buffers some old checkpoints saved, and tied embeddings
(`lm_head.weight` is absent from the file when it shares the input embedding).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from kuaida.errors import ModelFormatError, UnsupportedModelError
from kuaida.model.args import ModelArgs
from kuaida.model.transformer import Transformer

_MAX_LISTED = 5  # keys named in an error message; the rest are counted


def hf_to_kuaida(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename HF keys to ours and check every key and shape against a model built from `args`.

    With tied embeddings the result maps `lm_head.weight` to the embedding tensor itself, so
    `load_state_dict(strict=True)` sees both keys and they stay one tensor.
    """
    sd = {
        key.removeprefix("model."): value
        for key, value in state_dict.items()
        if not key.endswith("rotary_emb.inv_freq")  # recomputed from the config, never loaded
    }
    sd = fuse_projections(sd)
    if args.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some checkpoints store the tied copy too: the embedding wins
        if "embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
    _check_against(sd, _expected_shapes(args))
    return sd


# Our fused projections and the HF ones they stack, by rows, in this order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack each layer's q/k/v (and gate/up) weights and biases into our fused ones."""
    out = dict(sd)
    for key in sd:
        for fused, parts in FUSED.items():
            for suffix in (".weight", ".bias"):
                if not key.endswith(parts[0] + suffix):
                    continue
                prefix = key[: -len(parts[0] + suffix)]
                names = [prefix + part + suffix for part in parts]
                if all(n in sd for n in names):
                    out[prefix + fused + suffix] = torch.cat([sd[n] for n in names], dim=0)
                    for n in names:
                        del out[n]
    return out


def kuaida_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_kuaida for an fp32 (unquantized) state dict: split the fused projections,
    add the `model.` prefix; a tied `lm_head.weight` is left out (HF re-ties it from the config)."""
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    rows = {"self_attn.qkv_proj": (q_out, kv_out, kv_out),
            "mlp.gate_up_proj": (args.intermediate_size, args.intermediate_size)}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            if not (args.tie_embeddings and args.output_ids is None):
                out[key] = value
            continue
        fused = next((f for f in FUSED if key.endswith((f + ".weight", f + ".bias"))), None)
        if fused is None:
            out["model." + key] = value
            continue
        prefix, suffix = key[: key.index(fused)], key[key.index(fused) + len(fused):]
        for part, piece in zip(FUSED[fused], value.split(rows[fused], dim=0)):
            out["model." + prefix + part + suffix] = piece
    return out


def _expected_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    # A model on the meta device costs no memory and is the single source of truth for names/shapes.
    with torch.device("meta"):
        model = Transformer(args)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def _check_against(sd: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k])}"
             for k in sorted(expected.keys() & sd.keys()) if sd[k].shape != expected[k]]
    if wrong:
        problems.append(f"wrong shape {_listing(wrong)}")
    if problems:
        raise UnsupportedModelError(
            "checkpoint does not match its config.json: " + "; ".join(problems)
            + " (is the checkpoint a plain Llama/Qwen2/Mistral decoder?)"
        )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} (+{more} more)" if more > 0 else shown


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> None:
    """Write a Hugging Face directory for a GGUF: config.json, generation_config.json, fp32
    model.safetensors (dequantized, q/k un-permuted back to HF's rotary layout) and the tokenizer with
    the chat template from the GGUF metadata (`tokenizer.chat_template`).

    This is what `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` does, minus the model
    instance (which needs `accelerate` and random init): transformers' GGUF reader maps the names and
    un-permutes, the tensors go straight to disk.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name,
               local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(**src)
        with torch.device("meta"):  # only for the parameter names: no memory, no init
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton,
                                       torch_dtype=torch.float32)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(**src)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise ModelFormatError(f"cannot convert {gguf_path.name}: {e}") from e
    tied = config.get_text_config().tie_word_embeddings
    missing = sorted(k for k in skeleton.state_dict().keys() - tensors.keys()
                     if not (tied and k == "lm_head.weight"))
    if missing:
        raise ModelFormatError(f"{gguf_path.name} lacks tensors for {_listing(missing)}")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
