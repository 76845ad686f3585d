"""The web chat at `/`, driven by headless Chromium against a real `kuaida serve` on 127.0.0.1 (the tiny
model, so replies are gibberish but fast): send, stream, the TTFT / tok/s line, a second turn in the
same session, the API key, error display, a new conversation, and text that must stay text.

Needs Debian's `chromium` and `pip install playwright==1.65.2` (.ci/run installs both); Playwright
drives the system browser, it downloads none.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.request

import pytest

from kuaida.bench.load import free_port, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
API_KEY = "test-key-123"
REPLY = ".msg.assistant"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium"),
]


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory):
    """A knowledge base "hub" of two one-line documents (real embedding model)."""
    from kuaida.knowledge import create_kb

    root = tmp_path_factory.mktemp("kb")
    (root / "docs").mkdir()
    # Short: the tiny test model has a 256-token context (and its tokenizer makes a token of ~1 character).
    (root / "docs" / "reset.txt").write_text("Reset: hold 12 seconds.")
    (root / "docs" / "price.txt").write_text("Price: 129 euros.")
    with create_kb("hub", root=root) as kb:
        kb.add([root / "docs"])
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory, kb_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "kuaida.cli", "serve", str(tiny_llama_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "fp32", "--api-key", API_KEY, "--kb-dir", str(kb_dir)]
    with serving("kuaida serve (tiny)", cmd, port, "/health", tmp_path_factory.mktemp("server"),
                 ready_timeout_s=120) as target:
        yield target.url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.65.2")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server + "/")
    yield page
    context.close()


def settings(page, **fields: str) -> None:
    if not page.is_visible("#api-key"):
        page.click("summary")
    for field, value in fields.items():
        page.fill(f"#{field}", value)


def send(page, text: str) -> str:
    """Type and send a message; wait for its reply to finish -> that reply's meta line."""
    n = page.locator(f"{REPLY} .meta").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('{REPLY} .meta').length > {n}")
    return page.locator(f"{REPLY} .meta").nth(n).inner_text()


def session_posts(page) -> list[str]:
    """The paths of the page's POSTs from now on ("v1/sessions", "v1/sessions/ID/messages"), filled in
    as it makes them."""
    posts: list[str] = []

    def record(request) -> None:
        if request.method == "POST":
            posts.append(request.url.split("/", 3)[3])

    page.on("request", record)
    return posts


def stored_messages(server: str, session_path: str) -> list[dict]:
    request = urllib.request.Request(f"{server}/{session_path}",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["messages"]


def test_streamed_multi_turn_chat(page, server, tmp_path):
    posts = session_posts(page)
    settings(page, **{"api-key": API_KEY, "max-tokens": "24", "system": "You are a test bot."})
    first = send(page, "Hello! How are you today?")
    assert "TTFT" in first and "tok/s" in first and "failed" not in first
    page.wait_for_selector(f"{REPLY} .bubble:not(:empty)", state="attached")
    second = send(page, "Tell me a joke about computers and cats, please.")
    assert "TTFT" in second and "tok/s" in second
    assert page.locator(f"{REPLY} .bubble").count() == 2
    assert page.locator("#error").is_hidden()
    # One session, both turns in it: the server keeps the history (system, 2 user, 2 assistant turns).
    assert posts[0] == "v1/sessions" and posts.count("v1/sessions") == 1
    turns = [p for p in posts if p.endswith("/messages")]
    assert len(turns) == 2 and turns[0] == turns[1]
    roles = [m["role"] for m in stored_messages(server, turns[0].rsplit("/", 1)[0])]
    assert roles.count("user") == 2 and roles.count("assistant") == 2
    page.screenshot(path=str(os.environ.get("KUAIDA_WEB_SCREENSHOT", tmp_path / "web-chat.png")))


def test_api_key_error_then_key_from_storage(page):
    settings(page, **{"api-key": "wrong-key"})
    page.fill("#input", "Hello?")
    page.press("#input", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.inner_text("#error")
    assert page.input_value("#input") == "Hello?"  # the turn did not start: the text is kept
    settings(page, **{"api-key": API_KEY})
    page.reload()  # the key comes back from localStorage
    assert page.input_value("#api-key") == API_KEY
    assert "TTFT" in send(page, "Hello again")
    assert page.locator("#error").is_hidden()


def test_markup_stays_text_and_new_conversation_starts_over(page):
    posts = session_posts(page)
    settings(page, **{"api-key": API_KEY, "max-tokens": "8"})
    text = '<img src=x onerror="window.__xss = 1"><b>bold?</b>'
    send(page, text)
    assert page.locator(".msg.user .bubble").first.inner_text() == text
    assert page.locator("#messages img, #messages b").count() == 0
    assert page.evaluate("window.__xss") is None
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    send(page, "A new start")
    assert posts.count("v1/sessions") == 2


def test_knowledge_base_sources_are_shown(page):
    settings(page, **{"api-key": API_KEY, "max-tokens": "4", "kb": "hub", "system": ""})
    page.click("#new-chat")
    meta = send(page, "Reset how?")
    assert "TTFT" in meta, page.inner_text("#error")
    summary = page.locator(f"{REPLY} .sources summary").last.inner_text()
    assert summary.startswith("Sources (2)") and "docs/reset.txt#1" in summary
    page.locator(f"{REPLY} .sources summary").last.click()
    assert "12 seconds" in page.locator(f"{REPLY} .sources li").first.inner_text()
    assert page.locator("#error").is_hidden()


def typed_ahead_tokens(server: str) -> float:
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as response:
        text = response.read().decode()
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("kuaida_typed_ahead_prefilled_tokens_total")))


def test_typing_sends_a_draft_the_server_writes_ahead(page, server):
    posts = session_posts(page)
    settings(page, **{"api-key": API_KEY, "max-tokens": "8", "kb": ""})
    page.type("#input", "Hello there my ", delay=15)
    page.wait_for_timeout(800)  # no session before the first message: its prompt goes as a chat draft
    assert posts == ["v1/chat/drafts"]
    send(page, "Hello there my friend!")
    before = typed_ahead_tokens(server)
    page.type("#input", "What about the weather ", delay=15)
    page.wait_for_timeout(800)  # a pause in typing: the page sends one draft
    drafts = [p for p in posts if p.endswith("/draft")]
    turns = [p for p in posts if p.endswith("/messages")]
    assert len(drafts) == 1 and drafts[0].rsplit("/", 1)[0] == turns[0].rsplit("/", 1)[0]
    deadline = time.monotonic() + 10
    while typed_ahead_tokens(server) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert typed_ahead_tokens(server) > before
    assert "TTFT" in send(page, "What about the weather today?")
    assert [p for p in posts if p.endswith("/draft")] == drafts  # none while the message was sent
