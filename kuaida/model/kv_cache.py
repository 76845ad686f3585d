"""A preallocated key/value cache the model writes into: one buffer per layer, rows are sequences.

The engine decides which row serves which conversation and how long a prefix stays cached."""
from __future__ import annotations

import torch


class KVCache:
    """k[layer], v[layer]: [B, n_kv_heads, max_seq, head_dim], allocated once.

    Rows are independent sequences; a forward writes each new token's key/value at its position and
    reads back the prefix up to the longest position in the batch (a mask hides the rest per row).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch, self.max_seq = batch, max_seq

    @classmethod
    def for_model(cls, args, batch: int = 1, max_seq: int | None = None,
                  dtype: torch.dtype = torch.float32) -> "KVCache":
        return cls(args.n_layers, batch, args.n_kv_heads, max_seq or args.max_seq_len, args.head_dim, dtype)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: slice | torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([B, H, T, D]) at `positions` ([B, T]) of cache `rows`; return the first `span`
        positions of those rows ([B, H, span, D])."""
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(rows, slice) and positions.shape[0] == 1:
            # One sequence, contiguous positions (prefill or single-stream decode): a plain slice copy.
            start = int(positions[0, 0])  # note: a sync point, cheap on CPU
            t = positions.shape[1]
            kc[rows, :, start:start + t] = k
            vc[rows, :, start:start + t] = v
            return kc[rows, :, :span], vc[rows, :, :span]
        row_idx = torch.arange(kc.shape[0])[rows] if isinstance(rows, slice) else rows
        # Advanced indices around a slice put the indexed dims first: [B, T, H, D].
        kc[row_idx[:, None], :, positions] = k.transpose(1, 2)
        vc[row_idx[:, None], :, positions] = v.transpose(1, 2)
        return kc[row_idx, :, :span], vc[row_idx, :, :span]

    def update_ragged(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, spans: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Decode step of B sequences each at its own position: write k, v ([B, H, 1, D]) at
        `positions` ([B]) of cache `rows` ([B]); return, per row, views of its own prefix
        ([1, H, length, D], no copy) — gathering the rows into one padded batch would copy every
        row's whole history at every layer and step."""
        kc, vc = self.k[layer], self.v[layer]
        kc[rows, :, positions] = k[:, :, 0]
        vc[rows, :, positions] = v[:, :, 0]
        return [(kc[r:r + 1, :, :n], vc[r:r + 1, :, :n]) for r, n in spans]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
