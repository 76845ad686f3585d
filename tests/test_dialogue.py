"""Dialogue layer: the SQLite session store (durability, ownership, threads), the history policy on a
fake renderer with known costs, and the manager with the tiny checkpoint's real ChatML template."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from kuaida.dialogue.history import DROP_STEP, _cut_points, fit_history, kept_messages
from kuaida.dialogue.manager import DialogueManager, merge_consecutive_users
from kuaida.dialogue.store import SCHEMA_VERSION, SessionStore
from kuaida.dialogue.template import render_prompt
from kuaida.errors import ContextLengthError, InvalidArgumentError, KuaidaError, SessionNotFoundError
from kuaida.model.loader import load_tokenizer


@pytest.fixture
def store(tmp_path):
    s = SessionStore(tmp_path / "nested" / "dir" / "sessions.db")
    yield s
    s.close()


# -- store -----------------------------------------------------------------------------------------
def test_store_round_trip(store):
    made = store.create("owner-a", system="Be brief.", options={"temperature": 0.2})
    assert made.id.startswith("sess_") and len(made.id) == 5 + 24
    got = store.get(made.id, "owner-a")
    assert got == made
    first = store.append(made.id, "user", "Hello?")
    second = store.append(made.id, "assistant", "Hi!", {"usage": {"completion_tokens": 2}})
    assert second > first
    turns = store.turns(made.id)
    assert [(t["role"], t["content"], t["meta"]) for t in turns] == [
        ("user", "Hello?", {}), ("assistant", "Hi!", {"usage": {"completion_tokens": 2}})]
    assert all(isinstance(t["created"], int) and t["created"] >= made.created for t in turns)
    with pytest.raises(InvalidArgumentError, match="role"):
        store.append(made.id, "tool", "x")


def test_store_is_wal_with_full_sync_and_versioned(store):
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    other = sqlite3.connect(store.path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    other.close()


def test_store_reopens_and_refuses_newer_or_foreign_files(tmp_path):
    path = tmp_path / "s.db"
    s = SessionStore(path)
    sid = s.create(None).id
    s.close()
    s = SessionStore(path)  # the second open migrates nothing and keeps the data
    assert s.get(sid, None).id == sid
    s._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    s.close()
    with pytest.raises(KuaidaError, match="newer"):
        SessionStore(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(KuaidaError, match="not a usable session database"):
        SessionStore(junk)


def test_owner_isolation(store):
    mine = store.create("key-a")
    with pytest.raises(SessionNotFoundError) as other_owner:
        store.get(mine.id, "key-b")
    with pytest.raises(SessionNotFoundError) as missing:
        store.get("sess_" + "0" * 24, "key-b")
    # Another key's session and a missing one read the same, so ids cannot be probed.
    assert str(other_owner.value) == f"session {mine.id} not found"
    assert str(missing.value) == f"session sess_{'0' * 24} not found"
    with pytest.raises(SessionNotFoundError):
        store.get(mine.id, None)  # a keyless request does not see keyed sessions
    with pytest.raises(SessionNotFoundError):
        store.delete(mine.id, "key-b")
    assert store.get(mine.id, "key-a") == mine
    # A server without keys: owner None sees its own sessions, and a keyed caller does not.
    open_session = store.create(None)
    assert store.get(open_session.id, None) == open_session
    with pytest.raises(SessionNotFoundError):
        store.get(open_session.id, "key-a")


def test_delete_removes_session_and_turns(store):
    s = store.create("k")
    store.append(s.id, "user", "hi")
    store.delete(s.id, "k")
    assert store.turns(s.id) == []
    with pytest.raises(SessionNotFoundError):
        store.get(s.id, "k")
    with pytest.raises(SessionNotFoundError):
        store.delete(s.id, "k")
    with pytest.raises(SessionNotFoundError):
        store.append(s.id, "user", "again")


def test_turn_survives_kill_9(tmp_path):
    path = tmp_path / "s.db"
    s = SessionStore(path)
    sid = s.create("k").id
    s.close()
    code = textwrap.dedent(f"""
        import os, signal
        from kuaida.dialogue.store import SessionStore
        SessionStore({str(path)!r}).append({sid!r}, "user", "remember me")
        print("ok", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok" and done.returncode == -9, done.stderr
    reopened = SessionStore(path)
    assert [t["content"] for t in reopened.turns(sid)] == ["remember me"]
    reopened.close()


def test_concurrent_appends(store):
    s = store.create(None)
    n_threads, per_thread = 8, 20

    def worker(t: int) -> None:
        for i in range(per_thread):
            store.append(s.id, "user", f"{t}:{i}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    contents = [t["content"] for t in store.turns(s.id)]
    assert len(contents) == n_threads * per_thread
    for t in range(n_threads):  # each thread's turns are all there, in its order
        assert [c for c in contents if c.startswith(f"{t}:")] == [f"{t}:{i}" for i in range(per_thread)]


# -- history policy on a fake renderer -----------------------------------------------------------------
ROLE_IDS = {"system": 1, "user": 2, "assistant": 3}
END, GEN = 4, 5


def fake_render(messages: list[dict]) -> list[int]:
    """Each message costs its word count + 4 tokens ([role] words.. [END] [END] [END]); +1 for the
    generation prompt. Word ids make prefixes comparable."""
    ids = []
    for m in messages:
        ids += [ROLE_IDS[m["role"]]] + [100 + len(w) for w in m["content"].split()] + [END] * 3
    return ids + [GEN]


def chat(n_exchanges: int, words: int = 3, system: str | None = "be nice") -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for i in range(n_exchanges):
        msgs += [{"role": "user", "content": " ".join(["q"] * words)},
                 {"role": "assistant", "content": " ".join(["a"] * words)}]
    return msgs + [{"role": "user", "content": " ".join(["q"] * words)}]  # chat(n + 1) extends chat(n)


def test_history_that_fits_is_untouched():
    msgs = chat(3)
    assert fit_history(fake_render, msgs, 1000) == (fake_render(msgs), 0)


def test_history_drops_oldest_whole_exchanges_keeps_system_and_latest_user():
    msgs = chat(20)  # system 6 + 20 exchanges x 14 + latest 7 + 1 = 294 tokens
    ids, dropped = fit_history(fake_render, msgs, 200)
    kept = kept_messages(msgs, dropped)
    assert dropped > 0 and dropped % 2 == 0  # whole user+assistant exchanges
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1]
    assert kept[1]["role"] == "user" and kept == msgs[:1] + msgs[1 + dropped:]
    assert ids == fake_render(kept) and len(ids) <= 200
    # The cut lies on the grid of whole steps (50 tokens) from the start: 94 tokens too many -> the
    # fewest exchanges that make up at least 100 tokens.
    assert 100 <= 294 - len(ids) < 100 + 14


def test_history_cut_moves_rarely_as_the_conversation_grows():
    budget, exchange = 280, 14  # a quarter of the budget is 5 exchanges
    results = [fit_history(fake_render, chat(n), budget) for n in range(60)]
    moves = 0
    for (prev_ids, prev_drop), (ids, drop) in zip(results, results[1:]):
        assert len(ids) <= budget
        if drop == prev_drop:
            if drop:  # same cut: the previous prompt (less its generation prompt) is a prefix of this one
                assert ids[:len(prev_ids) - 1] == prev_ids[:-1]
        else:
            moves += 1
            assert len(ids) <= budget * (1 - DROP_STEP) + exchange  # down near the lower watermark
    growth = 59 * exchange - (budget - len(results[0][0]))
    assert 0 < moves <= growth / (budget * DROP_STEP) + 1


def test_history_is_stateless_and_repeatable():
    msgs = chat(30)
    assert fit_history(fake_render, msgs, 150) == fit_history(fake_render, list(msgs), 150)


def test_history_too_long_message_states_the_limit():
    msgs = chat(2) + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "w " * 500}]
    with pytest.raises(ContextLengthError, match="limit of 300 prompt tokens"):
        fit_history(fake_render, msgs, 300)


def test_history_long_latest_message_drops_as_much_as_needed():
    msgs = chat(10)[:-1] + [{"role": "user", "content": "w " * 250}]  # the latest alone is most of it
    ids, dropped = fit_history(fake_render, msgs, 300)
    kept = kept_messages(msgs, dropped)
    assert len(ids) <= 300 and kept[0] == msgs[0] and kept[-1] == msgs[-1]


def test_cut_points_respect_exchanges_and_unanswered_turns():
    sys_, u, a = ({"role": r, "content": "x"} for r in ("system", "user", "assistant"))
    assert _cut_points([sys_, u, a, u, u]) == [0, 2, 3]  # a failed turn (user without reply) is a unit
    assert _cut_points([a, u, a, u]) == [0, 1, 3]  # a leading greeting goes on its own
    assert _cut_points([sys_, u]) == [0]
    assert kept_messages([sys_, sys_, u, a, u], 2) == [sys_, sys_, u]
    # A knowledge-base turn's passages (a system message right before its user message) go with it.
    assert _cut_points([sys_, u, a, sys_, u, a, sys_, u]) == [0, 2, 5]


# -- manager with the real ChatML template -------------------------------------------------------
@pytest.fixture
def tokenizer(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


@pytest.fixture
def manager(store, tokenizer):
    return DialogueManager(store, lambda m: render_prompt(tokenizer, m), max_context=256)


def test_manager_turns_extend_the_previous_prompt(manager, store, tokenizer):
    session = store.create("k", system="You are a helpful assistant.")
    plan = manager.prepare_turn(session, "Hello! How are you today?", max_new_tokens=32)
    assert [t["role"] for t in store.turns(session.id)] == ["user"]  # stored before generation
    assert plan.dropped == 0 and plan.messages == manager.messages(session)
    assert plan.prompt_ids == render_prompt(tokenizer, plan.messages)
    manager.finish_turn(session, "I am fine, thank you.", {"finish_reason": "stop"})
    assert store.turns(session.id)[-1]["meta"] == {"finish_reason": "stop"}
    second = manager.prepare_turn(session, "Tell me a joke.", max_new_tokens=32)
    # The engine reuses the KV of the common prefix: the first prompt must be one.
    assert second.prompt_ids[:len(plan.prompt_ids)] == plan.prompt_ids


def test_manager_continues_after_a_failed_generation(manager, store):
    session = store.create(None)
    manager.prepare_turn(session, "What is the capital of France?", max_new_tokens=16)
    plan = manager.prepare_turn(session, "Hello?", max_new_tokens=16)  # no reply was stored in between
    assert [m["role"] for m in plan.messages] == ["user", "user"] and plan.prompt_ids


def test_manager_merges_user_turns_for_templates_that_need_alternation(store, tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == m['role'] %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    manager = DialogueManager(store, lambda m: render_prompt(tokenizer, m), max_context=256)
    session = store.create(None)
    manager.prepare_turn(session, "first", max_new_tokens=16)
    plan = manager.prepare_turn(session, "second", max_new_tokens=16)
    merged = merge_consecutive_users(plan.messages)
    assert merged == [{"role": "user", "content": "first\n\nsecond"}]
    assert plan.prompt_ids == render_prompt(tokenizer, merged)


def test_manager_drops_history_within_the_budget(manager, store):
    session = store.create("k", system="Be brief.")
    for i in range(12):
        plan = manager.prepare_turn(session, f"The quick brown fox number {i} jumps over the lazy dog.", 64)
        assert len(plan.prompt_ids) <= 256 - 64
        manager.finish_turn(session, "The capital of France is Paris. " * 2, {})
    assert plan.dropped > 0 and plan.dropped % 2 == 0
    assert plan.messages[0]["role"] == "system" and plan.messages[1]["role"] == "user"
    assert plan.messages[-1]["content"].startswith("The quick brown fox number 11")
    assert len(store.turns(session.id)) == 24  # the store keeps everything; only the prompt drops


def test_manager_refuses_bad_and_oversized_messages_without_storing(manager, store):
    session = store.create(None)
    for bad in ("", "   ", None, 3):
        with pytest.raises(InvalidArgumentError):
            manager.prepare_turn(session, bad, max_new_tokens=16)
    with pytest.raises(ContextLengthError, match="limit of 128 prompt tokens"):
        manager.prepare_turn(session, "Hello there! " * 200, max_new_tokens=200)  # clamped to half of 256
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        manager.prepare_turn(session, "hi", max_new_tokens=0)
    assert store.turns(session.id) == []


def test_prompt_budget_clamps_to_half_the_context(manager):
    assert manager.prompt_budget(56) == 200
    assert manager.prompt_budget(256) == manager.prompt_budget(10_000) == 128
