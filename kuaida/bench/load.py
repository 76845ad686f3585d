"""`kuaida bench load`: concurrent chat clients against an OpenAI-compatible server, as users load it.

Each client holds a multi-turn conversation: its user turns are one speaker's side of a real
`chitchat-dataset` dialogue, and every turn resends the whole history (system prompt, earlier turns and
the server's own replies) through `POST /v1/chat/completions` with `stream: true` — what a plain OpenAI
client does. Per request it measures the time from sending to the first content delta (TTFT, as the
user sees it: network, queue and prefill) and the tokens streamed; a request is an error when the status
is not 200, the connection breaks, or the stream lacks a finish_reason or the final `data: [DONE]`.

Two measurements, on servers this command starts on 127.0.0.1 (or on `--url`):
- the sweep: 1, 2, 4, ... clients at once -> TTFT p50/p95, aggregate output tokens/s, errors;
- the turn curve: conversations run one at a time -> median TTFT at each turn, with prefix reuse on and
  off (`kuaida serve --no-prefix-cache`), and llama.cpp's server on the same load when installed.
Every level uses conversations no other level used, so no level finds its prompts cached by another.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
import psutil

from kuaida.bench.report import MISSING, Column, cell, fixed, make_report, markdown
from kuaida.errors import InvalidArgumentError, KuaidaError

log = logging.getLogger(__name__)

TITLE = "kuaida bench load"
THREADS = 2
LLAMACPP = "llama.cpp server"
DONE = "[DONE]"
# A fixed persona, as a product would deploy one: it makes every prompt start with the same ~200
# tokens and, with ~64-token replies, takes a 10-turn conversation past 800 tokens of history.
SYSTEM_PROMPT = (
    "You are Kuai, a warm and curious conversation partner in a casual chat app. You talk with people "
    "about their day, their hobbies, films, books, music, food, travel, sports, pets, work and school. "
    "Keep the conversation going: answer what was said, share a short opinion or a small personal-sounding "
    "anecdote, and ask one friendly follow-up question. Write two to four sentences in plain, everyday "
    "English, without lists, headings or emoji. Remember what the person told you earlier in the "
    "conversation and refer back to it when it fits, so they feel listened to. If they seem sad or "
    "stressed, be kind and encouraging, but do not give medical, legal or financial advice; suggest "
    "talking to someone they trust instead. If you do not know something, say so honestly rather than "
    "making it up. Never mention that you are following instructions, and never repeat this text. Match "
    "the person's mood: be playful when they joke, calm when they are serious, and brief when they are "
    "brief. Avoid controversial topics unless the person brings them up, and then stay balanced. "
    "About yourself: you grew up in a small town by the sea, you love long walks with your old dog, "
    "you bake bread on Sundays, you play the guitar badly but happily, and you are slowly reading your "
    "way through classic adventure novels. You enjoy science documentaries, board games with friends, "
    "and trying food from places you have never been. You are not an expert in anything, but you are "
    "interested in everything, and you like to learn from the people you talk to. When someone asks "
    "for a recommendation, give one or two concrete ideas and say briefly why you like them. When the "
    "conversation slows down, bring up something light from earlier, or ask about their plans for the "
    "weekend. Never pretend to have done things you could not have done, like meeting them in person. "
    "Keep every reply short enough to read on a phone screen without scrolling."
)

COLUMNS = [
    Column("server", "variant"),
    Column("clients", "clients"),
    Column("conversations", "conversations"),
    Column("requests", "requests"),
    Column("errors", "errors"),
    Column("TTFT ms p50", "ttft_ms.p50", fixed(0)),
    Column("TTFT ms p95", "ttft_ms.p95", fixed(0)),
    Column("output tok/s (all clients)", "output_tok_s", fixed(1)),
    Column("× 1 client", "speedup_vs_1_client", lambda v: f"{v:.2f}×"),
    Column("history tokens (last turn, median)", "last_turn_history_tokens"),
    Column("other CPU (cores)", "other_cpu_cores", fixed(2)),
]


# -- one streamed request --------------------------------------------------------------------------
@dataclass
class Reply:
    """One request's outcome, as the client saw it."""
    turn: int  # 1-based position in its conversation
    status: int = 0  # HTTP status; 0 when no response arrived
    ttft_s: float | None = None  # send -> first content delta
    tokens: int = 0  # completion tokens: the server's usage when it reports it, else content deltas
    prompt_tokens: int | None = None  # history the request carried, when the server reports it
    cached_tokens: int | None = None  # of which the server reused its KV cache (kuaida's extra field)
    finish_reason: str | None = None  # every complete OpenAI stream has one ("stop", "length")
    done: bool = False  # the stream ended with data: [DONE]
    error: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.finish_reason is not None and self.error is None

    def problem(self) -> str:
        """Why the request failed, in a few words (for the report's error examples)."""
        if self.error:
            return self.error
        return f"stream without {DONE}" if not self.done else "stream without a finish_reason (cut short)"


def parse_sse_line(line: bytes | str) -> dict[str, Any] | str | None:
    """One line of a server-sent-event stream -> its JSON payload, DONE, or None (blank, comment,
    other field)."""
    text = line.decode() if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    if not text.startswith("data:"):
        return None
    data = text[5:].strip()
    return DONE if data == DONE else json.loads(data)


def read_stream(lines: Iterable[bytes | str], reply: Reply, t0: float,
                clock: Callable[[], float] = time.perf_counter) -> Reply:
    """Consume a chat.completion.chunk stream into `reply` (text, TTFT from `t0`, tokens, finish
    reason, done)."""
    deltas, usage, extra = 0, {}, {}
    for line in lines:
        event = parse_sse_line(line)
        if event is DONE:
            reply.done = True
            break
        if not isinstance(event, dict):
            continue
        if "error" in event:
            reply.error = str(event["error"].get("message", event["error"]))
        choice = (event.get("choices") or [{}])[0]
        reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
        content = (choice.get("delta") or {}).get("content")
        if content:
            if reply.ttft_s is None:
                reply.ttft_s = clock() - t0
            reply.text += content
            deltas += 1
        usage = event.get("usage") or usage
        extra = event.get("kuaida") or extra
    reply.tokens = usage.get("completion_tokens") or deltas
    reply.prompt_tokens = usage.get("prompt_tokens") or extra.get("prompt_tokens")
    reply.cached_tokens = extra.get("cached_tokens")
    return reply


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible server under test."""
    name: str
    url: str  # http://127.0.0.1:PORT
    api_key: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80


@dataclass(frozen=True)
class LoadSettings:
    turns: int = 10
    reply_tokens: int = 64
    temperature: float = 0.0  # greedy: replies (and so history lengths) repeat from run to run
    timeout_s: float = 300.0  # one request, socket inactivity included
    # The turn curve's user reads each reply and types for this long before the next request (the
    # concurrency sweep stays back to back: it measures the server at full load).
    think_s: float = 0.0
    # ... and, with type_ahead, sends drafts of the message it types meanwhile (POST /v1/chat/drafts), as
    # the web chat does at each pause in typing (typing_drafts).
    type_ahead: bool = False


def request_headers(target: Target, **more: str) -> dict[str, str]:
    """A JSON request's headers for `target` (its bearer key, if it has one), plus `more`."""
    headers = {"Content-Type": "application/json", **more}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    return headers


def chat_stream(target: Target, messages: list[dict[str, str]], settings: LoadSettings, turn: int,
                extra: dict[str, Any] | None = None) -> Reply:
    """POST one streaming chat completion and time it (`extra`: more body fields, e.g. kuaida's
    `knowledge`)."""
    body = {"model": "default", "messages": messages, "stream": True, "max_tokens": settings.reply_tokens,
            "temperature": settings.temperature, "stream_options": {"include_usage": True}, **(extra or {})}
    headers = request_headers(target, Accept="text/event-stream")
    reply = Reply(turn=turn)
    conn = http.client.HTTPConnection(*target.address, timeout=settings.timeout_s)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        reply.status = response.status
        if response.status != 200:
            reply.error = f"HTTP {response.status}: {response.read(300).decode(errors='replace')}"
            return reply
        return read_stream(response, reply, t0)
    except (OSError, http.client.HTTPException, ValueError) as e:  # dropped stream, timeout, bad JSON
        reply.error = f"{type(e).__name__}: {e}"
        return reply
    finally:
        conn.close()


def post_draft(target: Target, messages: list[dict[str, str]], extra: dict[str, Any] | None = None,
               timeout_s: float = 30.0) -> int | None:
    """POST /v1/chat/drafts (kuaida's; `extra`: e.g. the `knowledge` the completion will carry) -> the
    prompt tokens the server will write ahead, or None when it failed (a server without drafts, say: the
    user's typing goes on regardless)."""
    headers = request_headers(target)
    conn = http.client.HTTPConnection(*target.address, timeout=timeout_s)
    try:
        conn.request("POST", "/v1/chat/drafts", json.dumps({"messages": messages, **(extra or {})}), headers)
        response = conn.getresponse()
        body = response.read()
        return json.loads(body)["prompt_tokens"] if response.status == 202 else None
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return None
    finally:
        conn.close()


def typing_drafts(text: str, think_s: float) -> list[tuple[float, str]]:
    """What a user typing `text` over `think_s` seconds has typed at three pauses: (seconds after the
    reply, text so far) at a third and two thirds of the time (a third and two thirds of the words, with
    the next word begun), and 0.25 s before sending (every word but the last, the last begun)."""
    words = text.split(" ")
    if len(words) < 2 or think_s <= 0:
        return []
    out = []
    for at, k in ((think_s / 3, len(words) // 3), (2 * think_s / 3, 2 * len(words) // 3),
                  (max(2 * think_s / 3, think_s - 0.25), len(words) - 1)):
        if k >= 1 and (not out or k > out[-1][2]):
            out.append((at, " ".join(words[:k]) + " " + words[k][:2], k))
    return [(at, typed) for at, typed, _ in out]


def think_and_type(target: Target, messages: list[dict[str, str]], text: str, think_s: float,
                   type_ahead: bool, extra: dict[str, Any] | None = None) -> None:
    """The user's pause before sending `text` after `messages`: `think_s` seconds, during which (with
    `type_ahead`) the drafts of typing_drafts are posted at their times (with `extra`: post_draft)."""
    start = time.perf_counter()
    for at, typed in typing_drafts(text, think_s) if type_ahead else ():
        time.sleep(max(0.0, start + at - time.perf_counter()))
        post_draft(target, [*messages, {"role": "user", "content": typed}], extra)
    time.sleep(max(0.0, start + think_s - time.perf_counter()))


def run_conversation(target: Target, user_turns: list[str], settings: LoadSettings,
                     think_s: float = 0.0) -> list[Reply]:
    """One client: each turn resends the growing history and appends the streamed reply to it (after
    `think_s` seconds, from the second turn on; with settings.type_ahead, from the first, typing drafts
    meanwhile)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    replies = []
    for turn, text in enumerate(user_turns[:settings.turns], 1):
        if turn > 1 or settings.type_ahead:
            think_and_type(target, messages, text, think_s, settings.type_ahead)
        messages.append({"role": "user", "content": text})
        reply = chat_stream(target, messages, settings, turn)
        replies.append(reply)
        # A failed turn keeps what arrived (or a placeholder: servers reject empty messages), so the
        # conversation, and the load, go on as a user's would.
        messages.append({"role": "assistant", "content": reply.text or "..."})
    return replies


def run_clients(target: Target, conversations: list[list[str]], settings: LoadSettings
                ) -> tuple[list[list[Reply]], float]:
    """All conversations at once, one thread each -> their replies and the wall time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(conversations)) as pool:
        results = list(pool.map(lambda turns: run_conversation(target, turns, settings), conversations))
    return results, time.perf_counter() - t0


# -- aggregation -----------------------------------------------------------------------------------
def percentiles(values: list[float], qs: Iterable[int] = (50, 95)) -> dict[str, float | None]:
    """{'p50': ..., 'p95': ...} with linear interpolation between samples (numpy's default)."""
    return {f"p{q}": (round(float(np.percentile(values, q)), 1) if values else None) for q in qs}


def median_or_none(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def summarize_level(name: str, conversations: list[list[Reply]], wall_s: float,
                    clients: int | None = None) -> dict[str, Any]:
    """One concurrency level -> its table row (clients: default one per conversation). Tokens count every
    reply's delivered tokens, failed ones included: they were generated and streamed within the wall
    time."""
    replies = [r for conv in conversations for r in conv]
    ok = [r for r in replies if r.ok]
    tokens = sum(r.tokens for r in replies)
    last = [conv[-1].prompt_tokens for conv in conversations if conv and conv[-1].prompt_tokens]
    errors = [r.problem() for r in replies if not r.ok]
    return {"variant": name, "clients": clients or len(conversations), "conversations": len(conversations),
            "requests": len(replies), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3],
            "ttft_ms": percentiles([r.ttft_s * 1000 for r in ok if r.ttft_s is not None]),
            "output_tokens": tokens, "wall_s": round(wall_s, 2),
            "output_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
            "last_turn_history_tokens": int(np.median(last)) if last else None,
            "speedup_vs_1_client": None}


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_1_client: output tok/s over the same server's one-client output tok/s."""
    for row in rows:
        base = next((r for r in rows if r["variant"] == row["variant"] and r.get("clients") == 1), None)
        if base and base.get("output_tok_s") and row.get("output_tok_s"):
            row["speedup_vs_1_client"] = round(row["output_tok_s"] / base["output_tok_s"], 2)


def turn_curve(conversations: list[list[Reply]]) -> list[dict[str, Any]]:
    """Per turn index: median TTFT over the successful replies, median history and cached tokens."""
    curve = []
    for turn in range(1, max((len(c) for c in conversations), default=0) + 1):
        at = [c[turn - 1] for c in conversations if len(c) >= turn and c[turn - 1].ok]
        ttft = median_or_none([r.ttft_s * 1000 for r in at if r.ttft_s is not None])
        history = median_or_none([r.prompt_tokens for r in at if r.prompt_tokens is not None])
        cached = median_or_none([r.cached_tokens for r in at if r.cached_tokens is not None])
        curve.append({"turn": turn, "ttft_ms": None if ttft is None else round(ttft, 1),
                      "history_tokens": None if history is None else int(history),
                      "cached_tokens": None if cached is None else int(cached), "n": len(at),
                      "ttft_ms_each": [round(r.ttft_s * 1000, 1) for r in at if r.ttft_s is not None]})
    return curve



def goal(value: float | None, wanted: str, met: bool | None) -> dict[str, Any]:
    return {"value": value, "target": wanted, "met": met}


def check_targets(rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]],
                  on: str, off: str, same_message: list[list[float]] | None = None,
                  without_lookup: str | None = None) -> dict[str, dict[str, Any]]:
    """The goals kuaida is held to, each with the measured value and whether it is met (met is None
    when this run did not measure it). `rows[0]` names the server under test. `same_message`: per curve
    conversation, its last turn's TTFT and that user message's TTFT as a first turn (reported beside
    the target, which compares turn 1 and turn 10 as they come, whatever their messages' lengths)."""
    on_curve, off_curve = curves.get(on) or [], curves.get(off) or []
    first = on_curve[0]["ttft_ms"] if on_curve else None
    last = on_curve[-1]["ttft_ms"] if on_curve else None
    last_off = off_curve[-1]["ttft_ms"] if off_curve else None
    history = on_curve[-1]["history_tokens"] if on_curve else None
    growth = round(last / first, 2) if last and first else None
    reuse = round(last_off / last, 2) if last and last_off else None
    def eight_clients(variant: str | None) -> tuple[float | None, dict[str, Any] | None]:
        row = next((r for r in rows if r["variant"] == variant and r.get("clients") == 8), None)
        return (row.get("speedup_vs_1_client") if row else None), row

    scale, eight = eight_clients(rows[0]["variant"] if rows else None)
    plain_scale, plain_eight = eight_clients(without_lookup)
    same = median_or_none([last_ms / alone_ms for last_ms, alone_ms in same_message or [] if alone_ms > 0])
    return {
        "last_turn_history_tokens": goal(history, ">= 800", None if history is None else history >= 800),
        "last_turn_ttft_vs_turn_1": goal(growth, "<= 1.5", None if growth is None else growth <= 1.5),
        "last_turn_ttft_vs_same_message_at_turn_1": goal(None if same is None else round(same, 2),
                                                          "reported", None if same is None else True),
        "last_turn_ttft_reuse_speedup": goal(reuse, ">= 5", None if reuse is None else reuse >= 5),
        "8_clients_output_tok_s_vs_1": goal(scale, ">= 3, no errors",
                                            None if scale is None else scale >= 3 and eight["errors"] == 0),
        "8_clients_output_tok_s_vs_1_prompt_lookup_off": goal(
            plain_scale, ">= 3, no errors (batching alone)",
            None if plain_scale is None else plain_scale >= 3 and plain_eight["errors"] == 0),
    }


# -- the workload ----------------------------------------------------------------------------------
def user_sides(n: int, turns: int, seed: int = 0) -> list[list[str]]:
    """`n` distinct chitchat conversations with at least `turns` turns by their first speaker -> that
    speaker's first `turns` turns (the user side; the server writes the other)."""
    import random

    from kuaida.bench.prompts import conversation_turns, load_conversations

    dataset = load_conversations()
    ids = sorted(dataset)  # the pick depends on the seed only, not on the dataset file's order
    random.Random(seed).shuffle(ids)
    picked = []
    for cid in ids:
        user = conversation_turns(dataset[cid])[0::2][:turns]
        if len(user) == turns and all(user):
            picked.append(user)
            if len(picked) == n:
                return picked
    raise InvalidArgumentError(f"only {len(picked)} chitchat conversations have {turns} turns by one "
                               f"speaker; ask for fewer turns or clients")


BASELINE_CONVERSATIONS = 8  # the one-client level replays the 8-client level's conversations, one by one


@dataclass
class Level:
    """One row of the sweep: `clients` concurrent clients over `conversations`. The one-client level holds
    more conversations than clients: its client runs them one after another."""
    clients: int
    conversations: list[list[str]]


@dataclass
class Workload:
    """Conversations for the turn curve and for each concurrency level of the sweep.

    Levels of several clients get disjoint conversations. The one-client level replays the conversations
    of the largest level of at most 8 clients (BASELINE_CONVERSATIONS), one after another: "N clients
    against one" then compares the same requests served one at a time and at once. (One conversation as
    the baseline made the ratio hinge on that conversation: a user whose replies end after 6 tokens
    spends most of its time waiting for first tokens, and its tok/s, which divides every level's, is low.)"""
    curve: list[list[str]]
    levels: list[Level] = field(default_factory=list)

    @classmethod
    def make(cls, clients: list[int], curve_runs: int, turns: int, seed: int) -> Workload:
        shared = [c for c in clients if 1 < c <= BASELINE_CONVERSATIONS]
        replay = max(shared, default=None)
        alone = 1 if 1 in clients and replay is None else 0  # then one client has a conversation of its own
        pool = user_sides(curve_runs + sum(c for c in clients if c > 1) + alone, turns, seed)
        start, by_clients = curve_runs, {}
        for c in clients:
            if c > 1 or alone:
                by_clients[c] = pool[start:start + c]
                start += c
        levels = [Level(c, by_clients[replay] if c == 1 and not alone else by_clients[c]) for c in clients]
        return cls(pool[:curve_runs], levels)


class OtherCpu:
    """CPU that other processes used while the block ran, in cores (0.5: half a core on average), so a
    run on a shared machine shows its competition. This process and its children (the clients and the
    servers this command started) are left out; a server at --url counts as other."""

    cores: float | None = None

    @staticmethod
    def busy_s() -> float:
        t = psutil.cpu_times()  # all CPUs together
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    @staticmethod
    def own_s() -> float:
        me = psutil.Process()
        t = me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system  # children_*: those already reaped
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # it exited meanwhile
                total += sum(child.cpu_times()[:2])  # user, system
        return total

    def __enter__(self) -> OtherCpu:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self.busy_s(), self.own_s()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        other = (self.busy_s() - self.busy0) - (self.own_s() - self.own0)
        self.cores = round(max(0.0, other) / wall, 2) if wall > 0 else None


@dataclass
class Measured:
    rows: list[dict[str, Any]]  # one per concurrency level
    curve: list[dict[str, Any]] | None  # TTFT by turn
    curve_other_cpu: float | None = None  # see OtherCpu
    # Per curve conversation: [TTFT ms of its last turn, TTFT ms of that turn's user message sent as turn 1
    # of a new conversation]: the same new tokens with and without the long history.
    same_message: list[list[float]] = field(default_factory=list)


def measure(target: Target, work: Workload, settings: LoadSettings, sweep: bool,
            progress: Callable[[str], None], curve: bool = True) -> Measured:
    """Warm up, run the turn curve (one conversation at a time; unless not `curve`), then the sweep."""
    progress(f"{target.name}: warm-up")
    run_conversation(target, ["Hi! How is your day going?"], settings)  # first-call allocations, untimed
    replies, same_message = [], []
    with OtherCpu() as curve_cpu:
        for i, conversation in enumerate(work.curve if curve else []):
            progress(f"{target.name}: turn curve, conversation {i + 1}/{len(work.curve)}")
            if not settings.type_ahead:  # (a typing user's first turn comes after think_s of typing)
                time.sleep(settings.think_s)  # after the previous conversation's last reply
            replies.append(run_conversation(target, conversation, settings, settings.think_s))
            # Turn 1 and the last turn of a conversation differ in their user message's length, and the
            # tokens to prefill dominate TTFT: also time the last message alone, as a new conversation's
            # first turn, to isolate what the history costs.
            last = replies[-1][-1] if replies[-1] else None
            time.sleep(settings.think_s)
            alone = run_conversation(target, [conversation[len(replies[-1]) - 1]], settings)[0]
            if last is not None and last.ok and alone.ok and last.ttft_s and alone.ttft_s:
                same_message.append([round(last.ttft_s * 1000, 1), round(alone.ttft_s * 1000, 1)])
    rows = []
    for level in work.levels if sweep else []:
        with OtherCpu() as cpu:
            if level.clients == 1:
                progress(f"{target.name}: 1 client, {len(level.conversations)} conversations one by one")
                results, wall = [], 0.0
                for conversation in level.conversations:
                    done, seconds = run_clients(target, [conversation], settings)
                    results += done
                    wall += seconds
            else:
                progress(f"{target.name}: {level.clients} concurrent clients")
                results, wall = run_clients(target, level.conversations, settings)
        rows.append({**summarize_level(target.name, results, wall, level.clients),
                     "other_cpu_cores": cpu.cores})
    return Measured(rows, turn_curve(replies) if curve else None, curve_cpu.cores, same_message)


# -- servers on 127.0.0.1 --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kuaida_command(model: str, dtype: str, prefix_cache: bool, port: int, lookup: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "kuaida.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype]
    return cmd + ([] if prefix_cache else ["--no-prefix-cache"]) + ([] if lookup else ["--no-prompt-lookup"])


def llamacpp_command(gguf: Path, port: int, context: int) -> list[str]:
    # --interrupt_requests False: by default llama-cpp-python's server aborts the request in flight when
    # another one arrives (earlier runs: 79 of 80 requests failed at 8 clients); queued, each is served.
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(context), "--n_threads", str(THREADS),
            "--n_threads_batch", str(THREADS), "--interrupt_requests", "False"]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    """Poll `url` until it answers 200; fail early, with the server's last words, if it exits."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise KuaidaError(f"the server exited with status {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        time.sleep(0.5)
    raise KuaidaError(f"no answer from {url} within {timeout_s:.0f} s; see {log_path}")


@contextlib.contextmanager
def serving(name: str, cmd: list[str], port: int, health: str, log_dir: Path,
            ready_timeout_s: float = 900.0, env: dict[str, str] | None = None) -> Iterator[Target]:
    """Run a server process for the duration of the block (its output goes to a log file), with `env`
    added to its environment."""
    log_path = log_dir / f"server-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    log.info("starting %s: %s", name, shlex.join(cmd))
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + health, proc, ready_timeout_s, log_path)
        yield Target(name, url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the benchmark ---------------------------------------------------------------------------------
def peer_skip_reason(model: str) -> str | None:
    """Why llama.cpp's server cannot run on this model here (None when it can)."""
    import importlib.util

    from kuaida.bench.latency import gguf_for
    from kuaida.bench.peers import llamacpp_missing

    if gguf_for(model) is None:
        return "llama.cpp needs a .gguf model"
    if reason := llamacpp_missing():
        return reason
    missing = [m for m in ("sse_starlette", "starlette_context") if importlib.util.find_spec(m) is None]
    if missing:
        return f"its server needs {', '.join(missing)}: pip install 'llama-cpp-python[server]'"
    return None

def start_server(label: str, command: Callable[[int], list[str]], health: str, log_dir: Path):
    """`serving` on a free port: command(port) -> the server's command line."""
    port = free_port()
    return serving(label, command(port), port, health, log_dir)


def run_peer(model: str, context: int, work: Workload, settings: LoadSettings, log_dir: Path,
             progress: Callable[[str], None]) -> Measured:
    """llama.cpp's OpenAI server under the same load -> its rows and curve (a skipped row if it cannot
    run here: a peer that fails to start does not fail the benchmark)."""
    from kuaida.bench.latency import gguf_for

    reason = peer_skip_reason(model)
    if reason is None:
        command = functools.partial(llamacpp_command, gguf_for(model), context=context)
        try:
            with start_server(LLAMACPP, command, "/v1/models", log_dir) as target:
                return measure(target, work, settings, True, progress)
        except KuaidaError as e:
            reason = f"did not start: {str(e).splitlines()[0]}"
    return Measured([{"variant": LLAMACPP, "skipped": reason}], None)


def run_load(url: str | None = None, model: str = "default", dtype: str = "int8",
             clients: Sequence[int] = (1, 2, 4, 8, 16), settings: LoadSettings = LoadSettings(),
             curve_runs: int = 2, peers: bool = True, api_key: str | None = None, seed: int = 0,
             context: int = 4096, progress: Callable[[str], None] | None = None,
             without_lookup: bool = True) -> dict[str, Any]:
    """Measure kuaida's server (started here, or the one at `url`) and its peer; -> the report.

    without_lookup: also sweep the clients with a server whose prompt lookup is off. Lookup speeds one
    greedy stream up by filling the decode step's spare rows with drafts; many streams fill those rows
    themselves, so with lookup on, "N clients against one" measures lookup as much as batching. The
    lookup-off sweep measures continuous batching alone."""
    if not clients or min(clients) < 1 or settings.turns < 1 or curve_runs < 1:
        raise InvalidArgumentError("use at least 1 client per level, 1 turn and 1 curve conversation")
    if settings.think_s < 0:
        raise InvalidArgumentError(f"--think-s must be 0 or more (got {settings.think_s})")
    if settings.type_ahead and settings.think_s < 0.5:
        raise InvalidArgumentError("--type-ahead needs a user who types: --think-s 0.5 or more")
    progress = progress or (lambda step: log.info("%s", step))
    work = Workload.make(list(clients), curve_runs, settings.turns, seed)
    name = f"server at {url}" if url else f"kuaida {dtype}"
    on, off = f"{name} (reuse on)", f"{name} (reuse off)"
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    curve_cpu: dict[str, float | None] = {}
    same_message: dict[str, list[list[float]]] = {}

    def add(result: Measured, curve: str) -> None:
        rows.extend(result.rows)
        if result.curve is not None:
            curves[curve], curve_cpu[curve] = result.curve, result.curve_other_cpu
            same_message[curve] = result.same_message

    with tempfile.TemporaryDirectory(prefix="kuaida-load-") as tmp:
        if url:
            add(measure(Target(name, url.rstrip("/"), api_key), work, settings, True, progress), on)
            reason = "needs a server this command starts (no --url)"
            add(Measured([{"variant": off, "skipped": reason}], None), off)
        else:
            for curve, reuse in ((on, True), (off, False)):  # the no-reuse server only draws its curve
                command = functools.partial(kuaida_command, model, dtype, reuse)
                with start_server(curve, command, "/health", Path(tmp)) as target:
                    add(measure(dataclasses.replace(target, name=name), work, settings, reuse, progress),
                        curve)
        plain = f"{name}, prompt lookup off"
        if without_lookup and not url:
            command = functools.partial(kuaida_command, model, dtype, True, lookup=False)
            with start_server(plain, command, "/health", Path(tmp)) as target:
                add(measure(dataclasses.replace(target, name=plain), work, settings, True, progress,
                            curve=False), plain)
        elif without_lookup:
            add(Measured([{"variant": plain, "skipped": "needs a server this command starts (no --url)"}],
                         None), plain)
        skip = Measured([{"variant": LLAMACPP, "skipped": "not asked for (--no-peers)"}], None)
        add(run_peer(model, context, work, settings, Path(tmp), progress) if peers else skip, LLAMACPP)
    add_speedups(rows)
    run_settings = {"clients": list(clients), "turns": settings.turns, "reply_tokens": settings.reply_tokens,
                    "temperature": settings.temperature, "curve_conversations": curve_runs, "seed": seed,
                    "dtype": dtype, "url": url, "context": context,
                    "system_prompt_words": len(SYSTEM_PROMPT.split()),
                    "request_timeout_s": settings.timeout_s, "curve_think_s": settings.think_s,
                    "curve_type_ahead": settings.type_ahead}
    report = make_report("load", model, run_settings, rows, THREADS)
    report["curves"], report["curves_other_cpu_cores"] = curves, curve_cpu
    report["same_message"] = same_message
    report["targets"] = check_targets([r for r in rows if "skipped" not in r], curves, on, off,
                                      same_message.get(on), plain)
    return report


def parse_clients(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise InvalidArgumentError(f"--clients takes a comma list of positive counts, e.g. 1,2,4,8 "
                                   f"(got {text!r})")
    return values


# -- outputs: Markdown (tables via kuaida.bench.report) and a PNG plot ------------------------------
def table(rows: list[dict[str, Any]], columns: list[Column]) -> list[str]:
    return ["| " + " | ".join(c.header for c in columns) + " |",
            "| " + " | ".join("---" for _ in columns) + " |",
            *("| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows)]


def curve_table(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One row per turn, for each curve its median TTFT, history and (when reported) cached tokens."""
    names = list(curves)
    turns = max((len(c) for c in curves.values()), default=0)
    rows = [{"turn": t, **{f"c{i}": curves[n][t - 1] for i, n in enumerate(names) if len(curves[n]) >= t}}
            for t in range(1, turns + 1)]
    columns = [Column("turn", "turn")]
    for i, n in enumerate(names):
        columns += [Column(f"{n}: TTFT ms", f"c{i}.ttft_ms", fixed(0)),
                    Column("history tokens", f"c{i}.history_tokens")]
        if any(p.get("cached_tokens") is not None for p in curves[n]):
            columns.append(Column("cached tokens", f"c{i}.cached_tokens"))
    return table(rows, columns)


def same_message_lines(same_message: dict[str, list[list[float]]]) -> list[str]:
    """Each curve conversation's last-turn TTFT beside its user message's TTFT as a first turn."""
    lines = []
    for name, pairs in same_message.items():
        if pairs:
            each = ", ".join(f"{a:.0f} / {b:.0f}" for a, b in pairs)
            lines += [f"{name}, last turn / the same user message as a new conversation's first turn, TTFT "
                      f"ms per conversation: {each}", ""]
    return lines


def load_markdown(report: dict[str, Any]) -> str:
    lines = [markdown(report, COLUMNS, TITLE),
             ("One client runs its conversations one after another: the conversations of the largest level "
              f"of at most {BASELINE_CONVERSATIONS} clients, so × 1 client compares the same requests served "
              "one at a time and at once. Output tok/s counts every delivered token over the level's wall "
              "time (time to first token included)."), "", "## Time to first token by turn", "",
             ("Median over the turn-curve conversations, run one at a time"
              + (f", each request {think:g} s after the previous reply (a user reading and typing"
                 + ("; drafts of the message sent at a third, two thirds and 0.25 s before the end of that "
                    "time, as the web chat sends them: POST /v1/chat/drafts)"
                    if report["settings"].get("curve_type_ahead") else ")")
                 if (think := report["settings"].get("curve_think_s"))
                 else ", each request as soon as the previous reply ended")
              + "; history tokens = the prompt the server reported for that turn."),
             "", *curve_table(report["curves"]), "",
             "Other processes' CPU while the curves ran (cores): " + ", ".join(
                 f"{name} {cores}" for name, cores in report["curves_other_cpu_cores"].items()),
             "", *same_message_lines(report.get("same_message") or {}), "## Targets", ""]
    for key, t in report["targets"].items():
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        if t["target"] == "reported" and t["value"] is not None:
            verdict = "reported"
        value = MISSING if t["value"] is None else t["value"]
        lines.append(f"- {key}: {value} (target {t['target']}): {verdict}")
    return "\n".join(lines) + "\n"


def plot_load(report: dict[str, Any], path: str | Path) -> None:
    """TTFT vs turn for each curve (log scale: without reuse it grows by an order of magnitude), and
    output tok/s vs concurrent clients for each server."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (by_turn, by_clients) = plt.subplots(1, 2, figsize=(12, 4.6))
    # One colour per server on both panels; its no-reuse curve dashed.
    colors = {name: f"C{i}" for i, name in enumerate(report["curves"])}
    for name, curve in report["curves"].items():
        points = [(p["turn"], p["ttft_ms"]) for p in curve if p["ttft_ms"]]
        by_turn.plot(*zip(*points), marker="o", label=name, color=colors[name],
                     linestyle="--" if "reuse off" in name else "-")
    first = next(iter(report["curves"].values()), [])
    by_turn.set_xticks([p["turn"] for p in first],
                       [f"{p['turn']}\n{p['history_tokens'] or ''}" for p in first])
    by_turn.set(yscale="log", xlabel="turn\n(history tokens)", ylabel="TTFT ms (median)",
                title="Time to first token as the conversation grows")
    for variant in dict.fromkeys(r["variant"] for r in report["results"] if "skipped" not in r):
        points = [(r["clients"], r["output_tok_s"]) for r in report["results"] if r.get("variant") == variant]
        color = next((c for name, c in colors.items() if name.startswith(variant)), None)
        by_clients.plot(*zip(*points), marker="o", label=variant, color=color)
    clients = report["settings"]["clients"]
    by_clients.set_xscale("log", base=2)
    by_clients.set_xticks(clients, [str(c) for c in clients])
    by_clients.set_ylim(bottom=0)
    by_clients.set(xlabel="concurrent clients", ylabel="output tokens/s, all clients",
                   title="Throughput under concurrent conversations")
    for ax in (by_turn, by_clients):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"{TITLE}: {report['model']}, {m['cpu']}, {m['threads']} threads", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
