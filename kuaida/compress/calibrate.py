"""Calibration for structured pruning: dialogue token sequences, what the model does on them, and which
tokens the data uses.

    calib = calibration_batches(tokenizer, n_samples=64, seq_len=256)  # list of [1, T] LongTensors
    dist = layer_distances(model, calib)      # [L+1, L+1] mean angular distance between hidden states
    imp = width_importance(model, calib)      # MLP channels [L, I], attention heads [L, H]
    keep = vocab_from_corpus(tokenizer, texts) # output token ids the data uses (+ the required ones)

Hidden state i is the input of block i (i = 0: the embeddings; i = L: the last block's output, before the
final norm). Statistics are averaged over every token of every sequence.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track

from kuaida.errors import InvalidArgumentError

if TYPE_CHECKING:
    from kuaida.train.data import DataConfig

log = logging.getLogger(__name__)


def calibration_batches(tokenizer, n_samples: int = 64, seq_len: int = 256, seed: int = 0,
                        data: DataConfig | None = None) -> list[torch.Tensor]:
    """`n_samples` conversations from the training split of `data` (a kuaida.train.data.DataConfig;
    default: chitchat, the same held-out split every evaluation uses, so calibration never sees it),
    rendered through the chat template and cut at `seq_len` tokens -> list of [1, T] LongTensors.

    One conversation per tensor, unpadded: no attention across conversations, no padding statistics."""
    from kuaida.train.data import DataConfig, encode_conversation, load_conversations, split_conversations

    if n_samples <= 0 or seq_len <= 1:
        raise InvalidArgumentError(f"calibration needs n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    cfg = data or DataConfig()
    train, _ = split_conversations(load_conversations(cfg.source), cfg.heldout_fraction, cfg.seed)
    picked = random.Random(seed).sample(train, min(n_samples, len(train)))
    batches = [torch.tensor([encode_conversation(tokenizer, conv, seq_len).input_ids]) for conv in picked]
    batches = [b for b in batches if b.shape[1] > 1]
    if not batches:
        raise InvalidArgumentError(f"no calibration conversations in {cfg.source!r}: pass a source with dialogues")
    log.info("calibration: %d conversations, %d tokens", len(batches), sum(b.numel() for b in batches))
    return batches


def _iterate(calib: Iterable[torch.Tensor], what: str, progress: bool) -> Iterator[torch.Tensor]:
    calib = list(calib)
    if not calib:
        raise InvalidArgumentError("calibration data is empty: pass at least one token sequence")
    return iter(track(calib, description=f"calibrating ({what})", transient=True,
                      console=Console(stderr=True), disable=not progress))


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def layer_distances(model, calib: Iterable[torch.Tensor], progress: bool = False) -> torch.Tensor:
    """-> D [L+1, L+1]: D[i, j] = mean over tokens of arccos(cos(h_i, h_j)) / pi, the angular distance
    (Gromov et al. 2024) between hidden states i and j. D[i, i+1] is how much block i changes its input;
    D[l, l+n] how much the window of blocks l..l+n-1 does."""
    n = model.args.n_layers
    states: list[torch.Tensor] = []
    handles = [model.layers[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
    handles += [layer.register_forward_hook(lambda m, args, out: states.append(out)) for layer in model.layers]
    total, n_tokens = torch.zeros(n + 1, n + 1, dtype=torch.float64), 0
    with _hooks(handles):
        for tokens in _iterate(calib, "layer distances", progress):
            states.clear()
            model(tokens, last_only=True)  # the output layer on one row only: it is not measured
            h = F.normalize(torch.stack(states).flatten(1, 2).float(), dim=-1)  # [L+1, B*T, dim]
            cos = torch.einsum("ind,jnd->ijn", h, h).clamp(-1.0, 1.0)  # [L+1, L+1, B*T]
            total += (torch.arccos(cos) / math.pi).sum(-1).double()
            n_tokens += h.shape[1]
    return (total / n_tokens).float()


def layer_importance(model, calib: Iterable[torch.Tensor], progress: bool = False) -> list[float]:
    """Per block: the angular distance between its input and output hidden states (the block-influence
    measure of ShortGPT, Men et al. 2024, in Gromov's angular form). Low = the block barely changes the
    residual stream = cheap to drop."""
    return layer_distances(model, calib, progress).diagonal(1).tolist()


@dataclass
class WidthImportance:
    """Activation importance (Minitron, Muralidharan et al. 2024), mean over calibration tokens."""

    channels: torch.Tensor  # [L, intermediate_size]: mean |silu(gate) * up| per MLP channel
    heads: torch.Tensor  # [L, n_heads]: mean L2 norm of each head's attention output, before o_proj

    def groups(self, n_kv_heads: int) -> torch.Tensor:
        """[L, n_kv_heads]: a KV group's importance = the sum over the query heads that share its KV head."""
        return self.heads.view(self.heads.shape[0], n_kv_heads, -1).sum(-1)


@torch.inference_mode()
def width_importance(model, calib: Iterable[torch.Tensor], progress: bool = False) -> WidthImportance:
    """Run the calibration data and measure every MLP channel and attention head of every layer."""
    a = model.args
    channels = torch.zeros(a.n_layers, a.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(a.n_layers, a.n_heads, dtype=torch.float64)

    def mlp_hook(i: int):
        def hook(module, args):  # args[0]: silu(gate) * up, [B, T, I]
            channels[i] += args[0].abs().flatten(0, -2).sum(0).double()
        return hook

    def attn_hook(i: int):
        def hook(module, args):  # args[0]: the heads' outputs side by side, [B, T, H * D]
            y = args[0].unflatten(-1, (a.n_heads, a.head_dim))  # [B, T, H, D]
            heads[i] += y.norm(dim=-1).flatten(0, -2).sum(0).double()
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)) for i, layer in enumerate(model.layers)]
    handles += [layer.self_attn.o_proj.register_forward_pre_hook(attn_hook(i))
                for i, layer in enumerate(model.layers)]
    n_tokens = 0
    with _hooks(handles):
        for tokens in _iterate(calib, "channels and heads", progress):
            model(tokens, last_only=True)
            n_tokens += tokens.numel()
    return WidthImportance(channels=(channels / n_tokens).float(), heads=(heads / n_tokens).float())


# -- output vocabulary: which tokens the data uses --------------------------------------------------------
def required_ids(tokenizer, byte_tokens: bool = True) -> set[int]:
    """Ids a pruned output vocabulary must keep whatever the corpus: special and added tokens (eos, the
    chat template's markers), the tokens the chat template itself writes, and - with byte_tokens - the 256
    single-byte tokens of a byte-level vocabulary, so any text stays expressible (spelt byte by byte if
    need be) for 256 of ~49k rows."""
    from kuaida.dialogue.template import end_of_turn_ids

    ids = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder) | end_of_turn_ids(tokenizer, None)
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a"}]
        ids |= set(tokenizer.encode(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False))
    if byte_tokens:
        ids |= byte_token_ids(tokenizer)
    return {int(i) for i in ids if i is not None}


def byte_token_ids(tokenizer) -> set[int]:
    """The single-byte tokens: byte-level BPE symbols (GPT-2, SmolLM, Llama 3, Qwen) or SentencePiece byte
    fallback (<0x00>..<0xFF>), whichever the vocabulary has. A vocabulary may lack a few: SmolLM2's has 235
    of 256 (no token for bytes UTF-8 never uses, 0xC0, 0xC1, 0xF5-0xFF, nor for some control and rare
    4-byte-lead bytes), so the unpruned model cannot produce those either. Empty (logged) when neither."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = tokenizer.get_vocab()
    schemes = [{vocab[s] for s in symbols if s in vocab}
               for symbols in (ByteLevel.alphabet(), [f"<0x{b:02X}>" for b in range(256)])]
    ids = max(schemes, key=len)
    if len(ids) < 128:  # not a byte-level vocabulary
        log.warning("the tokenizer has no single-byte tokens: text made of pruned tokens cannot be produced")
        return set()
    return ids


def vocab_from_corpus(tokenizer, corpus: Iterable[str | Sequence[int]], min_count: int = 1,
                      byte_tokens: bool = True) -> list[int]:
    """Sorted ids of the tokens seen at least `min_count` times in `corpus` (texts, or token-id lists;
    negative ids such as -100 labels are skipped), plus `required_ids(tokenizer, byte_tokens)`."""
    if min_count < 1:
        raise InvalidArgumentError(f"min_count must be >= 1, got {min_count}")
    items = list(corpus)
    sequences = [item for item in items if not isinstance(item, str)]
    if texts := [item for item in items if isinstance(item, str)]:
        sequences += tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batched (parallel) call
    flat = torch.cat([torch.as_tensor(ids, dtype=torch.long).flatten() for ids in sequences] or [torch.zeros(0)])
    counts = torch.bincount(flat[flat >= 0].long())  # [max id + 1]
    seen = set((counts >= min_count).nonzero().flatten().tolist())
    keep = sorted(seen | required_ids(tokenizer, byte_tokens))
    log.info("vocabulary: %d tokens seen >= %d times, %d kept with the required ones", len(seen), min_count,
             len(keep))
    return keep


def vocab_coverage(keep_ids: Iterable[int], token_ids: Iterable[int | Sequence[int]]) -> float:
    """Fraction of the tokens in `token_ids` (flat, or a list of sequences; negative ids skipped) that the
    pruned vocabulary keeps."""
    keep = {int(i) for i in keep_ids}
    flat = [int(t) for item in token_ids for t in (item if isinstance(item, (list, tuple)) else [item])]
    flat = [t for t in flat if t >= 0]
    if not flat:
        raise InvalidArgumentError("vocab_coverage needs at least one token id")
    return sum(t in keep for t in flat) / len(flat)
