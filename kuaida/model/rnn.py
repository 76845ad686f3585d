"""A recurrent (GRU) student: constant memory and cost per generated token, whatever the context length.

    model = GRUModel(GRUArgs(vocab_size=49152, dim=256, hidden=256, n_layers=2))
    logits = model(tokens)                          # [B, T, V], training
    state = model.new_cache(); model(ids, pos, state)  # the engine's interface

Each block is pre-norm and residual: x + out_proj(GRU(norm(x))). The GRU's input and recurrent projections
are nn.Linear modules under `layers.N` (ih_proj, hh_proj) and the output layer is `lm_head`, so
kuaida.compress.quantize quantizes them like a Transformer's. Unquantized, a sequence runs through
PyTorch's fused GRU kernel (torch.gru); quantized, the input projection runs for all tokens at once and
the recurrence steps token by token with the same gate math (PyTorch's gate order: reset, update, new).

The state cannot be cut back to a prefix, only extended: GRUState.extend_only tells the Engine to
prefill from scratch unless a new prompt extends exactly the tokens the state has seen.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kuaida.errors import ModelFormatError, UnsupportedModelError
from kuaida.model.transformer import RMSNorm

MODEL_TYPE = "kuaida_gru"


@dataclass
class GRUArgs:
    vocab_size: int = 49152
    dim: int = 256  # embedding and residual width
    hidden: int = 256  # recurrent state width per layer
    n_layers: int = 2
    tie_embeddings: bool = True  # lm_head shares the input embedding
    max_seq_len: int = 8192  # no architectural limit; the engine sizes prompts by it
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "hidden", "n_layers", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"GRU config: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GRUArgs:
        if name not in PRESETS:
            raise UnsupportedModelError(f"unknown GRU preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GRUArgs:
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in config.items() if k in names})
        except TypeError as e:
            raise ModelFormatError(f"not a {MODEL_TYPE} config: {e}") from e


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 256, "dim": 64, "hidden": 64, "n_layers": 2, "max_seq_len": 256},
}


class GRUState:
    """The engine's cache for a GRUModel: h [n_layers, batch, hidden] and the tokens each row has seen.

    A row whose next position is 0 starts fresh; any other position must continue the row exactly."""

    extend_only = True  # the Engine may reuse it only when a new prompt extends the tokens it has seen

    def __init__(self, n_layers: int, batch: int, hidden: int, dtype: torch.dtype = torch.float32) -> None:
        self.h = torch.zeros(n_layers, batch, hidden, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long)  # tokens consumed per row
        self.batch = batch

    def read(self, rows: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """The state before positions `start` [B] of cache rows `rows` [B] -> [n_layers, B, hidden]."""
        fresh = start == 0
        if not bool((fresh | (start == self.lengths[rows])).all()):
            raise RuntimeError(f"GRU state rows {rows.tolist()} have seen {self.lengths[rows].tolist()} "
                               f"tokens, cannot continue at positions {start.tolist()}: a recurrent state "
                               "is only extended, or restarted at position 0")
        return torch.where(fresh[None, :, None], 0.0, self.h[:, rows])

    def write(self, rows: torch.Tensor, h: torch.Tensor, lengths: torch.Tensor) -> None:
        self.h[:, rows] = h
        self.lengths[rows] = lengths

    def nbytes(self) -> int:
        return self.h.numel() * self.h.element_size()


class GRUBlock(nn.Module):
    def __init__(self, args: GRUArgs) -> None:
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Rows: reset, update, new gate (PyTorch's GRU layout, so torch.gru takes these weights as they are).
        self.ih_proj = nn.Linear(args.dim, 3 * args.hidden)
        self.hh_proj = nn.Linear(args.hidden, 3 * args.hidden)
        self.out_proj = nn.Linear(args.hidden, args.dim, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, dim], h [B, hidden] (state before x) -> (x + block(x) [B, T, dim], last state [B, hidden])."""
        u = self.norm(x)
        if isinstance(self.ih_proj, nn.Linear) and isinstance(self.hh_proj, nn.Linear):
            params = [self.ih_proj.weight, self.hh_proj.weight, self.ih_proj.bias, self.hh_proj.bias]
            # torch.gru(input, hx [layers, B, H], params, has_biases, num_layers, dropout, train,
            #           bidirectional, batch_first)
            y, h_n = torch.gru(u, h[None], params, True, 1, 0.0, self.training, False, True)
            return x + self.out_proj(y), h_n[0]
        return self._stepwise(x, u, h)

    def _stepwise(self, x: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same recurrence through the (quantized) projection modules: input projection for all tokens
        at once, then one recurrent matmul per token."""
        gi = self.ih_proj(u)  # [B, T, 3H]
        ys = []
        for t in range(gi.shape[1]):
            i_r, i_z, i_n = gi[:, t].chunk(3, dim=-1)
            h_r, h_z, h_n = self.hh_proj(h).chunk(3, dim=-1)  # [B, H] each
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = n + z * (h - n)  # (1 - z) * n + z * h
            ys.append(h)
        return x + self.out_proj(torch.stack(ys, dim=1)), h


class GRUModel(nn.Module):
    """The engine's model interface (forward, new_cache, .args) over a stack of GRU blocks."""

    def __init__(self, args: GRUArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(GRUBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch: int = 1, max_seq: int | None = None) -> GRUState:
        """A state for `batch` rows; its size does not depend on `max_seq` (accepted for the interface)."""
        return GRUState(self.args.n_layers, batch, self.args.hidden, self.embed_tokens.weight.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: GRUState | None = None,
                rows: slice | torch.Tensor = slice(0, 1), last_only: bool = False,
                full_vocab: bool = True) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] float32 ([B, 1, vocab] with last_only).

        Without a cache each row starts from a zero state and positions are ignored. With one, row b
        continues cache row rows[b] at positions[b, 0] (0: a fresh start). full_vocab is accepted for the
        interface: the output layer always scores the whole vocabulary."""
        B, T = tokens.shape
        if cache is None:
            h = torch.zeros(len(self.layers), B, self.args.hidden, dtype=self.embed_tokens.weight.dtype)
        else:
            row_idx = torch.arange(cache.batch)[rows] if isinstance(rows, slice) else rows
            start = positions[:, 0] if positions is not None else torch.zeros(B, dtype=torch.long)
            h = cache.read(row_idx, start)
        x = self.embed_tokens(tokens)  # [B, T, dim]
        h_out = []
        for i, layer in enumerate(self.layers):
            x, h_i = layer(x, h[i])
            h_out.append(h_i)
        if cache is not None:
            cache.write(row_idx, torch.stack(h_out), start + T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()


# -- saving and loading ----------------------------------------------------------------------------
def save_gru(model: GRUModel, tokenizer, out_dir: str | Path, *, extra: dict | None = None) -> Path:
    """Write config.json (model_type "kuaida_gru"), model.safetensors and the tokenizer files into
    `out_dir`; kuaida.model.load_model reads the directory back. A kuaida-only format: transformers
    has no GRU language model to load it into."""
    bad = [n for n, m in model.named_modules() if n and len(list(m.children())) == 0
           and not isinstance(m, (nn.Linear, nn.Embedding, RMSNorm))]
    if bad:
        raise UnsupportedModelError(f"cannot save a GRU with modules {', '.join(bad[:3])} (quantized?): "
                                    "save it unquantized and quantize after loading")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as embed_tokens.weight (safetensors refuses shared)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": MODEL_TYPE, "architectures": ["KuaidaGRU"], **asdict(model.args),
              "torch_dtype": "float32", "kuaida": extra or {}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    return out


def load_gru(model_dir: Path, config: dict[str, Any]) -> GRUModel:
    """Build on the meta device, then adopt the saved tensors (fp32)."""
    args = GRUArgs.from_config(config)
    path = Path(model_dir) / "model.safetensors"
    try:
        # Copies: safetensors' buffers may be unaligned, which changes GEMM rounding (logits 2e-6 off).
        state = {k: v.to(torch.float32, copy=True) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"cannot read {path} ({e}); re-save the GRU with kuaida distill") from e
    with torch.device("meta"):
        model = GRUModel(args)
    if args.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise ModelFormatError(f"{path} does not match its config.json: {e}") from e
    if args.tie_embeddings:  # assign=True made two Parameter objects: make them one again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()
