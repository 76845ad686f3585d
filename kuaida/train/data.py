"""Conversations for training: load (chitchat-dataset or an OpenAI-format JSONL), split, tokenize with
the model's chat template, and batch.

    cfg = DataConfig(source="chitchat", max_len=256)
    train = train_examples(tokenizer, cfg)              # Example(input_ids, labels) per conversation
    for batch in batches(train, 8, rank=r, world=w):    # endless; Batch(input_ids [B, T], labels [B, T])
        ...

Labels are -100 everywhere except the assistant's reply tokens and their end-of-turn token: the model
learns to answer, not to predict what the user says or the system prompt. Assistant spans are found by
rendering the conversation prefix by prefix (a template need not mark them) and mapping the character
spans onto tokens through the fast tokenizer's offsets, so a BPE merge across a turn boundary cannot
shift them.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from kuaida.errors import DataError, InvalidArgumentError

log = logging.getLogger(__name__)

IGNORE = -100
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


@dataclass
class DataConfig:
    source: str = "chitchat"  # "chitchat" or a path to a JSONL of {"messages": [...]} (OpenAI format)
    heldout_fraction: float = 0.02  # share of conversations held out for evaluation (fixed by seed)
    seed: int = 0
    max_len: int = 256  # tokens per example; later turns are dropped, whole early turns kept
    max_conversations: int | None = None  # use at most this many training conversations (quick runs)

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise InvalidArgumentError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.max_len < 2:
            raise InvalidArgumentError(f"max_len must be at least 2 tokens, got {self.max_len}")
        if self.max_conversations is not None and self.max_conversations < 1:
            raise InvalidArgumentError(f"max_conversations must be >= 1, got {self.max_conversations}")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE except assistant reply tokens

    @property
    def n_labels(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    labels: torch.Tensor  # [B, T] int64, IGNORE on padding and non-assistant tokens
    lengths: torch.Tensor | None = None  # [B] real (unpadded) tokens per row

    @property
    def num_tokens(self) -> int:
        """Real tokens in the batch (padding excluded)."""
        return int(self.lengths.sum()) if self.lengths is not None else self.input_ids.numel()

    def to(self, device: torch.device | str) -> Batch:
        lengths = None if self.lengths is None else self.lengths.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), lengths)


# -- loading -----------------------------------------------------------------------------------------
def load_conversations(source: str) -> list[Messages]:
    """"chitchat" -> the chitchat-dataset conversations; a path -> the valid lines of an OpenAI-format JSONL.

    Each conversation is a list of {"role", "content"} messages. Returns a new list (callers may mutate)."""
    if source == "chitchat":
        return [list(c) for c in _chitchat()]
    return load_jsonl(source)[0]


@lru_cache(maxsize=1)
def _chitchat() -> tuple[tuple[dict[str, str], ...], ...]:
    """Chitchat conversations as user/assistant turns: the first speaker is the user, the other the
    assistant; a speaker's consecutive messages (and a message's utterances) are joined by newlines.
    Conversations with a single speaker (about 3,150 of 7,168) have no reply to learn and are dropped."""
    try:
        import chitchat_dataset
    except ImportError as e:
        raise DataError("the chitchat dataset is not installed: pip install chitchat-dataset, "
                        "or pass a JSONL file of {\"messages\": [...]}") from e
    raw = json.loads(Path(chitchat_dataset._PATH).read_text())
    convs = []
    for conv in raw.values():
        turns: list[dict[str, str]] = []
        first = None
        for message in conv["messages"]:
            if not message:
                continue
            sender = message[0]["sender"]
            first = first or sender
            role = "user" if sender == first else "assistant"
            text = "\n".join(u["text"].strip() for u in message if u["text"].strip())
            if not text:
                continue
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += "\n" + text
            else:
                turns.append({"role": role, "content": text})
        if any(t["role"] == "assistant" for t in turns):
            convs.append(tuple(turns))
    return tuple(convs)


def load_jsonl(path: str | Path) -> tuple[list[Messages], list[tuple[int, str]]]:
    """Read an OpenAI-format JSONL ({"messages": [{"role": ..., "content": ...}, ...]} per line).

    Returns (conversations, bad) where bad lists (line number, reason) of every skipped line; each is
    also logged. Raises DataError when the file is missing or no line is valid."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"no such data file: {path}; pass 'chitchat' or a JSONL of {{\"messages\": [...]}}")
    convs: list[Messages] = []
    bad: list[tuple[int, str]] = []
    with p.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                convs.append(parse_line(line))
            except ValueError as e:
                bad.append((lineno, str(e)))
                log.warning("%s:%d: skipped: %s", p, lineno, e)
    if not convs:
        raise DataError(f"{path} has no valid conversation ({len(bad)} bad lines); each line must be "
                        '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}')
    if bad:
        log.warning("%s: skipped %d bad lines of %d", p, len(bad), len(bad) + len(convs))
    return convs, bad


def parse_line(line: str) -> Messages:
    """One JSONL line -> messages; ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})") from None
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected {"messages": [...]} with at least one message')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} has no role")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i} ({m['role']}) has empty or non-text content")
        out.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message (nothing to learn)")
    return out


# -- splitting ---------------------------------------------------------------------------------------
def split_conversations(convs: list[Messages], heldout_fraction: float, seed: int
                        ) -> tuple[list[Messages], list[Messages]]:
    """Deterministic split by conversation: the held-out set is the round(n * fraction) conversations
    (at least one when n >= 2) with the smallest seeded content hash. It depends only on the contents,
    not on the order or on the process. Both lists keep the input order."""
    n = len(convs)
    k = round(n * heldout_fraction)
    if heldout_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    keys = sorted(range(n), key=lambda i: _conv_hash(convs[i], seed))
    held = set(keys[:k])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def _conv_hash(conv: Messages, seed: int) -> bytes:
    return hashlib.sha1(f"{seed}\x00{json.dumps(conv, sort_keys=True)}".encode()).digest()


# -- tokenizing --------------------------------------------------------------------------------------
def encode_conversation(tokenizer: Any, messages: Messages, max_len: int) -> Example:
    """Tokenize with the chat template; labels are IGNORE except the assistant replies (incl. their
    end-of-turn token). Keeps the longest run of whole early turns that ends with an assistant reply
    and fits max_len; when even the first reply does not fit, cuts it at max_len."""
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidArgumentError("training needs a fast (Rust) tokenizer: its offsets map turns onto tokens")
    text = _render(tokenizer, messages, generation_prompt=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
    labels = [IGNORE] * len(ids)
    keep = 0  # tokens up to the end of the last assistant turn that fits
    for start, end in _assistant_spans(tokenizer, messages, text):
        lo, hi = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)  # tokens overlapping
        if hi <= lo:
            continue
        if hi > max_len and keep:  # this turn does not fit: stop after the previous one
            break
        labels[lo:min(hi, max_len)] = ids[lo:min(hi, max_len)]  # the first reply may be cut at max_len
        keep = min(hi, max_len)
        if hi > max_len:
            break
    keep = keep or min(len(ids), max_len)
    return Example(ids[:keep], labels[:keep])


def _render(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer: Any, messages: Messages, text: str) -> Iterator[tuple[int, int]]:
    """Character spans [start, end) of each assistant reply in `text` (the whole rendered conversation):
    from the end of the prefix rendered with a generation prompt to the end of the reply's end-of-turn
    token (the template's newline after it is not a target: generation stops at the token)."""
    eot = tokenizer.eos_token or ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        turn = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        turn_end = len(turn)
        if not text.startswith(turn):
            raise InvalidArgumentError("the chat template renders a conversation differently from its "
                                       "prefixes; cannot find the assistant turns to train on")
        cut = text.rfind(eot, start, turn_end) if eot else -1
        yield start, (cut + len(eot) if cut >= 0 else turn_end)


def encode_all(tokenizer: Any, convs: list[Messages], max_len: int) -> list[Example]:
    """Encode conversations, dropping those left with no assistant token (logged)."""
    examples = [encode_conversation(tokenizer, c, max_len) for c in convs]
    kept = [e for e in examples if e.n_labels > 0]
    if len(kept) < len(examples):
        log.info("dropped %d conversations with no assistant token within %d tokens",
                 len(examples) - len(kept), max_len)
    return kept


def train_examples(tokenizer: Any, cfg: DataConfig) -> list[Example]:
    """The training split, encoded (at most cfg.max_conversations conversations)."""
    train, _ = split_conversations(load_conversations(cfg.source), cfg.heldout_fraction, cfg.seed)
    if cfg.max_conversations is not None:
        train = train[:cfg.max_conversations]
    examples = encode_all(tokenizer, train, cfg.max_len)
    if not examples:
        raise DataError(f"no training conversation in {cfg.source!r} has an assistant reply within "
                        f"{cfg.max_len} tokens; raise max_len or add data")
    return examples


def heldout_examples(tokenizer: Any, cfg: DataConfig, n: int | None = None) -> list[Example]:
    """The fixed held-out split, encoded (its first n conversations when n is given). The split ignores
    max_conversations, so quick and full runs are scored on the same conversations."""
    _, held = split_conversations(load_conversations(cfg.source), cfg.heldout_fraction, cfg.seed)
    return encode_all(tokenizer, held[:n] if n is not None else held, cfg.max_len)


# -- batching ----------------------------------------------------------------------------------------
def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-pad to the longest example. The pad id is never attended to by a real token (causal
    attention, padding on the right) and its labels are IGNORE, so its value does not matter."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[b, :len(e.labels)] = torch.tensor(e.labels)
    return Batch(ids, labels, torch.tensor([len(e.input_ids) for e in examples]))


def batches(examples: list[Example], batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
            pad_id: int = 0) -> Iterator[Batch]:
    """Endless batches, reshuffled each epoch (seeded). batch_size is the global batch: every rank
    draws the same global batch and keeps its own batch_size // world rows, so any number of processes
    sees the same data per step as one process."""
    if batch_size < 1 or batch_size % world:
        raise InvalidArgumentError(f"batch size {batch_size} must be a positive multiple of the "
                                   f"number of processes ({world})")
    if not examples:
        raise DataError("no examples to batch")
    if not 0 <= rank < world:
        raise InvalidArgumentError(f"rank {rank} out of range for world size {world}")
    share = batch_size // world
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:  # an epoch's tail joins the next epoch's head: no short batch
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in chosen[rank * share:(rank + 1) * share]], pad_id)
