"""Prompt assembly with the checkpoint's own chat template, and where a turn ends."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Callable

from jinja2 import TemplateError

from kuaida.dialogue.grounding import PASSAGE, PASSAGE_START
from kuaida.errors import InvalidArgumentError

ROLES = ("system", "user", "assistant")
# End-of-turn markers of common chat templates: generation stops at whichever the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check an OpenAI-style message list a user passed; -> a clean copy."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {'role', 'content'} dicts")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidArgumentError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InvalidArgumentError(f"messages[{i}].role is {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InvalidArgumentError(f"messages[{i}].content must be a string")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


# Placeholders for message contents (Unicode private-use characters, which templates pass through).
_MARK = re.compile("\ue000(\\d+)\ue001")


def render_prompt(tokenizer, messages: list[dict[str, str]],
                  spans: list[tuple[int, int]] | None = None) -> list[int]:
    """Messages -> prompt token ids through the checkpoint's chat template, ready for the reply.

    Text a user typed never becomes a control token: a content that spells one (`<|im_end|>` ...) is
    tokenized as plain text, so it cannot close its turn and open a system turn (prompt injection).

    Knowledge-base passages (wrapped in grounding.PASSAGE_START/END) are tokenized each on its own, so a
    passage has the same tokens wherever it lands; with `spans` (a list) given, their [start, end) token
    positions in the prompt are appended to it, in order.
    """
    msgs = validate_messages(messages)
    specials = _special_strings(tokenizer)
    if not any(PASSAGE_START in m["content"] or any(s in m["content"] for s in specials) for m in msgs):
        return tokenizer.encode(_apply_template(tokenizer, msgs), add_special_tokens=False)
    # Render with placeholders, then tokenize the template's text and each content separately.
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(msgs)]
    text = _apply_template(tokenizer, marked)
    ids: list[int] = []
    for j, part in enumerate(_MARK.split(text)):  # even parts: template text; odd: message index
        if j % 2 == 0:
            ids += _encode(tokenizer, part, False) if part else ()
            continue
        for k, piece in enumerate(PASSAGE.split(msgs[int(part)]["content"])):  # odd pieces: passages
            if not piece:
                continue
            start = len(ids)
            ids += _encode(tokenizer, piece, True)
            if k % 2 == 1 and spans is not None:
                spans.append((start, len(ids)))
    return ids


@functools.lru_cache(maxsize=4096)
def _encode(tokenizer, text: str, split_special: bool) -> tuple[int, ...]:
    """Token ids of one piece, memoized: a conversation's turns and passages recur in every later prompt
    (a grounded turn-3 prompt, ~1,200 tokens in ~20 pieces, tokenized in 3.3 ms, most of it again)."""
    return tuple(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split_special))


def typed_prompt_ids(render: Callable[[list[dict[str, str]]], list[int]],
                     messages: list[dict[str, str]]) -> list[int]:
    """The prompt of a message still being typed, as far as it is known: what `render` (render_prompt
    with a tokenizer) will give for the conversation once the last message, the user's, is sent — up to
    the end of its last whole word (the word being typed may yet change, and with it its tokens), and
    however it goes on. What the server writes ahead while the user types (Scheduler.type_ahead).

    The prompt is rendered with the typed text followed by two different words, and the tokens both
    renders share are kept: the template's and tokenizer's business, so any checkpoint's works."""
    msgs = validate_messages(messages)
    if msgs[-1]["role"] != "user":
        raise InvalidArgumentError("the last message must be the user's (the one being typed)")
    head = re.sub(r"\S*\Z", "", msgs[-1]["content"]).rstrip()  # without the word being typed
    a, b = (render([*msgs[:-1], {"role": "user", "content": head + (" " if head else "") + w}])
            for w in ("a", "b"))
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def passage_anchor_ids(tokenizer) -> list[int]:
    """What a knowledge-base passage is encoded after when it is encoded on its own
    (kuaida.engine.passages): the tokens before the first passage of a conversation that opens with a
    turn's passages (the template's opening, the system message header, the instruction)."""
    from kuaida.dialogue.grounding import passages_message

    spans: list[tuple[int, int]] = []
    ids = render_prompt(tokenizer, [passages_message(["x"]), {"role": "user", "content": "x"}], spans)
    return ids[:spans[0][0]]


def next_turn_ids(tokenizer, grounded: bool = False) -> list[int]:
    """The tokens the chat template writes between an assistant reply and the next user message's text
    (ChatML: `<|im_end|>\\n<|im_start|>user\\n`), what the server writes into a finished conversation's
    cache ahead of its next turn (kuaida.engine.scheduler); [] when the template has no such fixed
    stretch. `grounded`: up to the first passage of a next turn that brings knowledge-base passages (the
    template's tokens, the passages message's header and the instruction: kuaida.dialogue.grounding), as
    render_prompt tokenizes a prompt holding passages ([] when the template merges that message away)."""
    from kuaida.dialogue.grounding import PASSAGE, passages_message

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    msgs += [passages_message(["x"])] if grounded else []
    msgs += [{"role": "user", "content": "c"}]
    try:
        text = _apply_template(tokenizer, [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(msgs)])
    except TemplateError:
        return []
    parts = _MARK.split(text)  # even: the template's text; odd: a message index
    if parts[3:6:2] != ["1", "2"]:  # the reply's content, then the next message's (not dropped or merged)
        return []
    ids = list(_encode(tokenizer, parts[4], False)) if parts[4] else []
    return ids + list(_encode(tokenizer, PASSAGE.split(msgs[2]["content"])[0], True)) if grounded else ids


def _apply_template(tokenizer, msgs: list[dict[str, str]]) -> str:
    """The template's text; a template that refuses a system message after the first message (some
    insist on one leading system prompt) gets each such message put at the start of the next user
    message instead (a knowledge-base turn's passages)."""
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        if not any(m["role"] == "system" for m in msgs[1:]):
            raise
    merged: list[dict[str, str]] = []
    carry = ""
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i > 0:
            carry += m["content"] + "\n\n"
        elif carry and m["role"] == "user":
            merged.append({**m, "content": carry + m["content"]})
            carry = ""
        else:
            merged.append(m)
    return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


def _special_strings(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def end_of_turn_ids(tokenizer, model_dir: Path | None) -> set[int]:
    """Token ids that end the assistant's turn: the tokenizer's eos, the generation config's, and the
    chat template's end-of-turn marker."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if model_dir is not None and (model_dir / "generation_config.json").exists():
        eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids
