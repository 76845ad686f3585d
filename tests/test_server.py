"""The HTTP server on a tiny model, in process (fastapi TestClient): the OpenAI chat API (JSON and SSE),
error bodies for bad input, API keys and session ownership, the session API, 429 on a full queue,
/metrics, and KV-cache reuse when a client resends its history."""
import json
import time
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient

from kuaida.model.loader import load_model
from kuaida.serve import ServerConfig, create_app

MAX_CONTEXT = 128
GREEDY = {"temperature": 0, "max_tokens": 6}
KEYS = ("sk-alice", "sk-bob")


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture
def make_client(loaded, tiny_llama_dir, tmp_path):
    """make_client(**ServerConfig fields) -> a TestClient with the app's lifespan running."""
    with ExitStack() as stack:
        def make(**overrides) -> TestClient:
            config = ServerConfig(**{"model": str(tiny_llama_dir), "max_context": MAX_CONTEXT, "cache_mb": 1,
                                     "max_batch": 4, "db": tmp_path / "sessions.db", "default_max_tokens": 8,
                                     **overrides})
            return stack.enter_context(TestClient(create_app(config, loaded)))
        yield make


@pytest.fixture
def client(make_client):
    return make_client()


def chat(client, headers=None, **fields):
    body = {"model": "tiny", "messages": HELLO, **GREEDY, **fields}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def sse_events(response) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded, with the final "[DONE]" kept as a string."""
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [p if p == "[DONE]" else json.loads(p) for p in (line[len("data: "):] for line in lines)]


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    return error


HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


def test_chat_completion(client):
    r = chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= GREEDY["max_tokens"]
    assert usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert set(body["kuaida"]) >= {"ttft_ms", "tokens_per_s", "cached_tokens"}


def test_stream_matches_non_stream(client):
    text = chat(client).json()["choices"][0]["message"]["content"]
    r = chat(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    first, *deltas, finish, usage_chunk, _ = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(d["choices"][0]["delta"]) == {"content"} for d in deltas)
    assert "".join(d["choices"][0]["delta"]["content"] for d in deltas) == text
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert len({e["id"] for e in events[:-1]}) == 1


def test_stream_without_usage_ends_with_finish_then_done(client):
    events = sse_events(chat(client, stream=True))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e.get("usage") is None for e in events[:-1])


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, None),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
])
def test_bad_requests_are_400_naming_the_field(client, fields, param):
    error = assert_error(chat(client, **fields), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param:
        assert param in error["message"]


def test_extreme_sampling_values_never_break_generation(client):
    # A temperature of 5e-324 would overflow logits / T to inf; it is served as greedy.
    tiny = chat(client, temperature=5e-324)
    assert tiny.status_code == 200
    assert tiny.json()["choices"][0]["message"] == chat(client).json()["choices"][0]["message"]
    assert_error(chat(client, repetition_penalty=5e-324), 400, "repetition_penalty")
    assert chat(client, top_k=10**6, top_p=1e-9, repetition_penalty=10, seed=2**63 - 1).status_code == 200


def test_harmless_openai_fields_are_accepted(client):
    r = chat(client, n=1, user="u1", logprobs=False, presence_penalty=0, response_format={"type": "text"},
             stream_options={"include_usage": False}, seed=3, stop=["\n\n"], max_completion_tokens=4,
             messages=[{"role": "developer", "content": "Be brief."},
                       {"role": "user", "content": [{"type": "text", "text": "Hello!"}]}])
    assert r.status_code == 200, r.text


def test_lone_surrogate_is_400(client):
    # Valid JSON ("\\ud800" escaped) that no tokenizer or database can take.
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a\ud800b"}]})
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert assert_error(r, 400, "Unicode")["param"] == "messages.0.content"


def test_malformed_json_and_missing_body(client):
    r = client.post("/v1/chat/completions", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert_error(r, 400, "malformed JSON")
    assert_error(client.post("/v1/chat/completions"), 400)
    assert_error(client.post("/v1/chat/completions", content=b"[1, 2]",
                             headers={"content-type": "application/json"}), 400)


def test_too_long_prompt_states_the_limit(client):
    r = chat(client, messages=[{"role": "user", "content": "word " * 300}])
    error = assert_error(r, 400, str(MAX_CONTEXT))
    assert error["code"] == "context_length_exceeded"


def test_unknown_route_and_method_are_openai_style(client):
    assert_error(client.get("/v1/nope"), 404)
    assert_error(client.delete("/v1/models"), 405)


def test_models_and_health(client, tiny_llama_dir):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == tiny_llama_dir.name
    assert client.get("/health").json()["status"] == "ok"


def test_api_key_required_on_v1_only(make_client):
    client = make_client(api_key=",".join(KEYS))
    assert_error(chat(client), 401, "API key")
    assert_error(chat(client, headers={"Authorization": "Bearer sk-wrong"}), 401)
    assert_error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    assert chat(client, headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_sessions_belong_to_their_key(make_client):
    client = make_client(api_key=",".join(KEYS))
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in KEYS)
    sid = client.post("/v1/sessions", json={}, headers=alice).json()["id"]
    assert client.get(f"/v1/sessions/{sid}", headers=alice).status_code == 200
    assert_error(client.get(f"/v1/sessions/{sid}", headers=bob), 404)
    assert_error(client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi"}, headers=bob), 404)
    assert_error(client.delete(f"/v1/sessions/{sid}", headers=bob), 404)
    assert client.get(f"/v1/sessions/{sid}", headers=alice).status_code == 200


def test_session_lifecycle(client):
    created = client.post("/v1/sessions", json={"system": "You are terse.", "options": {"temperature": 0}})
    assert created.status_code == 200, created.text
    session = created.json()
    assert session["object"] == "session" and session["system"] == "You are terse."
    sid = session["id"]
    reply = client.post(f"/v1/sessions/{sid}/messages", json={"content": "Hello!", "max_tokens": 5}).json()
    assert reply["object"] == "session.message" and reply["session_id"] == sid
    assert reply["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] > 0
    history = client.get(f"/v1/sessions/{sid}").json()
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
    assert history["messages"][1]["content"] == reply["message"]["content"]
    deleted = client.delete(f"/v1/sessions/{sid}").json()
    assert deleted == {"id": sid, "object": "session.deleted", "deleted": True}
    assert_error(client.get(f"/v1/sessions/{sid}"), 404)
    assert_error(client.post(f"/v1/sessions/{sid}/messages", json={"content": "again"}), 404)


def test_session_stream_stores_the_reply_and_reuses_the_cache(client):
    sid = client.post("/v1/sessions", json={"options": {"temperature": 0, "max_tokens": 5}}).json()["id"]
    client.post(f"/v1/sessions/{sid}/messages", json={"content": "Hello!"})
    r = client.post(f"/v1/sessions/{sid}/messages", json={"content": "And you?", "stream": True})
    events = sse_events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert events[-3]["kuaida"]["cached_tokens"] > 0
    history = client.get(f"/v1/sessions/{sid}").json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"] * 2 and history[-1]["content"] == text


def test_bad_session_input(client):
    assert_error(client.post("/v1/sessions", json={"options": {"temperature": 5}}), 400, "temperature")
    assert_error(client.post("/v1/sessions", json={"options": {"stop": ["x"] * 20}}), 400, "stop")
    sid = client.post("/v1/sessions", json={}).json()["id"]
    assert_error(client.post(f"/v1/sessions/{sid}/messages", json={"content": ""}), 400, "content")
    assert_error(client.post(f"/v1/sessions/{sid}/messages", json={"content": "word " * 300}), 400)
    assert client.get(f"/v1/sessions/{sid}").json()["messages"] == []  # refused turns are not stored


def test_full_queue_is_429_with_retry_after(make_client):
    client = make_client(max_queue=0)
    r = chat(client)
    assert_error(r, 429)
    assert r.headers["Retry-After"] == "1"
    sid = client.post("/v1/sessions", json={}).json()["id"]
    assert_error(client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi"}), 429)
    assert client.get(f"/v1/sessions/{sid}").json()["messages"] == []  # a retry will not double the turn


def test_metrics_count_requests_and_generations(client):
    chat(client)
    chat(client, n=3)
    text = client.get("/metrics").text
    for name in ("kuaida_http_requests_total", "kuaida_errors_total", "kuaida_time_to_first_token_seconds",
                 "kuaida_time_per_output_token_seconds", "kuaida_active_streams", "kuaida_queue_depth",
                 "kuaida_kv_cache_hits_total", "kuaida_cached_prompt_tokens_total",
                 "kuaida_prefilled_tokens_total",
                 "kuaida_kv_cache_evictions_total"):
        assert name in text, name
    assert 'kuaida_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'kuaida_http_requests_total{method="POST",route="/v1/chat/completions",status="400"} 1.0' in text
    assert "kuaida_active_streams 0.0" in text
    assert "kuaida_time_to_first_token_seconds_count 1.0" in text


def test_resent_history_hits_the_kv_cache(client):
    first = chat(client).json()
    reply = first["choices"][0]["message"]["content"]
    history = [*HELLO, {"role": "assistant", "content": reply}, {"role": "user", "content": "A joke?"}]
    second = chat(client, messages=history).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    assert second["kuaida"]["cached_tokens"] == second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert "kuaida_kv_cache_hits_total 1.0" in client.get("/metrics").text


def test_prefix_cache_can_be_turned_off(make_client):
    client = make_client(prefix_cache=False)
    reply = chat(client).json()["choices"][0]["message"]["content"]
    history = [*HELLO, {"role": "assistant", "content": reply}, {"role": "user", "content": "A joke?"}]
    assert chat(client, messages=history).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_web_chat_page_is_served_at_root(client):
    r = client.get("/")
    assert r.status_code in (200, 404)
    if r.status_code == 200:
        assert r.headers["content-type"].startswith("text/html")


def test_openapi_schema_lists_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/models", "/v1/sessions", "/v1/sessions/{session_id}",
            "/v1/sessions/{session_id}/messages", "/health", "/metrics"} <= set(paths)


def _typed_tokens(client) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines()
                if x.startswith("kuaida_typed_ahead_prefilled_tokens_total"))
    return float(line.split()[1])


def _wait_typed(client, more_than: float) -> float:
    deadline = time.monotonic() + 10
    while (n := _typed_tokens(client)) <= more_than and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def test_a_session_draft_is_written_ahead_and_the_sent_message_reuses_it(client):
    sid = client.post("/v1/sessions", json={"options": {"temperature": 0, "max_tokens": 5}}).json()["id"]
    first = client.post(f"/v1/sessions/{sid}/messages", json={"content": "Hello!"}).json()
    draft = client.post(f"/v1/sessions/{sid}/draft", json={"content": "What is the weather like tod"})
    assert draft.status_code == 202, draft.text
    known = draft.json()["prompt_tokens"]
    assert draft.json()["object"] == "draft" and known > first["usage"]["total_tokens"]
    assert _wait_typed(client, 0) > 0
    reply = client.post(f"/v1/sessions/{sid}/messages", json={"content": "What is the weather like today?"})
    usage = reply.json()["usage"]
    # Everything known while typing came from the cache: only the last word(s) and the header were prefilled.
    assert usage["prompt_tokens_details"]["cached_tokens"] == known
    assert [m["content"] for m in client.get(f"/v1/sessions/{sid}").json()["messages"]][::2] == [
        "Hello!", "What is the weather like today?"]  # a draft is not stored


def test_a_chat_draft_is_written_ahead_for_the_completion_that_follows(client):
    first = chat(client).json()
    history = [*HELLO, {"role": "assistant", "content": first["choices"][0]["message"]["content"]}]
    before = _typed_tokens(client)
    typed = [*history, {"role": "user", "content": "Tell me mo"}]
    draft = client.post("/v1/chat/drafts", json={"messages": typed})
    assert draft.status_code == 202, draft.text
    assert _wait_typed(client, before) > before
    sent = chat(client, messages=[*history, {"role": "user", "content": "Tell me more"}]).json()
    assert sent["usage"]["prompt_tokens_details"]["cached_tokens"] == draft.json()["prompt_tokens"]


def test_bad_drafts_are_4xx(make_client):
    client = make_client(api_key=",".join(KEYS))
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in KEYS)
    sid = client.post("/v1/sessions", json={}, headers=alice).json()["id"]
    assert_error(client.post(f"/v1/sessions/{sid}/draft", json={"content": "hi"}, headers=bob), 404)
    assert_error(client.post(f"/v1/sessions/{sid}/draft", json={"content": "hi"}), 401)
    assert_error(client.post("/v1/sessions/nope/draft", json={"content": "hi"}, headers=alice), 404)
    assert_error(client.post(f"/v1/sessions/{sid}/draft", json={"text": "hi"}, headers=alice), 400, "text")
    assert_error(client.post("/v1/chat/drafts", json={"messages": [{"role": "assistant", "content": "x"}]},
                             headers=alice), 400, "last message")
    assert_error(client.post("/v1/chat/drafts", json={"messages": []}, headers=alice), 400, "messages")
    assert client.post(f"/v1/sessions/{sid}/draft", json={"content": "word " * 300},
                       headers=alice).json()["prompt_tokens"] == 0  # could never fit: nothing written


def test_without_prefix_caching_a_draft_reports_nothing_queued(make_client):
    client = make_client(prefix_cache=False)
    draft = client.post("/v1/chat/drafts", json={"messages": [{"role": "user", "content": "What is the wea"}]})
    assert draft.status_code == 202 and draft.json()["prompt_tokens"] == 0
    sid = client.post("/v1/sessions", json={}).json()["id"]
    assert client.post(f"/v1/sessions/{sid}/draft", json={"content": "Hello th"}).json()["prompt_tokens"] == 0


def test_a_first_messages_draft_is_written_before_the_conversation_exists(client):
    system = {"role": "system", "content": "You are terse."}
    draft = client.post("/v1/chat/drafts", json={
        "messages": [system, {"role": "user", "content": "What is the weather like tod"}]})
    assert draft.status_code == 202, draft.text
    assert _wait_typed(client, 0) >= draft.json()["prompt_tokens"]  # the whole prompt: nothing was cached
    sent = chat(client, messages=[system, {"role": "user", "content": "What is the weather like today?"}])
    assert sent.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == draft.json()["prompt_tokens"]
