"""`kuaida serve` as a real process (uvicorn on 127.0.0.1, a free port chosen by the OS): the official
openai client unchanged, a session that survives kill -9, concurrent clients, a client that hangs up
mid-stream, graceful SIGTERM, and a bounded schemathesis run with no server errors.

The default model (int8) backs the client, disconnect and shutdown tests, where real decode speed
matters; the tiny random model backs the rest, which test the server, not the model.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
API_KEY = "sk-integration-test"
READY = re.compile(r"kuaida serving \S+ at (http://127\.0\.0\.1:\d+)")


class ServerProcess:
    """`python -m kuaida.cli serve ...` with --port 0; its output goes to a file (a pipe nobody reads
    could fill up and stall the server)."""

    def __init__(self, model: str, workdir: Path, *args: str, env: dict | None = None) -> None:
        self.command = [sys.executable, "-m", "kuaida.cli", "serve", model, "--port", "0",
                        "--db", str(workdir / "sessions.db"), *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = workdir / f"server-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 180) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := READY.search(self.log()):
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"the server did not start:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within 30 s; -> the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path):
    """serve(model, *cli_args, env=None, workdir=tmp_path) -> a started ServerProcess, stopped at teardown."""
    started: list[ServerProcess] = []

    def start(model: str, *args: str, env: dict | None = None, workdir: Path = tmp_path) -> ServerProcess:
        started.append(ServerProcess(model, workdir, *args, env=env).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server = ServerProcess("default", tmp_path_factory.mktemp("default"), "--max-batch", "4",
                           "--max-context", "1024", "--cache-mb", "256",
                           env={"KUAIDA_API_KEY": API_KEY}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_dir, tmp_path_factory):
    server = ServerProcess(str(tiny_llama_dir), tmp_path_factory.mktemp("tiny"), "--dtype", "fp32",
                           "--max-context", "256", "--cache-mb", "4").start()
    yield server
    server.stop()


def sse_payloads(lines) -> list:
    """`data:` payloads of an SSE stream (iterable of lines), JSON-decoded; "[DONE]" kept as a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# -- the official openai client, default model -------------------------------------------------------
@pytest.fixture(scope="module")
def openai_client(default_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{default_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Greedy, the default model counts on until max_tokens: a reply that is surely still running when cut.
LONG = {"messages": [{"role": "user", "content": "Count from 1 to 300, separated by commas."}],
        "temperature": 0, "max_tokens": 900}


def test_openai_client_non_stream(openai_client):
    assert [m.id for m in openai_client.models.list().data] == ["default"]
    reply = openai_client.chat.completions.create(model="default", messages=QUESTION, max_tokens=24,
                                                  temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_stream(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model="default", messages=QUESTION, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant" and text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []


def test_prompt_lookup_in_the_server_gives_the_greedy_reply(openai_client, default_server):
    """The server verifies prompt-lookup drafts for greedy requests (on by default): a reply that quotes
    its prompt gets drafts, some kept, and is token for token the in-process engine's greedy reply
    without drafts."""
    from kuaida.bot import load

    messages = [{"role": "user", "content": "Repeat this sentence three times: the blue hub blinks amber "
                                            "when the network is down."}]
    before = metric(default_server.url, "kuaida_lookup_accepted_tokens_total")
    reply = openai_client.chat.completions.create(model="default", messages=messages, max_tokens=48,
                                                  temperature=0)
    bot = load("default", dtype="int8")
    assert reply.choices[0].message.content == bot.chat(messages, max_new_tokens=48, temperature=0)
    assert metric(default_server.url, "kuaida_lookup_accepted_tokens_total") > before


def test_a_follow_up_turn_finds_the_template_tokens_already_cached(openai_client, default_server):
    """Once idle, the server writes the template's tokens after a reply (`<|im_end|>\\n<|im_start|>user\\n`,
    5 tokens for the default model): the next turn reuses the prompt, the reply and those 5."""
    before = metric(default_server.url, "kuaida_next_turn_prefilled_tokens_total")
    first = openai_client.chat.completions.create(model="default", messages=QUESTION, max_tokens=24,
                                                  temperature=0)
    time.sleep(0.5)  # the server waits 50 ms of idleness, then prefills them (~20 ms)
    assert metric(default_server.url, "kuaida_next_turn_prefilled_tokens_total") >= before + 5
    history = [*QUESTION, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And the capital of Italy?"}]
    second = openai_client.chat.completions.create(model="default", messages=history, max_tokens=8,
                                                   temperature=0)
    reused = first.usage.prompt_tokens + first.usage.completion_tokens + 5
    assert second.usage.prompt_tokens_details.cached_tokens == reused
    assert second.usage.prompt_tokens > reused and second.choices[0].message.content


def test_a_draft_typed_before_the_turn_is_written_ahead(openai_client, default_server):
    """POST /v1/chat/drafts while the user types: the server writes the prompt up to the last whole word
    once idle, and the completion sent with the finished message reuses all of it."""
    first = openai_client.chat.completions.create(model="default", messages=QUESTION, max_tokens=24,
                                                  temperature=0)
    history = [*QUESTION, {"role": "assistant", "content": first.choices[0].message.content}]
    before = metric(default_server.url, "kuaida_typed_ahead_prefilled_tokens_total")
    typed = [*history, {"role": "user", "content": "And what is the capital of Ita"}]
    draft = httpx.post(f"{default_server.url}/v1/chat/drafts", json={"messages": typed}, timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert draft.status_code == 202, draft.text
    known = draft.json()["prompt_tokens"]
    deadline = time.monotonic() + 10
    while metric(default_server.url, "kuaida_typed_ahead_prefilled_tokens_total") <= before:
        assert time.monotonic() < deadline, "the draft was not written"
        time.sleep(0.05)
    sent = [*history, {"role": "user", "content": "And what is the capital of Italy?"}]
    second = openai_client.chat.completions.create(model="default", messages=sent, max_tokens=16,
                                                   temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == known
    assert second.usage.prompt_tokens - known <= 8  # " Italy?", the end of turn, the assistant header
    assert "Rome" in second.choices[0].message.content


def test_openai_client_errors(openai_client, default_server):
    import openai

    with pytest.raises(openai.BadRequestError, match="n other than 1"):
        openai_client.chat.completions.create(model="default", messages=QUESTION, n=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        openai_client.chat.completions.create(model="default", messages=[
            {"role": "user", "content": "word " * 1200}])
    stranger = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_disconnect_mid_stream_frees_the_slot(default_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "default", **LONG, "stream": True}
    with httpx.Client(base_url=default_server.url, headers=auth, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # got real text: hang up mid-reply
        # The stream's end is counted by the HTTP handler; its batch slot is freed by the scheduler at its
        # next step boundary (a forward later, slow on a busy machine): wait for both.
        deadline = time.monotonic() + 15
        while (metric(default_server.url, "kuaida_active_streams") > 0
               or metric(default_server.url, "kuaida_batch_size") > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(default_server.url, "kuaida_active_streams") == 0
        assert metric(default_server.url, "kuaida_batch_size") == 0
        decoded = metric(default_server.url, "kuaida_decoded_tokens_total")
        time.sleep(0.5)
        assert metric(default_server.url, "kuaida_decoded_tokens_total") == decoded  # nothing decodes on
        assert metric(default_server.url, 'kuaida_generations_total{reason="cancelled"}') >= 1
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up is cancelled too
            client.post("/v1/chat/completions", json={**body, "stream": False}, timeout=1.5)
        # The stream's end is counted by the HTTP handler; its batch slot is freed by the scheduler at its
        # next step boundary (a forward later, slow on a busy machine): wait for both.
        deadline = time.monotonic() + 15
        while (metric(default_server.url, "kuaida_active_streams") > 0
               or metric(default_server.url, "kuaida_batch_size") > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(default_server.url, 'kuaida_generations_total{reason="cancelled"}') >= 2
        reply = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 8})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0


def test_sigterm_ends_streams_cleanly(serve):
    server = serve("default", "--max-context", "1024", "--cache-mb", "64")
    body = {"model": "default", **LONG, "stream": True}
    events = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            events += sse_payloads([line])
            if len(events) == 3:
                server.proc.terminate()
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is -SIGTERM.
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    # The reply ends with a finish chunk and [DONE] either way: cancelled when the drain window (10 s)
    # closes ("stop": OpenAI clients know no "cancelled"), or run to max_tokens within it ("length").
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "Application shutdown complete" in server.log()


# -- the tiny model: durability, load, disconnects, fuzzing -------------------------------------------
def test_session_survives_kill9(serve, tiny_llama_dir, tmp_path):
    server = serve(str(tiny_llama_dir), "--dtype", "fp32", "--max-context", "256")
    sid = httpx.post(f"{server.url}/v1/sessions", json={"system": "Be brief."}).json()["id"]
    replies = []
    for text in ("Hello!", "How are you?"):
        r = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", json={"content": text, "max_tokens": 6})
        replies.append(r.json()["message"]["content"])
    with httpx.stream("POST", f"{server.url}/v1/sessions/{sid}/messages",
                      json={"content": "Tell me a joke.", "max_tokens": 6, "stream": True}) as r:
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "[DONE]"
    replies.append("".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]))
    server.kill9()

    again = serve(str(tiny_llama_dir), "--dtype", "fp32", "--max-context", "256")
    history = httpx.get(f"{again.url}/v1/sessions/{sid}").json()
    assert history["system"] == "Be brief."
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", "Hello!"), ("assistant", replies[0]), ("user", "How are you?"), ("assistant", replies[1]),
        ("user", "Tell me a joke."), ("assistant", replies[2])]
    r = httpx.post(f"{again.url}/v1/sessions/{sid}/messages", json={"content": "Thanks!", "max_tokens": 4})
    assert r.status_code == 200 and len(httpx.get(f"{again.url}/v1/sessions/{sid}").json()["messages"]) == 8


def _chat_client(url: str, turns: int, use_sessions: bool, results: list) -> None:
    """One user: `turns` streamed turns, through the session API or by resending the history."""
    with httpx.Client(base_url=url, timeout=60) as client:
        sid = client.post("/v1/sessions", json={}).json()["id"] if use_sessions else None
        history: list[dict] = []
        for turn in range(turns):
            history.append({"role": "user", "content": f"Question {turn}: what is the capital of France?"})
            if use_sessions:
                path, body = f"/v1/sessions/{sid}/messages", {"content": history[-1]["content"]}
            else:
                path, body = "/v1/chat/completions", {"model": "tiny", "messages": history}
            with client.stream("POST", path, json={**body, "max_tokens": 8, "stream": True}) as r:
                events = sse_payloads(r.iter_lines()) if r.status_code == 200 else []
                results.append((r.status_code, events[-1] if events else None))
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
            history.append({"role": "assistant", "content": text})


def test_concurrent_clients(tiny_server):
    results: list = []
    threads = [threading.Thread(target=_chat_client, args=(tiny_server.url, 4, i % 2 == 0, results))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 32
    assert all(status == 200 and last == "[DONE]" for status, last in results), results
    assert metric(tiny_server.url, "kuaida_active_streams") == 0
    assert metric(tiny_server.url, "kuaida_kv_cache_hits_total") > 0


def test_no_server_errors_under_fuzzing(tiny_server):
    """Schema-valid and schema-violating requests to every operation: 4xx are fine, 5xx are bugs."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{tiny_server.url}/openapi.json")
    failures, calls = [], []
    deadline = time.monotonic() + 60  # a budget, not a target: the run takes ~10 s here

    @settings(max_examples=15, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case):
        if time.monotonic() > deadline:
            return
        response = case.call(base_url=tiny_server.url, timeout=30)
        calls.append(response.status_code)
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}")
        case.validate_response(response, checks=[not_a_server_error])

    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                given(case=result.ok().as_strategy(generation_mode=mode))(fuzz)()
            except Unsatisfiable:  # negative mode on an operation without inputs: nothing to violate
                assert mode == GenerationMode.NEGATIVE
    assert not failures, failures
    assert len(calls) > 50 and any(400 <= c < 500 for c in calls) and 200 in calls
    assert "Traceback" not in tiny_server.log()
