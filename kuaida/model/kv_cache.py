"""A preallocated key/value cache the model writes into: one buffer per layer, rows are sequences.

The engine decides which row serves which conversation and how long a prefix stays cached."""
from __future__ import annotations

import contextlib

import torch

from kuaida import kernels
from kuaida.model.memory import huge_zeros


class KVCache:
    """k[layer], v[layer]: [B, n_kv_heads, max_seq, head_dim], allocated once.

    fp16 storage halves the bytes a decode step streams (attention reads every cached key and value) and
    the memory a conversation holds; a prefill of one sequence reads its prefix in place with a kernel
    (`prefill`), other prefills read it back in the activations' dtype.

    Rows are independent sequences; a forward writes each new token's key/value at its position and
    reads back the prefix up to the longest position in the batch (a mask hides the rest per row).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_heads, max_seq, head_dim)

        def zeros() -> torch.Tensor:  # on CPUs, huge pages where available: decode streams these
            return huge_zeros(shape, dtype) if torch.device(device).type == "cpu" else torch.zeros(
                shape, dtype=dtype, device=device)

        self.k = [zeros() for _ in range(n_layers)]
        self.v = [zeros() for _ in range(n_layers)]
        self.batch, self.max_seq = batch, max_seq
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextlib.contextmanager
    def sharing(self, srcs: torch.Tensor, shared: torch.Tensor):
        """Within this block, decode steps whose batch has len(srcs) entries read entry b's first
        shared[b] positions from row srcs[b] (int64 [B] each), which the caller guarantees to hold the same
        keys and values as the entry's own row there: one read of a prefix that several rows copied."""
        before, self._shared = self._shared, (srcs, shared)
        try:
            yield
        finally:
            self._shared = before

    @classmethod
    def for_model(cls, args, batch: int = 1, max_seq: int | None = None,
                  dtype: torch.dtype = torch.float32) -> "KVCache":
        return cls(args.n_layers, batch, args.n_kv_heads, max_seq or args.max_seq_len, args.head_dim, dtype)

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rows: slice | torch.Tensor) -> None:
        """Write k, v ([B, H, T, D]) at `positions` ([B, T]) of cache `rows`."""
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(rows, slice) and positions.shape[0] == 1:
            start = int(positions[0, 0])  # note: a sync point, cheap on CPU
            t = positions.shape[1]
            if int(positions[0, -1]) - start == t - 1:
                # One sequence, contiguous positions (prefill or single-stream decode): a plain slice copy.
                kc[rows, :, start:start + t] = k
                vc[rows, :, start:start + t] = v
                return
            # Increasing positions with gaps (a prompt around passages written from a passage cache).
            if kernels.write_kv_fp16(kc, vc, range(kc.shape[0])[rows][0], positions[0], k[0], v[0]):
                return
        row_idx = torch.arange(kc.shape[0])[rows] if isinstance(rows, slice) else rows
        # Advanced indices around a slice put the indexed dims first: [B, T, H, D].
        kc[row_idx[:, None], :, positions] = k.transpose(1, 2).to(kc.dtype)
        vc[row_idx[:, None], :, positions] = v.transpose(1, 2).to(vc.dtype)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: slice | torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([B, H, T, D]) at `positions` ([B, T]) of cache `rows`; return the first `span`
        positions of those rows ([B, H, span, D]) in k's dtype (a copy, for an fp16 cache)."""
        self.write(layer, positions, k, v, rows)
        return self.k[layer][rows, :, :span].to(k.dtype), self.v[layer][rows, :, :span].to(v.dtype)

    def prefills_in_place(self) -> bool:
        """True when `prefill` (one sequence) reads this cache in place with a prefill-attention kernel
        (kernels.prefill_kernel: an fp16 cache, AVX-512 BF16 or AVX2 kernels). Otherwise prefills go
        through `update` and SDPA."""
        return kernels.prefill_kernel(self.k[0].dtype, self.k[0].shape[-1]) is not None

    def prefill(self, layer: int, row: int, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """Prefill of one sequence: write k, v ([1, Hkv, T, D]) at `positions` ([1, T], increasing, gaps
        allowed) of cache row `row`, then attend q ([1, H, T, D]) over the row's prefix read in place
        (no fp32 copy of it) -> [1, H, T, D]."""
        self.write(layer, positions, k, v, slice(row, row + 1))
        return kernels.prefill_attention(q[0], self.k[layer], self.v[layer], row, positions[0])[None]

    def decode(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, q: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Decode step of B sequences, each at its own position: write k, v ([B, Hkv, 1, D]) at
        `positions` ([B]) of cache `rows` ([B]), then attend q ([B, H, 1, D]) over each row's own prefix
        -> [B, H, 1, D]. One kernel call for the batch, reading each history in place (gathering the rows
        into a padded batch would copy every history at every layer and step)."""
        kc, vc = self.k[layer], self.v[layer]
        if not kernels.write_kv_rows_fp16(kc, vc, rows, positions, k, v):
            kc[rows, :, positions] = k[:, :, 0].to(kc.dtype)
            vc[rows, :, positions] = v[:, :, 0].to(vc.dtype)
        srcs, shared = self._shared if self._shared and len(self._shared[0]) == len(rows) else (None, None)
        return kernels.decode_attention(q[:, :, 0], kc, vc, rows, positions + 1, srcs, shared)[:, :, None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
