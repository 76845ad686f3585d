"""Shared fixtures: tiny random Hugging Face checkpoints (Llama, Qwen2, Mistral, GPT-2) with a tiny
byte-level BPE tokenizer and a ChatML chat template, saved once per session.

    def test_x(tiny_llama_dir): load_model(str(tiny_llama_dir))
    def test_y(make_hf_dir): make_hf_dir("qwen2", tie_word_embeddings=False)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kuaida.model.loader import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about computers and cats, please.",
    "user assistant system: you are a helpful assistant.",
] * 4
TOKENIZER_VOCAB = 320  # 256 byte symbols + 3 specials + merges learned from CORPUS

# Small enough to run in milliseconds, big enough to have GQA (4 heads on 2 KV heads) and 2 layers.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
GPT2_TINY = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)


def build_tokenizer():
    """A byte-level BPE trained in memory on CORPUS (deterministic), eos = <|im_end|>, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def randomize_(model: torch.nn.Module, std: float = 0.2) -> None:
    """HF init (std 0.02, zero biases, unit norms) gives near-zero logits that any code would match
    to 1e-4; larger random weights make parity tests meaningful."""
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()  # LlamaRMSNorm, LayerNorm, ...
            for name, p in module.named_parameters(recurse=False):
                p.normal_(mean=1.0 if is_norm and name == "weight" else 0.0, std=std)


def tiny_transformer(std: float = 0.02, seed: int = 0):
    """kuaida's tiny Transformer with its matrices drawn from N(0, std) (norms left at 1): 0.02 is HF's init,
    logits spread over many tokens as in a real LM; larger makes them peakier."""
    from kuaida.model.args import ModelArgs
    from kuaida.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def save_tiny_model(path: Path, model_type: str, tokenizer, seed: int = 0, **overrides) -> Path:
    """A random `model_type` causal LM sized TINY, saved as safetensors with `tokenizer` into `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    shape = GPT2_TINY if model_type == "gpt2" else TINY
    config = AutoConfig.for_model(model_type, **{**shape, **ids, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize_(model)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Plain `pytest` is the fast tier: integration tests run only when `-m` names them."""
    if "integration" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="integration test: run with `pytest -m integration`")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def make_hf_dir(tmp_path_factory, tiny_tokenizer):
    """make_hf_dir(model_type, **config_overrides) -> Path of a saved tiny random checkpoint (cached)."""
    made: dict[str, Path] = {}

    def make(model_type: str, **overrides) -> Path:
        key = json.dumps([model_type, overrides], sort_keys=True)
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{model_type}")
            made[key] = save_tiny_model(path, model_type, tiny_tokenizer, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(make_hf_dir) -> Path:
    """Tiny Llama with tied embeddings (like SmolLM2)."""
    return make_hf_dir("llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(make_hf_dir) -> Path:
    """Tiny Qwen2 (q/k/v biases), untied embeddings."""
    return make_hf_dir("qwen2", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(make_hf_dir) -> Path:
    """Tiny GPT-2: an architecture without a native module (runs through transformers)."""
    return make_hf_dir("gpt2")


# -- a tiny GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes a Llama --------------------
def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per head pair (its rotary layout); the loader undoes this."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_dir: Path, out: Path) -> Path:
    """Write the tiny Llama checkpoint in `hf_dir` as an F32 GGUF with its tokenizer and chat template."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    _add_tokenizer(writer, tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for key, tensor in load_file(hf_dir / "model.safetensors").items():
        w = tensor.float().numpy()
        proj = key.split(".")[-2]
        if proj in heads:
            w = _permute_for_gguf(w, heads[proj])
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer, tok: dict) -> None:
    import gguf

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_token_types([control if t in specials else normal for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(specials["<|im_start|>"])
    writer.add_eos_token_id(specials["<|im_end|>"])
    writer.add_pad_token_id(specials["<|endoftext|>"])
    writer.add_chat_template(CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, make_hf_dir) -> Path:
    """The untied tiny Llama (make_hf_dir("llama", tie_word_embeddings=False)) as an F32 GGUF file."""
    hf_dir = make_hf_dir("llama", tie_word_embeddings=False)
    return write_llama_gguf(hf_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")
