"""A Llama-family decoder in plain PyTorch (Llama, Qwen2, Mistral, SmolLM).

The model knows nothing of sampling, quantization or serving: quantization swaps its nn.Linear modules
for others (kuaida.compress.quantize), the engine drives it through `forward`.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from kuaida.model.args import ModelArgs
from kuaida.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers' LlamaRMSNorm so fp32 results match bit for bit.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with linear or llama3 scaling when the config asks."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(mid, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.split = (q_out, kv_out, kv_out)
        # q, k and v projections fused in one matmul: one weight read, one kernel call per layer.
        self.qkv_proj = nn.Linear(args.dim, q_out + 2 * kv_out, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_out, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """attend(q [B, H, T, D], k, v [B, Hkv, T, D]) -> [B, H, T, D]: attention over these tokens and
        whatever the KV cache holds for them (see Transformer.forward)."""
        B, T, _ = x.shape  # batch, new tokens, model width
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin  # cos, sin: [B, 1, T, D]
        k = k * cos + rotate_half(k) * sin
        y = attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (no mask, T > 1) or masked attention, GQA when k/v have fewer heads than q."""
    T = q.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                          enable_gqa=q.shape[1] != k.shape[1])


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # gate and up projections fused: [gate; up] rows, one matmul.
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, attend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Module names follow Hugging Face's (`layers.0.self_attn.o_proj`, without the `model.` prefix),
    except the fused `qkv_proj` (q, k, v stacked by rows) and `gate_up_proj` (gate, up)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.output_size, bias=False)
        if args.tie_embeddings and args.output_ids is None:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        # A pruned output vocabulary scores only these ids; forward scatters them into the full vocabulary.
        self.register_buffer("output_ids", None if args.output_ids is None else torch.tensor(args.output_ids),
                             persistent=False)

    def new_cache(self, batch: int = 1, max_seq: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache sized for this model: `batch` rows of up to `max_seq` tokens each, stored as `dtype`
        (default: `self.kv_dtype`, which a compression transform may set, else the embedding's dtype)."""
        a = self.args
        dtype = dtype or getattr(self, "kv_dtype", None) or self.embed_tokens.weight.dtype
        return KVCache(a.n_layers, batch, a.n_kv_heads, min(max_seq or a.max_seq_len, a.max_seq_len),
                       a.head_dim, dtype=dtype)

    def _attention(self, cache, positions: torch.Tensor, rows: slice | torch.Tensor):
        """attend(layer, q, k, v) for this forward: how every layer's new tokens meet the KV cache."""
        if cache is None:
            return lambda layer, q, k, v: sdpa(q, k, v)
        B, T = positions.shape
        if T == 1:  # decode: each row attends to its own cached prefix, whatever its length
            row_ids = torch.arange(cache.batch)[rows] if isinstance(rows, slice) else rows
            return lambda layer, q, k, v: cache.decode(layer, row_ids, positions[:, 0], q, k, v)
        # Prefill: write the new keys/values, then attend over the prefix up to the longest row's position.
        if B == 1 and not isinstance(rows, slice):
            rows = slice(int(rows[0]), int(rows[0]) + 1)  # one row: the cache's view-only fast path
        if B == 1 and cache.prefills_in_place():  # fp16 cache: a kernel reads it in place
            row = range(cache.batch)[rows][0]
            return lambda layer, q, k, v: cache.prefill(layer, row, positions, q, k, v)
        span = int(positions.max()) + 1
        mask = torch.arange(span)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
        return lambda layer, q, k, v: sdpa(q, *cache.update(layer, positions, k, v, rows, span), mask)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, D]

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                      rows: slice | torch.Tensor = slice(0, 1)) -> torch.Tensor:
        """tokens, positions: [B, T] -> the final norm's output [B, T, dim], what lm_head reads (a
        distillation teacher projects only the rows and vocabulary columns its loss uses)."""
        return self.norm(self._blocks(tokens, positions, cache, rows))

    def _blocks(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache,
                rows: slice | torch.Tensor) -> torch.Tensor:
        """The embedding and every block: [B, T] -> [B, T, dim], before the final norm."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        cos, sin = self.rope(positions)
        attend = self._attention(cache, positions, rows)
        x = self.embed_tokens(tokens)  # [B, T, dim]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, functools.partial(attend, i))
        return x

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                rows: slice | torch.Tensor = slice(0, 1), last_only: bool = False,
                full_vocab: bool = True) -> torch.Tensor:
        """tokens, positions: [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only).

        With a pruned output vocabulary (args.output_ids), pruned tokens get -inf logits; full_vocab=False
        returns the kept columns only, [B, T, len(output_ids)] (training, where -inf would poison losses).

        With a KVCache, each row b writes its new keys at positions[b] into cache row rows[b] and
        attends to everything up to that position; without one, plain causal attention over `tokens`.
        """
        x = self._blocks(tokens, positions, cache, rows)
        if last_only:
            x = x[:, -1:]
        # The norm makes the slice contiguous: a strided view into lm_head sends a bf16 or fp32 matmul down
        # a batched path that copies the whole [vocab, dim] weight (measured: +34 ms per bf16 prefill).
        logits = self.lm_head(self.norm(x)).float()
        if self.output_ids is None or not full_vocab:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.args.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.output_ids, logits)
