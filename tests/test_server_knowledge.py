"""Knowledge bases through the server: a chat completion or a session names a base (kuaida extra field
`knowledge`), the passages go into the prompt and come back as the reply's sources; a missing base is a
404 naming it. Tiny model and a bag-of-words embedder: the point here is the plumbing, not the ranking
(tests/test_knowledge.py covers that with the real embedding model)."""
import pytest
from fastapi.testclient import TestClient

from kuaida.knowledge import base as kb_base
from kuaida.knowledge import create_kb
from kuaida.model.loader import load_model
from kuaida.serve import ServerConfig, create_app
from test_knowledge import HashEmbedder
from test_server import assert_error, sse_events

GREEDY = {"temperature": 0, "max_tokens": 4}
QUESTION = [{"role": "user", "content": "reset pinhole?"}]


@pytest.fixture(scope="module")
def model_dir(make_hf_dir):
    # Grounded prompts (instruction + passages, byte-level tiny tokenizer) outgrow the usual 256 positions.
    return make_hf_dir("llama", tie_word_embeddings=True, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


@pytest.fixture
def client(loaded, model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(kb_base, "default_embedder", HashEmbedder)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "reset.txt").write_text("Hold the reset pinhole 12 s.")
    (tmp_path / "docs" / "price.txt").write_text("The hub costs 129 euros.")
    with create_kb("hub", root=tmp_path / "kb", embedder=HashEmbedder()) as kb:
        assert kb.add([tmp_path / "docs"]).chunks == 2
    config = ServerConfig(model=str(model_dir), max_context=1024, cache_mb=4, max_batch=2, passage_cache_mb=64,
                          db=tmp_path / "sessions.db", kb_dir=tmp_path / "kb", knowledge_bases=("hub",))
    with TestClient(create_app(config, loaded)) as c:
        yield c


def test_chat_completion_answers_from_a_base(client):
    plain = client.post("/v1/chat/completions", json={"model": "t", "messages": QUESTION, **GREEDY})
    grounded = client.post("/v1/chat/completions", json={"model": "t", "messages": QUESTION, **GREEDY,
                                                         "knowledge": {"base": "hub", "k": 1}})
    assert plain.status_code == grounded.status_code == 200, grounded.text
    extra = grounded.json()["kuaida"]
    assert [s["id"] for s in extra["sources"]] == ["docs/reset.txt#1"]
    assert extra["sources"][0]["text"] == "Hold the reset pinhole 12 s." and extra["retrieval_ms"] >= 0
    assert plain.json()["kuaida"]["sources"] is None
    # The passage is in the prompt: the grounded prompt is longer by at least its text.
    grown = grounded.json()["usage"]["prompt_tokens"] - plain.json()["usage"]["prompt_tokens"]
    assert grown >= len("Hold the reset pinhole 12 s.") // 4


def test_streamed_reply_carries_sources_in_its_finish_chunk(client):
    r = client.post("/v1/chat/completions", json={"model": "t", "messages": QUESTION, **GREEDY, "stream": True,
                                                   "knowledge": {"base": "hub", "k": 2}})
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    finish = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1
    assert {s["id"] for s in finish[0]["kuaida"]["sources"]} == {"docs/reset.txt#1", "docs/price.txt#1"}


def test_missing_base_is_a_404_naming_it(client):
    r = client.post("/v1/chat/completions", json={"model": "t", "messages": QUESTION, **GREEDY,
                                                   "knowledge": {"base": "nosuch"}})
    assert assert_error(r, 404, "nosuch")["code"] == "knowledge_base_not_found"
    r = client.post("/v1/sessions", json={"knowledge": {"base": "nosuch"}})
    assert_error(r, 404, "nosuch")
    assert_error(client.post("/v1/chat/completions", json={"model": "t", "messages": QUESTION,
                                                           "knowledge": {"base": "hub", "k": 0}}), 400)


def test_session_with_a_base(client):
    created = client.post("/v1/sessions", json={"system": "You are the hub's support.",
                                                "knowledge": {"base": "hub", "k": 1}})
    assert created.status_code == 200, created.text
    session = created.json()
    assert session["knowledge"] == {"base": "hub", "k": 1} and session["options"] == {}
    reply = client.post(f"/v1/sessions/{session['id']}/messages", json={"content": "what does it cost?",
                                                                         **GREEDY})
    assert reply.status_code == 200, reply.text
    assert [s["id"] for s in reply.json()["kuaida"]["sources"]] == ["docs/price.txt#1"]
    history = client.get(f"/v1/sessions/{session['id']}").json()
    # The passages are prompt material, not conversation: the stored history is the user's and the bot's.
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
    assert history["knowledge"] == {"base": "hub", "k": 1}
    assert "129 euros" not in history["messages"][0]["content"]


def test_follow_up_prompt_extends_the_first_with_its_passages_in_place(client):
    """Each turn's passages stay before its user message: the second request's prompt starts with the
    whole first prompt (the server remembers which passages it put where), so that prefix is reused."""
    body = {"model": "t", **GREEDY, "knowledge": {"base": "hub", "k": 1}}
    first = client.post("/v1/chat/completions", json={**body, "messages": QUESTION}).json()
    follow_up = QUESTION + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "how many euros for the hub"}]
    second = client.post("/v1/chat/completions", json={**body, "messages": follow_up})
    assert second.status_code == 200, second.text
    second = second.json()
    assert [s["id"] for s in second["kuaida"]["sources"]] == ["docs/price.txt#1"]
    assert second["kuaida"]["cached_tokens"] >= first["usage"]["prompt_tokens"]


def test_session_turns_keep_their_passages_and_reuse_the_prefix(client):
    session = client.post("/v1/sessions", json={"knowledge": {"base": "hub", "k": 1}}).json()
    url = f"/v1/sessions/{session['id']}/messages"
    first = client.post(url, json={"content": "reset pinhole?", **GREEDY}).json()
    second = client.post(url, json={"content": "how many euros for the hub", **GREEDY}).json()
    assert second["kuaida"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    assert [s["id"] for s in second["kuaida"]["sources"]] == ["docs/price.txt#1"]
    metrics = client.get("/metrics").text
    assert "kuaida_passage_cache_misses_total" in metrics and "kuaida_passage_cache_bytes" in metrics


def test_a_grounded_sessions_draft_carries_the_passages_found_so_far(client):
    import time

    sid = client.post("/v1/sessions", json={"knowledge": {"base": "hub", "k": 1},
                                            "options": {"temperature": 0, "max_tokens": 4}}).json()["id"]
    client.post(f"/v1/sessions/{sid}/messages", json={"content": "reset pinhole?"})
    draft = client.post(f"/v1/sessions/{sid}/draft", json={"content": "what is the hub price in eur"})
    assert draft.status_code == 202, draft.text
    known = draft.json()["prompt_tokens"]
    deadline = time.monotonic() + 10
    while "kuaida_typed_ahead_prefilled_tokens_total 0.0" in client.get("/metrics").text:
        assert time.monotonic() < deadline, "the draft was not written"
        time.sleep(0.01)
    sent = client.post(f"/v1/sessions/{sid}/messages", json={"content": "what is the hub price in euros"})
    sent = sent.json()
    assert [s["id"] for s in sent["kuaida"]["sources"]] == ["docs/price.txt#1"]
    # The same passage was found for the typed text: it, and the text, came from the cache.
    assert sent["usage"]["prompt_tokens_details"]["cached_tokens"] == known
    assert client.post(f"/v1/sessions/{sid}/draft", json={"content": ""}).json()["prompt_tokens"] == 0
