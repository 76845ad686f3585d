"""The model layer: a Llama-family Transformer in plain PyTorch, its KV cache, and loaders for Hugging
Face directories, GGUF files and the embedded default (with a transformers fallback for other
architectures)."""
from kuaida.model.args import SUPPORTED_MODEL_TYPES, ModelArgs
from kuaida.model.convert import gguf_to_hf_dir, hf_to_kuaida
from kuaida.model.hf_backend import HFCache, HFCausalLM
from kuaida.model.kv_cache import KVCache
from kuaida.model.loader import LoadedModel, cache_dir, describe, load_model, resolve
from kuaida.model.transformer import Transformer

__all__ = [
    "SUPPORTED_MODEL_TYPES", "ModelArgs", "Transformer", "KVCache",
    "LoadedModel", "load_model", "resolve", "describe", "cache_dir",
    "hf_to_kuaida", "gguf_to_hf_dir", "HFCausalLM", "HFCache",
]
