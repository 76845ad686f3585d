"""Write a model for other runtimes: a Hugging Face directory transformers loads, or a GGUF file
llama.cpp loads; and `quantize_to_dir`, the `kuaida quantize` command (load, quantize, save, measure).

    export_hf(model, tokenizer, "out/")                    # dequantized fp32, pruned ids as zero rows
    export_gguf(model, tokenizer, "m.gguf", dtype="q8_0")  # llama.cpp conventions (convert_hf_to_gguf.py)

GGUF: llama-arch metadata; q/k rows permuted into llama.cpp's rotary layout (the inverse of what the
loader undoes); norms and biases stay f32. The tokenizer metadata is copied from the GGUF the model came
from when there is one (`kuaida_source.json` in the cache entry), else built from tokenizer.json (a
gpt2-style byte-level BPE). A pruned output vocabulary is written as zero rows: other runtimes score
those ids 0, not -inf.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kuaida.compress.quantize import dequantize
from kuaida.errors import InvalidArgumentError, UnsupportedModelError
from kuaida.model.args import ModelArgs
from kuaida.model.save import check_target, hf_tensors, quantization_of, save_model

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16", "q8_0")
_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # as convert_hf_to_gguf.py maps them


def export_hf(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """A transformers-loadable directory of `model`, dequantized to fp32 if it is quantized (the
    caller's model is left as it is)."""
    return save_model(_fp32(model), tokenizer, out_dir, overwrite=overwrite)


def _fp32(model: nn.Module) -> nn.Module:
    """`model` itself when it holds no quantized module, else a dequantized copy."""
    return model if quantization_of(model) is None else dequantize(copy.deepcopy(model))


# -- GGUF -------------------------------------------------------------------------------------------
def export_gguf(model: nn.Module, tokenizer: Any, out: str | Path, *, dtype: str = "f32",
                source_gguf: Path | None = None, overwrite: bool = False) -> Path:
    """Write `model` as a GGUF file at `out`. dtype: f32, f16 or q8_0 for the matrices (an int8 model
    becomes q8_0 without loss: the formats are the same). `source_gguf`: copy its tokenizer metadata."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise InvalidArgumentError(f"GGUF dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} exists; choose another path or pass overwrite=True (--overwrite)")
    model = _fp32(model)
    args: ModelArgs = model.args
    arch = _check_gguf_args(args)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(partial), arch)
    try:
        _add_model_metadata(writer, args, arch, dtype)
        if source_gguf is not None:
            _copy_tokenizer_metadata(writer, source_gguf)
        else:
            _add_tokenizer_metadata(writer, tokenizer, args)
        _add_tensors(writer, model, args, arch, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    log.info("wrote %s (%s, %s)", out, arch, dtype)
    return out


def _check_gguf_args(args: ModelArgs) -> str:
    if args.model_type not in _GGUF_ARCH:
        raise UnsupportedModelError(f"GGUF export supports {', '.join(_GGUF_ARCH)}, not {args.model_type!r}")
    kind = (args.rope_scaling or {}).get("rope_type", (args.rope_scaling or {}).get("type"))
    if kind not in (None, "default", "linear"):
        raise UnsupportedModelError(f"GGUF export does not write {kind!r} rope scaling (plain and linear only)")
    if args.qkv_bias and args.model_type != "qwen2":
        raise UnsupportedModelError("GGUF export: q/k/v biases are supported for qwen2 only")
    return _GGUF_ARCH[args.model_type]


def _add_model_metadata(writer, args: ModelArgs, arch: str, dtype: str) -> None:
    import gguf

    writer.add_name(f"kuaida {args.model_type} {args.n_layers}x{args.dim}")
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    if args.head_dim != args.dim // args.n_heads:
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    if args.rope_scaling:  # linear (checked): positions divided by factor
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(args.rope_scaling["factor"])
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF q/k rows -> llama.cpp's layout (convert_hf_to_gguf.py LlamaModel.permute): each head's two
    rotary halves interleaved. [n_head * head_dim, ...] -> same shape."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensors(writer, model: nn.Module, args: ModelArgs, arch: str, dtype: str) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                     args.n_layers)
    heads = {"q_proj": args.n_heads, "k_proj": args.n_kv_heads}
    for key, tensor in hf_tensors(model, args).items():
        proj = key.split(".")[-2]
        w = tensor.float()
        if arch == "llama" and proj in heads:  # qwen2 uses NeoX rotary: no permutation
            w = _permute(w, heads[proj])
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"no GGUF name for tensor {key}")
        _add_tensor(writer, name, w.numpy(), dtype)


def _add_tensor(writer, name: str, w: np.ndarray, dtype: str) -> None:
    import gguf

    if w.ndim == 1 or dtype == "f32":  # norms and biases stay f32 (llama.cpp expects them so)
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    elif dtype == "f16":
        writer.add_tensor(name, w.astype(np.float16))
    elif w.shape[-1] % 32:
        log.info("%s stays f16: its rows (%d) are not a multiple of Q8_0's block of 32", name, w.shape[-1])
        writer.add_tensor(name, w.astype(np.float16))
    else:
        q = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


# -- tokenizer metadata ----------------------------------------------------------------------------
def source_gguf(hf_dir: Path) -> Path | None:
    """The GGUF a cached conversion came from (its kuaida_source.json), if it still exists."""
    marker = hf_dir / "kuaida_source.json"
    if not marker.is_file():
        return None
    path = Path(json.loads(marker.read_text()).get("gguf", ""))
    return path if path.is_file() else None


def _copy_tokenizer_metadata(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


def _add_tokenizer_metadata(writer, tokenizer: Any, args: ModelArgs) -> None:
    """tokenizer.ggml.* from a fast tokenizer's tokenizer.json (byte-level BPE only)."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError("GGUF export needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise UnsupportedModelError(f"GGUF export writes byte-level BPE tokenizers, not {spec['model']['type']}")
    tokens = [f"[PAD{i}]" for i in range(args.vocab_size)]  # ids the tokenizer does not use
    types = [gguf.TokenType.UNUSED] * args.vocab_size
    entries = [(t, i, gguf.TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()]
    entries += [(t["content"], t["id"], gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED)
                for t in spec["added_tokens"]]
    for text, i, kind in entries:
        if i >= args.vocab_size:
            raise UnsupportedModelError(f"token id {i} ({text!r}) >= the model's vocab_size {args.vocab_size}")
        tokens[i], types[i] = text, kind
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if args.model_type == "qwen2" else _pre_tokenizer(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for add, value in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                       (writer.add_eos_token_id, tokenizer.eos_token_id),
                       (writer.add_pad_token_id, tokenizer.pad_token_id),
                       (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if value is not None:
            add(value)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(pre: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer regexes (Qwen2 models get "qwen2" by architecture): plain
    byte-level is GPT-2's; digits split one by one before byte-level is SmolLM's. Anything else gets
    llama.cpp's default (logged)."""
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits")) for p in parts]
    if kinds == [("ByteLevel", None)]:
        return "gpt-2"
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        return "smollm"
    log.warning("pre-tokenizer %s has no known llama.cpp name; writing 'default' (check the tokens)", kinds)
    return "default"


# -- the command-line entry points ------------------------------------------------------------------
def export(model_spec: str, out: str | Path, fmt: str, *, dtype: str = "f32", overwrite: bool = False) -> Path:
    """`kuaida export`: load MODEL ("default", a directory, a .gguf) and write it as "hf" or "gguf"."""
    from kuaida.model.loader import load_model

    if fmt not in ("hf", "gguf"):
        raise InvalidArgumentError(f"export format {fmt!r}: choose hf or gguf")
    if fmt == "gguf" and dtype not in GGUF_DTYPES:  # checked before the load, which takes seconds
        raise InvalidArgumentError(f"GGUF dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    if fmt == "hf":
        check_target(Path(out).expanduser(), overwrite)
    loaded = load_model(model_spec)
    if loaded.backend != "native":
        raise UnsupportedModelError(f"{model_spec} runs through transformers: export it with transformers")
    if fmt == "hf":
        return export_hf(loaded.model, loaded.tokenizer, out, overwrite=overwrite)
    return export_gguf(loaded.model, loaded.tokenizer, out, dtype=dtype, source_gguf=source_gguf(loaded.path),
                       overwrite=overwrite)


def quantize_to_dir(model_spec: str, out_dir: str | Path, dtype: str, *, group_size: int = 32,
                    eval_samples: int = 200, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """`kuaida quantize`: load, quantize with kuaida's formats, save; -> a report with sizes on disk and
    held-out perplexity before and after (eval_samples=0 skips the perplexity)."""
    from kuaida.bench.quality import perplexity
    from kuaida.compress.quantize import quantize
    from kuaida.model.loader import load_model, read_config, resolve, weight_files
    from kuaida.train.data import DataConfig, heldout_examples

    if dtype not in ("int8", "int4", "bf16"):
        raise InvalidArgumentError(f"quantize dtype {dtype!r}: choose int8, int4 or bf16")
    out = Path(out_dir).expanduser()
    check_target(out, overwrite)
    loaded = load_model(model_spec)
    if loaded.backend != "native" or loaded.quantization:
        raise UnsupportedModelError(f"{model_spec} is {'already quantized' if loaded.quantization else 'not native'}"
                                    "; quantize an fp32 Llama-family model (kuaida export --hf gives one)")
    data = DataConfig()
    examples = heldout_examples(loaded.tokenizer, data, eval_samples) if eval_samples else []
    before = perplexity(loaded.model, examples, progress=progress) if examples else None
    quantize(loaded.model, dtype, group_size)
    after = perplexity(loaded.model, examples, progress=progress) if examples else None
    history = (read_config(loaded.path).get("kuaida") or {}).get("history", [])
    step = {"step": "quantize", "dtype": dtype, "group_size": group_size, "source": loaded.source}
    save_model(loaded.model, loaded.tokenizer, out, extra={"history": [*history, step]}, overwrite=overwrite)
    return {
        "model": loaded.source, "out": str(out), "dtype": dtype, "group_size": group_size,
        "bytes": {"source": _bytes(resolve(model_spec)[1]),
                  "fp32": sum(_bytes(f) for f in weight_files(loaded.path)), "out": _bytes(out)},
        "eval": None if before is None else {
            "data": {"source": data.source, "seed": data.seed, "heldout_fraction": data.heldout_fraction},
            "examples": len(examples), "before": before.to_dict(), "after": after.to_dict(),
            "ratio": after.perplexity / before.perplexity},
    }


def _bytes(path: Path) -> int:
    """Size on disk of a file, or of every file under a directory."""
    path = path.expanduser()
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
