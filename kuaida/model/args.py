"""ModelArgs: the shape of a Llama-family Transformer, read from a checkpoint's config.json."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kuaida.errors import UnsupportedModelError

# HF `model_type`s whose decoder is the Llama block we implement (pre-norm, RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate_size: int = 11008
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF rope_scaling dict ({"rope_type": "llama3" | "linear", ...}) or None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has a bias on q, k and v projections
    model_type: str = "llama"
    # Output-vocabulary pruning (kuaida.compress.prune): the token ids the output layer still scores, in
    # ascending order; None = every token. The input embedding keeps the whole vocabulary.
    output_ids: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "intermediate_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"model config: {name} must be positive")
        if self.output_ids is not None:
            self.output_ids = tuple(int(i) for i in self.output_ids)
            if not self.output_ids or list(self.output_ids) != sorted(set(self.output_ids)) \
                    or self.output_ids[0] < 0 or self.output_ids[-1] >= self.vocab_size:
                raise UnsupportedModelError("output_ids must be ascending, unique token ids below vocab_size")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise UnsupportedModelError(
                    f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)"
                )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Build from a Hugging Face config.json dict (Llama, Qwen2, Mistral, SmolLM)."""
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"architecture {model_type!r} has no native kuaida module "
                f"(native: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:  # transformers 5 keeps theta inside rope_parameters
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        if scaling is None and cfg.get("rope_parameters"):
            rp = cfg["rope_parameters"]
            if rp.get("rope_type", "default") != "default":
                scaling = dict(rp)
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or dim // n_heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            model_type=model_type,
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        if name not in PRESETS:
            raise UnsupportedModelError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def output_size(self) -> int:
        """Rows of the output layer: the kept vocabulary, or all of it."""
        return len(self.output_ids) if self.output_ids is not None else self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}


PRESETS: dict[str, dict[str, Any]] = {
    # 2 layers, 64 wide: the unit-test model (runs in milliseconds).
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                 max_seq_len=256, tie_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         intermediate_size=1536, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
                         tie_embeddings=True),
}
