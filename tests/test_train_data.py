"""Training data: chitchat -> messages, chat-template labels on assistant tokens only, JSONL errors with
line numbers, the seeded split, batching and rank slicing."""
from __future__ import annotations

import copy
import json
import logging
import random
from itertools import islice, pairwise

import pytest
import torch

from kuaida.errors import DataError
from kuaida.train.data import (
    IGNORE,
    DataConfig,
    batches,
    encode_conversation,
    heldout_examples,
    load_conversations,
    load_jsonl,
    split_conversations,
    train_examples,
)

CONV = [
    {"role": "user", "content": "Hello! How are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
# SmolLM2's template: injects a default system prompt when the conversation has none.
SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def labelled_text(tok, example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE])


@pytest.fixture(scope="module")
def system_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = SYSTEM_TEMPLATE
    return tok


def test_chitchat_turns_alternate_starting_with_user():
    convs = load_conversations("chitchat")
    assert len(convs) > 3000
    for conv in convs[:200]:
        roles = [m["role"] for m in conv]
        assert roles[0] == "user" and "assistant" in roles
        assert all(a != b for a, b in pairwise(roles)), "same-speaker messages must be merged"
        assert all(m["content"].strip() for m in conv)
    # the first conversation of the dataset: "Hello" + "How are you doing today?" by the first speaker
    assert convs[0][0] == {"role": "user", "content": "Hello\nHow are you doing today?"}
    assert convs[0][1]["content"].startswith("whats up MD\nim doing good")


@pytest.mark.parametrize("template", ["chatml", "system"])
def test_labels_are_exactly_the_assistant_replies(tiny_tokenizer, system_tokenizer, template):
    tok = tiny_tokenizer if template == "chatml" else system_tokenizer
    ex = encode_conversation(tok, CONV, max_len=256)
    rendered = tok(tok.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ex.input_ids == rendered[:-1]  # up to the last end-of-turn token (the template's "\n" after it goes)
    assert all(lab in (IGNORE, tok_id) for lab, tok_id in zip(ex.labels, ex.input_ids))
    assert labelled_text(tok, ex) == "I am fine, thank you.<|im_end|>The capital of France is Paris.<|im_end|>"
    prompt = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE])
    assert "Hello! How are you today?" in prompt and "assistant\n" in prompt and "Paris" not in prompt


def test_truncation_keeps_whole_early_turns(tiny_tokenizer):
    first_two = encode_conversation(tiny_tokenizer, CONV[:2], max_len=256)
    full = encode_conversation(tiny_tokenizer, CONV, max_len=256)
    cut = encode_conversation(tiny_tokenizer, CONV, max_len=len(full.input_ids) - 1)
    assert cut.input_ids == first_two.input_ids == full.input_ids[:len(cut.input_ids)]
    assert labelled_text(tiny_tokenizer, cut) == "I am fine, thank you.<|im_end|>"
    assert cut.input_ids[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_first_reply_longer_than_max_len_is_cut(tiny_tokenizer):
    whole = encode_conversation(tiny_tokenizer, CONV[:2], max_len=256)
    reply_start = next(i for i, lab in enumerate(whole.labels) if lab != IGNORE)
    ex = encode_conversation(tiny_tokenizer, CONV, max_len=reply_start + 3)
    assert len(ex.input_ids) == reply_start + 3
    assert ex.n_labels == 3


BAD_JSONL = [
    json.dumps({"messages": CONV}),
    "{not json",
    json.dumps({"messages": [{"content": "no role"}, CONV[1]]}),
    json.dumps({"messages": [{"role": "robot", "content": "beep"}, CONV[1]]}),
    json.dumps({"messages": [CONV[0], {"role": "assistant", "content": "  "}]}),
    "",
    json.dumps({"messages": [CONV[0]]}),
    json.dumps({"text": "no messages"}),
    json.dumps({"messages": CONV[:2]}),
]


def test_jsonl_bad_lines_are_reported_with_line_numbers(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(BAD_JSONL) + "\n")
    with caplog.at_level(logging.WARNING, logger="kuaida.train.data"):
        convs, bad = load_jsonl(path)
    assert convs == [CONV, CONV[:2]]
    assert [n for n, _ in bad] == [2, 3, 4, 5, 7, 8]
    reasons = dict(bad)
    assert "invalid JSON" in reasons[2] and "no role" in reasons[3] and "robot" in reasons[4]
    assert "empty" in reasons[5] and "no assistant" in reasons[7]
    assert f"{path}:4: skipped" in caplog.text
    assert load_conversations(str(path)) == convs


def test_jsonl_without_valid_lines_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n[]\n")
    with pytest.raises(DataError, match="no valid conversation"):
        load_jsonl(path)
    with pytest.raises(DataError, match="no such data file"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_split_is_deterministic_and_by_conversation():
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(100)]
    train, held = split_conversations(convs, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90
    assert sorted(map(str, train + held)) == sorted(map(str, convs))
    shuffled = convs[:]
    random.Random(1).shuffle(shuffled)
    _, held2 = split_conversations(shuffled, 0.1, seed=0)
    assert sorted(map(str, held2)) == sorted(map(str, held)), "the split must not depend on the order"
    _, held3 = split_conversations(convs, 0.1, seed=1)
    assert held3 != held
    assert len(split_conversations(convs[:3], 0.02, seed=0)[1]) == 1  # at least one held out


def test_examples_from_config(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    convs = [[{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"fine {i}"}]
             for i in range(20)]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = DataConfig(source=str(path), heldout_fraction=0.1, max_conversations=5)
    train, held = train_examples(tiny_tokenizer, cfg), heldout_examples(tiny_tokenizer, cfg)
    assert len(train) == 5 and len(held) == 2
    assert not {tuple(e.input_ids) for e in train} & {tuple(e.input_ids) for e in held}
    assert [e.input_ids for e in heldout_examples(tiny_tokenizer, cfg, n=1)] == [held[0].input_ids]
    with pytest.raises(Exception, match="heldout_fraction"):
        DataConfig(heldout_fraction=1.5)


def test_batches_pad_right_and_slice_by_rank(tiny_tokenizer):
    convs = [[{"role": "user", "content": "hi " * (i + 1)}, {"role": "assistant", "content": "yo " * (i + 1)}]
             for i in range(6)]
    examples = [encode_conversation(tiny_tokenizer, c, 256) for c in convs]
    one = list(islice(batches(examples, 4, seed=3), 6))
    b = one[0]
    assert b.input_ids.shape == b.labels.shape and b.input_ids.shape[0] == 4
    for row, n in enumerate(b.lengths.tolist()):
        assert (b.input_ids[row, n:] == 0).all() and (b.labels[row, n:] == IGNORE).all()
        assert b.input_ids[row, :n].tolist() in [e.input_ids for e in examples]
    assert b.num_tokens == sum(b.lengths.tolist())
    # 6 batches of 4 = 4 epochs of 6: every epoch uses every example once
    seen = [tuple(r[:n].tolist()) for x in one for r, n in zip(x.input_ids, x.lengths)]
    for epoch in range(4):
        assert sorted(seen[6 * epoch:6 * epoch + 6]) == sorted(tuple(e.input_ids) for e in examples)
    # two ranks: each gets half of the same global batch
    r0 = list(islice(batches(examples, 4, seed=3, rank=0, world=2), 6))
    r1 = list(islice(batches(examples, 4, seed=3, rank=1, world=2), 6))
    for g, a, c in zip(one, r0, r1):
        assert a.input_ids.shape[0] == c.input_ids.shape[0] == 2
        rows = [r[:n].tolist() for x in (a, c) for r, n in zip(x.input_ids, x.lengths)]
        assert rows == [r[:n].tolist() for r, n in zip(g.input_ids, g.lengths)]
    with pytest.raises(Exception, match="multiple"):
        next(batches(examples, 3, world=2))
    assert torch.equal(next(batches(examples, 4, seed=3)).input_ids, one[0].input_ids)
