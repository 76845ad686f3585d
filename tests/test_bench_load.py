"""`kuaida bench load` without a model: its statistics on hand-made samples, its SSE reader on a recorded
stream, and the whole client (threads, HTTP, report) against a small fake OpenAI server on 127.0.0.1."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kuaida.bench import load
from kuaida.bench.load import DONE, LoadSettings, Reply, Target
from kuaida.errors import InvalidArgumentError

# A stream as kuaida's server sends it (blank lines between events, a keep-alive comment, the extra
# `kuaida` object and the usage in the last chunk).
RECORDED = [
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"}}]}'
    b"\n",
    b"\n",
    b": keep-alive\n",
    b"\n",
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n',
    b"\n",
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo!"}}]}'
    b"\r\n",
    b"\r\n",
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":812,"completion_tokens":2,"total_tokens":814},'
    b'"kuaida":{"ttft_ms":41.0,"tokens_per_s":30.5,"cached_tokens":790}}\n',
    b"\n",
    b"data: [DONE]\n",
    b"\n",
]


class FakeClock:
    """Each call is one second later than the last, starting at 1."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_parse_sse_line():
    assert load.parse_sse_line(b"data: [DONE]\n") is DONE
    assert load.parse_sse_line("data: {\"a\": 1}\r\n") == {"a": 1}
    assert load.parse_sse_line(b"\n") is None
    assert load.parse_sse_line(b": keep-alive\n") is None
    assert load.parse_sse_line(b"event: message\n") is None


def test_read_stream_of_a_recorded_reply():
    reply = load.read_stream(RECORDED, Reply(turn=3, status=200), t0=0.0, clock=FakeClock())
    assert reply.text == "Hello!"
    assert reply.ttft_s == 1.0  # the clock's first reading: at the first content delta, not the role chunk
    assert (reply.tokens, reply.prompt_tokens, reply.cached_tokens) == (2, 812, 790)
    assert reply.finish_reason == "stop" and reply.done and reply.ok


def test_read_stream_without_done_is_an_error_and_counts_deltas_without_usage():
    lines = [line for line in RECORDED[:8]]  # cut after "lo!": no usage, no [DONE]
    reply = load.read_stream(lines, Reply(turn=1, status=200), t0=0.0, clock=FakeClock())
    assert reply.tokens == 2 and reply.prompt_tokens is None
    assert not reply.done and not reply.ok


def test_read_stream_interrupted_without_finish_reason_is_an_error():
    """What llama.cpp's server sends a stream it interrupts for a newer request: a role chunk, [DONE]."""
    lines = [RECORDED[0], b"\n", b"data: [DONE]\n"]
    reply = load.read_stream(lines, Reply(turn=1, status=200), t0=0.0)
    assert reply.done and reply.finish_reason is None and not reply.ok
    assert reply.problem() == "stream without a finish_reason (cut short)"


def test_read_stream_error_event():
    lines = [b'data: {"error": {"message": "generation failed: boom"}}\n', b"data: [DONE]\n"]
    reply = load.read_stream(lines, Reply(turn=1, status=200), t0=0.0)
    assert reply.error == "generation failed: boom" and not reply.ok


def test_percentiles_interpolate_between_samples():
    assert load.percentiles(list(range(1, 11))) == {"p50": 5.5, "p95": 9.5}
    assert load.percentiles([100.0, 100.0, 100.0, 400.0]) == {"p50": 100.0, "p95": 355.0}
    assert load.percentiles([]) == {"p50": None, "p95": None}


def ok(turn: int, ttft_s: float, tokens: int = 10, prompt: int | None = None, cached: int | None = None):
    return Reply(turn=turn, status=200, ttft_s=ttft_s, tokens=tokens, prompt_tokens=prompt,
                 cached_tokens=cached, finish_reason="stop", done=True)


def test_summarize_level_counts_errors_and_excludes_them_from_ttft():
    conversations = [
        [ok(1, 0.1, prompt=100), ok(2, 0.3, prompt=300)],
        [ok(1, 0.2, prompt=100), Reply(turn=2, status=200, ttft_s=9.0, tokens=4, prompt_tokens=310)],
        [Reply(turn=1, status=429, error="HTTP 429: busy"), ok(2, 0.4, prompt=320)],
    ]
    row = load.summarize_level("kuaida int8", conversations, wall_s=2.0)
    assert (row["clients"], row["requests"], row["errors"]) == (3, 6, 2)
    assert row["ttft_ms"] == {"p50": 250.0, "p95": 385.0}  # 100, 200, 300, 400 ms: the 9 s cut stream is out
    assert row["output_tokens"] == 44 and row["output_tok_s"] == 22.0  # the cut stream's 4 tokens count
    assert row["last_turn_history_tokens"] == 310
    assert "HTTP 429: busy" in row["error_examples"] and f"stream without {DONE}" in row["error_examples"]
    assert row["error_examples"] == sorted(row["error_examples"])


def test_add_speedups_is_per_server():
    rows = [{"variant": v, "clients": c, "output_tok_s": t}
            for v, c, t in [("a", 1, 10.0), ("a", 8, 35.0), ("b", 1, 50.0), ("b", 8, 50.0)]]
    load.add_speedups(rows)
    assert [r["speedup_vs_1_client"] for r in rows] == [1.0, 3.5, 1.0, 1.0]


def test_turn_curve_takes_medians_per_turn():
    conversations = [
        [ok(1, 0.10, prompt=200, cached=0), ok(2, 0.12, prompt=300, cached=250)],
        [ok(1, 0.30, prompt=220, cached=0), Reply(turn=2, status=500, error="HTTP 500")],
        [ok(1, 0.20, prompt=210, cached=0), ok(2, 0.16, prompt=320, cached=270)],
    ]
    curve = load.turn_curve(conversations)
    assert curve == [
        {"turn": 1, "ttft_ms": 200.0, "history_tokens": 210, "cached_tokens": 0, "n": 3,
         "ttft_ms_each": [100.0, 300.0, 200.0]},
        {"turn": 2, "ttft_ms": 140.0, "history_tokens": 310, "cached_tokens": 260, "n": 2,
         "ttft_ms_each": [120.0, 160.0]},
    ]


def test_check_targets_met_and_missed():
    on = [{"turn": 1, "ttft_ms": 100.0, "history_tokens": 250},
          {"turn": 10, "ttft_ms": 140.0, "history_tokens": 900}]
    off = [{"turn": 1, "ttft_ms": 300.0}, {"turn": 10, "ttft_ms": 1400.0}]
    rows = [{"variant": "k", "clients": 1, "errors": 0, "speedup_vs_1_client": 1.0},
            {"variant": "k", "clients": 8, "errors": 1, "speedup_vs_1_client": 3.4}]
    targets = load.check_targets(rows, {"on": on, "off": off}, "on", "off")
    assert targets["last_turn_history_tokens"] == {"value": 900, "target": ">= 800", "met": True}
    assert targets["last_turn_ttft_vs_turn_1"] == {"value": 1.4, "target": "<= 1.5", "met": True}
    assert targets["last_turn_ttft_reuse_speedup"] == {"value": 10.0, "target": ">= 5", "met": True}
    assert targets["8_clients_output_tok_s_vs_1"]["met"] is False  # fast enough, but one error
    unmeasured = load.check_targets(rows, {"on": on}, "on", "off")
    assert unmeasured["last_turn_ttft_reuse_speedup"]["met"] is None
    assert unmeasured["last_turn_ttft_vs_same_message_at_turn_1"]["value"] is None
    # Same user message as a first turn: the median of the per-conversation ratios (1.1, 1.5, 3.0).
    same = load.check_targets(rows, {"on": on}, "on", "off", [[110.0, 100.0], [90.0, 60.0], [60.0, 20.0]])
    assert same["last_turn_ttft_vs_same_message_at_turn_1"] == {"value": 1.5, "target": "reported",
                                                                 "met": True}
    # The same server with prompt lookup off: its own 8-client row against its own 1-client row.
    assert targets["8_clients_output_tok_s_vs_1_prompt_lookup_off"]["met"] is None  # not swept
    plain = [{"variant": "k, no lookup", "clients": 1, "errors": 0, "speedup_vs_1_client": 1.0},
             {"variant": "k, no lookup", "clients": 8, "errors": 0, "speedup_vs_1_client": 3.2}]
    both = load.check_targets(rows + plain, {"on": on}, "on", "off", None, "k, no lookup")
    assert both["8_clients_output_tok_s_vs_1_prompt_lookup_off"] == {
        "value": 3.2, "target": ">= 3, no errors (batching alone)", "met": True}
    assert both["8_clients_output_tok_s_vs_1"]["value"] == 3.4  # still the first server's rows


def test_scheduler_without_prefix_cache_prefills_every_prompt_whole(tiny_llama_dir):
    """The "reuse off" curve's server: a follow-up turn gets no cached tokens, and the same reply."""
    from kuaida.engine.sampling import SamplingParams
    from kuaida.engine.scheduler import Scheduler
    from kuaida.model.loader import load_model

    loaded = load_model(str(tiny_llama_dir))
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    texts = {}
    for reuse in (True, False):
        sched = Scheduler(loaded.model, loaded.tokenizer, {loaded.tokenizer.eos_token_id}, max_context=128,
                          cache_budget_mb=1, enable_prefix_cache=reuse).start()
        list(sched.submit([5, 6, 7, 8, 9, 10], greedy))
        follow = sched.submit([5, 6, 7, 8, 9, 10, 11, 12], greedy)
        texts[reuse] = "".join(follow)
        sched.stop()
        assert follow.stats.cached_tokens == (6 if reuse else 0)
        assert sched.metrics.prefilled_tokens == (6 + 2 if reuse else 6 + 8)
    assert texts[True] == texts[False]


def test_parse_clients():
    assert load.parse_clients("1, 2,4,8") == [1, 2, 4, 8]
    for bad in ("", "0,1", "a"):
        with pytest.raises(InvalidArgumentError):
            load.parse_clients(bad)


def test_user_sides_are_distinct_full_conversations():
    sides = load.user_sides(5, turns=10, seed=3)
    assert len(sides) == 5 and all(len(s) == 10 and all(s) for s in sides)
    assert len({tuple(s) for s in sides}) == 5
    assert sides == load.user_sides(5, turns=10, seed=3)


# -- the client against a fake server ---------------------------------------------------------------
class FakeOpenAI(BaseHTTPRequestHandler):
    """Streams "Hi there!" as three deltas; `mode` makes it refuse (429) or cut the stream."""
    mode = "ok"
    prompts: list[int] = []
    arrivals: list[float] = []  # time.monotonic() of each request

    def log_message(self, *args) -> None:
        pass  # keep pytest's output clean

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.arrivals.append(time.monotonic())
        if self.mode == "429":
            self.send_response(429)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "busy"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        history = sum(len(m["content"].split()) for m in body["messages"])
        FakeOpenAI.prompts.append(len(body["messages"]))
        for piece in ("Hi", " there", "!"):
            self.event({"choices": [{"index": 0, "delta": {"content": piece}}]})
            if self.mode == "cut":
                return
        self.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": history, "completion_tokens": 3}})
        self.wfile.write(b"data: [DONE]\n\n")

    def event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()


@pytest.fixture
def fake_server():
    FakeOpenAI.mode, FakeOpenAI.prompts, FakeOpenAI.arrivals = "ok", [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Target("fake", f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


def test_conversation_resends_growing_history(fake_server):
    replies = load.run_conversation(fake_server, ["one", "two", "three"], LoadSettings(turns=3))
    assert [r.text for r in replies] == ["Hi there!"] * 3 and all(r.ok for r in replies)
    assert FakeOpenAI.prompts == [2, 4, 6]  # system + user, then + assistant + user each turn
    assert replies[2].prompt_tokens > replies[0].prompt_tokens


def test_curve_user_thinks_between_turns_and_the_sweep_does_not(fake_server):
    report = load.run_load(url=fake_server.url, clients=[2], settings=LoadSettings(turns=3, think_s=0.2),
                           curve_runs=1, peers=False)
    gaps = [b - a for a, b in zip(FakeOpenAI.arrivals, FakeOpenAI.arrivals[1:])]
    # warm-up, then the curve: 3 turns and the last message alone, each >= 0.2 s after the previous reply
    assert all(g >= 0.2 for g in gaps[:4]) and len(gaps) > 4
    assert min(gaps[4:]) < 0.2  # the sweep: 2 clients at once, back to back
    assert report["settings"]["curve_think_s"] == 0.2
    assert "each request 0.2 s after the previous reply" in load.load_markdown(report)
    with pytest.raises(InvalidArgumentError):
        load.run_load(url=fake_server.url, clients=[1], settings=LoadSettings(think_s=-1), peers=False)


@pytest.mark.parametrize("mode, status", [("429", 429), ("cut", 200)])
def test_refused_and_cut_streams_are_errors(fake_server, mode, status):
    FakeOpenAI.mode = mode
    reply = load.chat_stream(fake_server, [{"role": "user", "content": "hi"}], LoadSettings(), turn=1)
    assert reply.status == status and not reply.ok


def test_unreachable_server_is_an_error():
    reply = load.chat_stream(Target("nobody", f"http://127.0.0.1:{load.free_port()}"),
                             [{"role": "user", "content": "hi"}], LoadSettings(timeout_s=5), turn=1)
    assert reply.status == 0 and reply.error and not reply.ok


def test_workload_one_client_replays_the_largest_level_up_to_8():
    work = load.Workload.make([1, 2, 8, 16], curve_runs=2, turns=3, seed=0)
    levels = {level.clients: level.conversations for level in work.levels}
    assert [level.clients for level in work.levels] == [1, 2, 8, 16]
    assert levels[1] == levels[8] and len(levels[8]) == 8 and len(levels[16]) == 16
    others = [tuple(map(tuple, c)) for c in (work.curve, levels[2], levels[8], levels[16])]
    assert len({conv for group in others for conv in group}) == 2 + 2 + 8 + 16  # otherwise disjoint
    alone = load.Workload.make([1, 16], curve_runs=1, turns=3, seed=0)
    assert [len(level.conversations) for level in alone.levels] == [1, 16]


def test_report_against_a_running_server(fake_server, tmp_path):
    report = load.run_load(url=fake_server.url, clients=[1, 2], settings=LoadSettings(turns=3),
                           curve_runs=2, peers=False)
    keys = {"benchmark", "machine", "model", "command", "settings", "results", "curves", "targets"}
    assert keys <= set(report)
    rows = [r for r in report["results"] if "skipped" not in r]
    assert [r["clients"] for r in rows] == [1, 2] and all(r["errors"] == 0 for r in rows)
    for key in ("requests", "ttft_ms", "output_tokens", "output_tok_s", "wall_s", "speedup_vs_1_client",
                "last_turn_history_tokens", "other_cpu_cores"):
        assert all(key in r for r in rows), key
    # One client replays the 2-client level's conversations one by one: the same requests.
    assert rows[0]["conversations"] == rows[1]["conversations"] == 2
    assert rows[0]["requests"] == rows[1]["requests"] == 6
    assert [p["turn"] for p in next(iter(report["curves"].values()))] == [1, 2, 3]
    assert {r["variant"] for r in report["results"] if "skipped" in r} == {
        f"server at {fake_server.url} (reuse off)", f"server at {fake_server.url}, prompt lookup off",
        load.LLAMACPP}
    assert set(report["targets"]) == {"last_turn_history_tokens", "last_turn_ttft_vs_turn_1",
                                      "last_turn_ttft_vs_same_message_at_turn_1",
                                      "last_turn_ttft_reuse_speedup", "8_clients_output_tok_s_vs_1",
                                      "8_clients_output_tok_s_vs_1_prompt_lookup_off"}
    # Each curve conversation's last message also went alone, as a first turn.
    assert len(report["same_message"][f"server at {fake_server.url} (reuse on)"]) == 2
    assert all(r["other_cpu_cores"] >= 0 for r in rows) and set(report["curves_other_cpu_cores"]) == {
        f"server at {fake_server.url} (reuse on)"}
    markdown = load.load_markdown(report)
    assert "## Time to first token by turn" in markdown and "## Targets" in markdown
    json.dumps(report)  # serializable as is
    pytest.importorskip("matplotlib")
    load.plot_load(report, tmp_path / "load.png")
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"


def test_kuaida_server_commands():
    """The servers `bench load` starts: reuse off for the no-reuse curve, prompt lookup off for the
    batching-alone sweep (flags `kuaida serve` accepts)."""
    base = load.kuaida_command("default", "int8", True, 8000)
    assert base[-2:] == ["--dtype", "int8"]
    assert load.kuaida_command("default", "int8", False, 8000)[-1] == "--no-prefix-cache"
    assert load.kuaida_command("default", "int8", True, 8000, lookup=False)[-1] == "--no-prompt-lookup"
    from typer.testing import CliRunner

    from kuaida.cli import app
    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    assert "--no-prefix-cache" in help_text and "--no-prompt-lookup" in help_text


def test_llamacpp_peer_queues_concurrent_requests_instead_of_aborting_them():
    """llama-cpp-python's server aborts the request in flight when another arrives unless told not to."""
    import argparse

    pytest.importorskip("llama_cpp.server.cli", reason="the llama.cpp peer is an optional extra")
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from kuaida.bench.load import llamacpp_command

    cmd = llamacpp_command(Path("m.gguf"), 8081, 4096)
    parser = argparse.ArgumentParser()
    add_args_from_model(parser, ModelSettings)
    add_args_from_model(parser, ServerSettings)
    args = parser.parse_args(cmd[3:])  # after: python -m llama_cpp.server
    assert parse_model_from_args(ServerSettings, args).interrupt_requests is False
    assert parse_model_from_args(ModelSettings, args).n_ctx == 4096


def test_typing_drafts_are_growing_prefixes_sent_before_the_message():
    from kuaida.bench.load import typing_drafts

    text = "What do you think about the new movie that came out last week?"
    drafts = typing_drafts(text, 3.0)
    times, typed = [t for t, _ in drafts], [d for _, d in drafts]
    assert times == sorted(times) and 0 < times[0] and times[-1] == pytest.approx(2.75)
    assert all(text.startswith(d) for d in typed) and len(set(typed)) == 3
    assert typed[-1].rsplit(" ", 1)[0] == text.rsplit(" ", 1)[0]  # every word but the last, the last begun
    assert typing_drafts("Hi", 3.0) == [] and typing_drafts(text, 0.0) == []
