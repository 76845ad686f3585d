"""Continuous batching on a tiny model: batched replies equal single-stream ones, prefixes are reused,
the queue is bounded, a cancelled request frees its slot."""
import asyncio
import threading
import time

import pytest

from kuaida.engine.generate import Engine
from kuaida.engine.sampling import SamplingParams
from kuaida.engine.scheduler import Scheduler
from kuaida.errors import BusyError, ContextLengthError
from kuaida.model.loader import load_model

GREEDY = dict(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def make(loaded, **kw):
    kw = {"max_batch": 4, "max_context": 128, "cache_budget_mb": 1, **kw}
    return Scheduler(loaded.model, loaded.tokenizer, {loaded.tokenizer.eos_token_id}, **kw).start()


def single(loaded, prompt, **params):
    engine = Engine(loaded.model, {loaded.tokenizer.eos_token_id}, max_context=128)
    return "".join(engine.stream(prompt, SamplingParams(**params), loaded.tokenizer))


PROMPTS = [[5, 6, 7, 8], [40, 41], [100, 101, 102, 103, 104, 105, 106], [9, 9, 9], [77, 12, 55, 3, 200]]


def test_concurrent_requests_match_single_stream(loaded):
    sched = make(loaded)
    streams = [sched.submit(p, SamplingParams(**GREEDY)) for p in PROMPTS]
    results = ["".join(s) for s in streams]
    sched.stop()
    assert results == [single(loaded, p, **GREEDY) for p in PROMPTS]
    assert sched.metrics.decode_steps < sum(s.stats.completion_tokens for s in streams)  # really batched


def test_follow_up_reuses_its_conversation_slot(loaded):
    sched = make(loaded)
    first = sched.submit([5, 6, 7, 8, 9, 10], SamplingParams(**GREEDY))
    list(first)
    other = sched.submit([90, 91, 92], SamplingParams(**GREEDY))
    list(other)
    follow = sched.submit([5, 6, 7, 8, 9, 10, 11, 12, 13], SamplingParams(**GREEDY))
    text = "".join(follow)
    sched.stop()
    assert follow.stats.cached_tokens == 6
    assert sched.metrics.cache_hits == 1
    assert text == single(loaded, [5, 6, 7, 8, 9, 10, 11, 12, 13], **GREEDY)


def test_lru_slot_is_evicted_when_all_hold_conversations(loaded):
    sched = make(loaded, cache_budget_mb=0, max_batch=1)  # budget below one slot: exactly one slot
    assert len(sched.slots) == 1
    for prompt in ([1, 2, 3], [4, 5, 6]):
        list(sched.submit(prompt, SamplingParams(**GREEDY)))
    sched.stop()
    assert sched.metrics.evictions == 1


def test_queue_is_bounded(loaded):
    sched = Scheduler(loaded.model, loaded.tokenizer, set(), max_batch=1, max_context=128, max_queue=2)
    # not started: nothing drains the queue
    sched.submit([1, 2], SamplingParams(**GREEDY))
    sched.submit([1, 2], SamplingParams(**GREEDY))
    with pytest.raises(BusyError):
        sched.submit([1, 2], SamplingParams(**GREEDY))


def test_too_long_prompt_is_refused_at_submit(loaded):
    sched = make(loaded)
    with pytest.raises(ContextLengthError):
        sched.submit(list(range(128)), SamplingParams(**GREEDY))
    sched.stop()


def test_cancel_frees_the_slot(loaded):
    sched = make(loaded, max_batch=1)
    stream = sched.submit([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=100))
    stream.cancel()
    list(stream)
    assert stream.stats.finish_reason == "cancelled" or stream.stats.completion_tokens < 100
    after = sched.submit([4, 5], SamplingParams(**GREEDY))
    assert "".join(after) == single(loaded, [4, 5], **GREEDY)
    sched.stop()


def test_async_consumer(loaded):
    sched = make(loaded)

    async def go():
        loop = asyncio.get_running_loop()
        streams = [sched.submit(p, SamplingParams(**GREEDY), loop=loop) for p in PROMPTS[:3]]
        texts = []
        for s in streams:
            texts.append("".join([piece async for piece in s]))
        return texts

    got = asyncio.run(go())
    sched.stop()
    assert got == [single(loaded, p, **GREEDY) for p in PROMPTS[:3]]


def test_stop_cancels_waiting_requests(loaded):
    sched = Scheduler(loaded.model, loaded.tokenizer, set(), max_batch=1, max_context=128)
    stream = sched.submit([1, 2], SamplingParams(**GREEDY))
    sched.start()
    sched.stop(timeout=0)
    done = threading.Event()
    threading.Thread(target=lambda: (list(stream), done.set()), daemon=True).start()
    assert done.wait(10)
    with pytest.raises(BusyError):
        sched.submit([1, 2], SamplingParams(**GREEDY))


def test_one_failing_request_does_not_end_the_others(loaded, monkeypatch):
    from kuaida.engine import sequence

    real = sequence.Sequence.next_token

    def flaky(self, logits):  # the request with prompt [66, 66] fails on its second token
        if self.prompt_ids == [66, 66] and self.tokens:
            raise RuntimeError("boom")
        return real(self, logits)

    monkeypatch.setattr(sequence.Sequence, "next_token", flaky)
    sched = make(loaded)
    bad = sched.submit([66, 66], SamplingParams(**GREEDY))
    good = sched.submit(PROMPTS[0], SamplingParams(**GREEDY))
    with pytest.raises(Exception, match="generation failed: boom"):
        list(bad)
    assert "".join(good) == single(loaded, PROMPTS[0], **GREEDY)
    sched.stop()


def test_a_conversation_sharing_only_the_system_prompt_copies_it_instead_of_evicting(loaded):
    """Two conversations with the same opening: the second gets the shared prefix copied into a free slot
    (its reply is the same as computed from scratch) and the first keeps its whole cache."""
    sched = make(loaded)  # several slots
    system = [5, 6, 7, 8, 9, 10, 11, 12]
    a = sched.submit(system + [20, 21], SamplingParams(**GREEDY))
    list(a)
    b = sched.submit(system + [30, 31, 32], SamplingParams(**GREEDY))
    b_text = "".join(b)
    a2 = sched.submit(system + [20, 21] + [40], SamplingParams(**GREEDY))
    list(a2)
    sched.stop()
    assert b.stats.cached_tokens == len(system) and sched.metrics.evictions == 0
    assert b_text == single(loaded, system + [30, 31, 32], **GREEDY)
    assert a2.stats.cached_tokens == len(system) + 2  # conversation a was not overwritten by b


def test_conversations_sharing_a_system_prompt_read_it_once_with_the_same_replies(loaded, monkeypatch):
    """Four conversations that start together with one system prompt: the later ones copy it from the first
    (busy) slot instead of prefilling it, decode steps read it from one row for all of them, and every
    reply is the one single-stream decoding gives."""
    from kuaida import kernels

    seen = []
    plain = kernels.decode_attention

    def spy(q, k, v, rows, lens, srcs=None, shared=None):
        if shared is not None:
            seen.append((srcs.tolist(), shared.tolist(), rows.tolist()))
        return plain(q, k, v, rows, lens, srcs, shared)

    monkeypatch.setattr(kernels, "decode_attention", spy)
    system = list(range(30, 70))
    prompts = [system + tail for tail in ([5, 6], [7], [8, 9, 10], [11, 12])]
    sched = Scheduler(loaded.model, loaded.tokenizer, {loaded.tokenizer.eos_token_id}, max_batch=4,
                      max_context=128, cache_budget_mb=1)
    streams = [sched.submit(p, SamplingParams(**GREEDY)) for p in prompts]  # all queued before the first step
    sched.start()
    results = ["".join(s) for s in streams]
    sched.stop()
    assert [s.stats.cached_tokens for s in streams] == [0] + [len(system)] * 3
    assert any(len(set(rows)) == 4 and len(set(srcs)) == 1 and min(shared) == len(system)
               for srcs, shared, rows in seen)
    assert results == [single(loaded, p, **GREEDY) for p in prompts]


def test_a_slot_reused_below_its_shared_prefix_stops_sharing_it():
    from kuaida.engine.scheduler import Slot

    slot = Slot(row=0, cached_ids=list(range(10)), prefix=(7, 8))
    slot.keep(9)
    assert slot.prefix == (7, 8)
    slot.keep(5)
    assert slot.prefix == (7, 5) and slot.cached_ids == list(range(5))
    slot.keep(0)
    assert slot.prefix is None and slot.cached_ids == []


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


NEXT_TURN = [3, 4]  # stands in for the template's <|im_end|>\n<|im_start|>user\n


def test_next_turn_tokens_are_written_while_idle_and_reused_by_the_next_turn(loaded):
    sched = make(loaded, next_turn_ids=NEXT_TURN, next_turn_delay_s=0.0)
    prompt = [5, 6, 7, 8, 9, 10]
    first = sched.submit(prompt, SamplingParams(**GREEDY))
    list(first)
    assert wait_for(lambda: sched.metrics.next_turn_tokens > 0)
    slot = next(s for s in sched.slots if s.cached_ids[:len(prompt)] == prompt)
    # The prompt, every reply token (after a length stop the last one too), then the next-turn tokens.
    assert len(slot.cached_ids) == len(prompt) + first.stats.completion_tokens + len(NEXT_TURN)
    assert slot.cached_ids[-len(NEXT_TURN):] == NEXT_TURN and slot.ahead is None
    follow_up = [*slot.cached_ids, 20, 21, 22]
    text = "".join(reply := sched.submit(follow_up, SamplingParams(**GREEDY)))
    sched.stop()
    assert reply.stats.cached_tokens == len(follow_up) - 3  # only the user's new tokens were prefilled
    assert text == single(loaded, follow_up, **GREEDY)


def test_next_turn_tokens_wait_for_idleness_and_give_way_to_requests(loaded):
    sched = make(loaded, next_turn_ids=NEXT_TURN, next_turn_delay_s=30.0)
    prompt = [5, 6, 7, 8, 9, 10]
    first = sched.submit(prompt, SamplingParams(**GREEDY))
    list(first)
    slot = next(s for s in sched.slots if s.cached_ids[:len(prompt)] == prompt)
    assert slot.ahead is not None and slot.ahead[-len(NEXT_TURN):] == NEXT_TURN  # pending, not yet due
    time.sleep(0.1)
    assert sched.metrics.next_turn_tokens == 0 and len(slot.cached_ids) < len(prompt) + 12 + len(NEXT_TURN)
    follow_up = [*prompt, 11, 12]  # the client resent something else: the common prefix is kept
    text = "".join(reply := sched.submit(follow_up, SamplingParams(**GREEDY)))
    assert reply.stats.cached_tokens == len(prompt)
    cancelled = sched.submit([40, 41, 42], SamplingParams(**GREEDY))
    cancelled.cancel()
    list(cancelled)
    sched.stop()
    assert text == single(loaded, follow_up, **GREEDY)
    assert all(s.ahead is None for s in sched.slots if s.cached_ids[:3] == [40, 41, 42])  # never for a cancel
    assert sched.metrics.next_turn_tokens == 0


def test_a_grounded_conversation_gets_the_grounded_next_turn_tokens(loaded):
    grounded = [7, 8, 9]  # stands in for <|im_end|>\n<|im_start|>system\n + the passages instruction
    sched = make(loaded, next_turn_ids=NEXT_TURN, grounded_next_turn_ids=grounded, next_turn_delay_s=30.0)
    plain, with_passage = [5, 6, 7, 8, 9, 10], [60, 61, 62, 63, 64, 65]
    list(sched.submit(plain, SamplingParams(**GREEDY)))
    list(sched.submit(with_passage, SamplingParams(**GREEDY), spans=[(1, 4)]))  # tokens 1-3: a passage
    sched.stop()
    ahead = {tuple(s.cached_ids[:6]): s.ahead for s in sched.slots if s.ahead}
    assert ahead[tuple(plain)][-2:] == NEXT_TURN and ahead[tuple(with_passage)][-3:] == grounded


def test_what_the_user_types_is_written_ahead_and_reused_by_the_sent_message(loaded, monkeypatch):
    import kuaida.engine.scheduler as scheduler_module

    writes = []  # tokens per prefill, to see the chunks
    real = scheduler_module.prefill_prompt
    monkeypatch.setattr(scheduler_module, "prefill_prompt",
                        lambda model, cache, ids, start, *a: writes.append(len(ids) - start)
                        or real(model, cache, ids, start, *a))
    sched = make(loaded, next_turn_ids=NEXT_TURN, next_turn_delay_s=0.0, ahead_chunk=2)
    prompt = [5, 6, 7, 8, 9, 10]
    list(sched.submit(prompt, SamplingParams(**GREEDY)))
    # Every chunk of the next-turn tokens written (2 at a time here), before the draft's writes are counted.
    assert wait_for(lambda: sched.metrics.next_turn_tokens > 0 and all(s.ahead is None for s in sched.slots))
    slot = next(s for s in sched.slots if s.cached_ids[:len(prompt)] == prompt)
    history = list(slot.cached_ids)  # prompt, reply, next-turn tokens
    writes.clear()
    typed = [*history, 20, 21, 22, 23, 24]  # the user's words so far
    sched.type_ahead(typed)
    assert wait_for(lambda: sched.metrics.typed_tokens == 5)
    assert slot.cached_ids == typed and writes == [2, 2, 1]  # in chunks of ahead_chunk
    sent = [*typed, 25, 26]  # the last word and the assistant header
    text = "".join(reply := sched.submit(sent, SamplingParams(**GREEDY)))
    sched.stop()
    assert reply.stats.cached_tokens == len(typed)
    assert text == single(loaded, sent, **GREEDY)


def test_a_changed_draft_is_cut_back_and_a_draft_never_lands_on_another_conversation(loaded):
    sched = make(loaded, next_turn_ids=NEXT_TURN, next_turn_delay_s=0.0)
    a, b = [5, 6, 7, 8, 9, 10], [40, 41, 42]
    list(sched.submit(a, SamplingParams(**GREEDY)))
    list(sched.submit(b, SamplingParams(**GREEDY)))
    assert wait_for(lambda: sched.metrics.next_turn_tokens >= 2 * len(NEXT_TURN))
    slot = next(s for s in sched.slots if s.cached_ids[:len(a)] == a)
    other = next(s for s in sched.slots if s.cached_ids[:len(b)] == b)
    held = list(other.cached_ids)
    history = list(slot.cached_ids)
    sched.type_ahead([*history, 20, 21, 22])
    assert wait_for(lambda: slot.cached_ids == [*history, 20, 21, 22])
    sched.type_ahead([*history, 20, 30, 31])  # the user changed a word: cut back to the common prefix
    assert wait_for(lambda: slot.cached_ids == [*history, 20, 30, 31])
    assert sched.metrics.typed_tokens == 5 and other.cached_ids == held
    sent = [*history, 20, 32, 33]  # and changed it again before sending: the slot is reused, nothing copied
    text = "".join(reply := sched.submit(sent, SamplingParams(**GREEDY)))
    sched.stop()
    assert reply.stats.cached_tokens == len(history) + 1 and sched.metrics.evictions == 0
    assert slot.cached_ids[:len(sent)] == sent and other.cached_ids == held
    assert text == single(loaded, sent, **GREEDY)


def test_a_new_conversations_draft_takes_a_spare_slot_after_the_shared_prefix_never_a_conversation(loaded):
    sched = make(loaded, next_turn_ids=NEXT_TURN, next_turn_delay_s=0.0)
    a = [5, 6, 7, 8, 9, 10]
    list(sched.submit(a, SamplingParams(**GREEDY)))
    assert wait_for(lambda: sched.metrics.next_turn_tokens > 0)
    slot = next(s for s in sched.slots if s.cached_ids[:len(a)] == a)
    held = list(slot.cached_ids)
    first = [5, 6, 7, 90, 91, 92]  # shares a's first tokens (a system prompt): a new conversation
    sched.type_ahead(first)
    assert wait_for(lambda: any(s.cached_ids == first for s in sched.slots))
    spare = next(s for s in sched.slots if s.cached_ids == first)
    assert spare is not slot and slot.cached_ids == held
    assert sched.metrics.typed_tokens == 3  # [5, 6, 7] copied from a's slot, the rest written
    sched.type_ahead([5, 6, 7, 90, 91, 92, 93, 94])  # typing on: the same spare slot
    assert wait_for(lambda: spare.cached_ids == [5, 6, 7, 90, 91, 92, 93, 94])
    sent = [5, 6, 7, 90, 91, 92, 93, 94, 95]
    text = "".join(reply := sched.submit(sent, SamplingParams(**GREEDY)))
    # Every slot taken by a conversation: a draft of yet another one is not written anywhere.
    fill = [[60 + i, 61 + i] for i in range(len(sched.slots))]
    for p in fill:
        list(sched.submit(p, SamplingParams(**GREEDY)))
    assert wait_for(lambda: all(s.ahead is None for s in sched.slots))  # next-turn tokens written
    before, typed = {s.row: list(s.cached_ids) for s in sched.slots}, sched.metrics.typed_tokens
    sched.type_ahead([200, 201, 202, 203])
    sched.type_ahead([*sched.slots[0].cached_ids, 1])  # a later draft, to know the first one was handled
    assert wait_for(lambda: sched.metrics.typed_tokens > typed)
    sched.stop()
    assert sched.metrics.typed_tokens == typed + 1  # the later draft's one token, nothing of [200, ...]
    assert all(s.cached_ids[:len(before[s.row])] == before[s.row] for s in sched.slots)
    assert reply.stats.cached_tokens == len(sent) - 1 and sched.metrics.evictions >= 1
    assert text == single(loaded, sent, **GREEDY)


def test_a_draft_whose_history_renders_the_reply_differently_still_lands(loaded):
    """A reply re-tokenized from its text can differ from the tokens generated: the draft still extends
    the conversation's last prompt, and replaces the reply's tokens from where they differ."""
    sched = make(loaded, next_turn_ids=NEXT_TURN, next_turn_delay_s=0.0)
    prompt = [5, 6, 7, 8, 9, 10]
    list(sched.submit(prompt, SamplingParams(**GREEDY)))
    assert wait_for(lambda: sched.metrics.next_turn_tokens > 0)
    slot = next(s for s in sched.slots if s.cached_ids[:len(prompt)] == prompt)
    reply = slot.cached_ids[len(prompt):-len(NEXT_TURN)]
    typed = [*prompt, *reply[:2], 99, *NEXT_TURN, 20, 21]  # the reply's third token renders as 99
    sched.type_ahead(typed)
    assert wait_for(lambda: slot.cached_ids == typed)
    assert sched.metrics.typed_tokens == len(typed) - len(prompt) - 2
    sent = [*typed, 22]
    text = "".join(r := sched.submit(sent, SamplingParams(**GREEDY)))
    sched.stop()
    assert r.stats.cached_tokens == len(typed) and text == single(loaded, sent, **GREEDY)
