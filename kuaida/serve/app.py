"""Assemble the server: config, the FastAPI app (routes, error bodies, metrics), and running it on uvicorn.

    app = create_app(ServerConfig(model="default", api_key="sk-..."))   # loads the model first
    run_server(app, on_ready=print)                                      # until SIGINT/SIGTERM

Every error a client can cause is a 4xx with an OpenAI-style body {"error": {message, type, param,
code}}; a 500 means a bug in the server and is logged. Request bodies are never logged.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kuaida.dialogue.retrieval import Retriever
from kuaida.dialogue.store import SessionStore
from kuaida.dialogue.template import end_of_turn_ids, next_turn_ids
from kuaida.engine.lookup import LookupConfig
from kuaida.engine.scheduler import Scheduler
from kuaida.errors import (
    BusyError,
    ContextLengthError,
    InvalidArgumentError,
    KnowledgeBaseNotFoundError,
    KuaidaError,
    SessionNotFoundError,
    UnsupportedModelError,
)
from kuaida.model.loader import LoadedModel, cache_dir
from kuaida.serve.api_router import open_routes, v1
from kuaida.serve.auth import AuthenticationError, parse_keys
from kuaida.serve.metrics import RequestMetricsMiddleware, ServerMetrics
from kuaida.serve.serving import GenerationError, OpenAIServing

log = logging.getLogger(__name__)

# Most specific first: (error class, HTTP status, OpenAI error type, code).
ERROR_MAP = [
    (AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (SessionNotFoundError, 404, "not_found_error", "session_not_found"),
    (KnowledgeBaseNotFoundError, 404, "not_found_error", "knowledge_base_not_found"),
    (ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (BusyError, 429, "rate_limit_error", "rate_limit_exceeded"),
    (InvalidArgumentError, 400, "invalid_request_error", "invalid_value"),
    (KuaidaError, 400, "invalid_request_error", None),
]


@dataclass
class ServerConfig:
    model: str = "default"  # "default", a Hugging Face directory or a .gguf file
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (the ready callback gets the real one)
    api_key: str | None = None  # "KEY" or "KEY1,KEY2" (one per user); None: no authentication
    dtype: str = "int8"
    max_batch: int = 8
    max_context: int = 4096  # tokens per conversation's KV cache (capped by the model's)
    cache_mb: int = 2048  # KV-cache budget: how many conversations stay cached
    max_queue: int = 64  # requests waiting beyond this get 429
    db: Path | None = None  # session store; None: $KUAIDA_CACHE or ~/.cache/kuaida, file sessions.db
    default_max_tokens: int = 512  # reply length when a request does not say
    shutdown_timeout: float = 10.0  # seconds in-flight replies get to finish on SIGINT/SIGTERM
    prefix_cache: bool = True  # False: prefill every prompt whole (the baseline `kuaida bench load` compares)
    kb_dir: Path | None = None  # knowledge bases requests may name; None: $KUAIDA_KB_DIR or kb_root()
    knowledge_bases: tuple[str, ...] = ()  # opened (with the embedding model) at start-up: no cold first query
    # Knowledge-base passages encoded once, reused in every prompt they recur in (kuaida.engine.passages):
    # ~3.6x faster grounded TTFT, but block attention cost the default model answers (bench kb: facts in
    # 34.4 % of grounded replies against 45.9 %). 0 (default): passages prefilled in place, full attention.
    passage_cache_mb: int = 0
    # Prompt-lookup drafts for greedy requests (temperature 0), verified in the decode step's spare rows
    # (kuaida.engine.scheduler): the same replies, faster where they copy their prompt (grounded answers).
    prompt_lookup: bool = True
    # While idle, write the template's next-turn tokens after each finished reply (kuaida.engine.scheduler):
    # a conversation's next turn prefills only the user's message.
    prefill_next_turn: bool = True

    def __post_init__(self) -> None:
        checks = {"max_batch": self.max_batch >= 1, "max_context": self.max_context >= 2,
                  "cache_mb": self.cache_mb >= 0, "max_queue": self.max_queue >= 0,
                  "passage_cache_mb": self.passage_cache_mb >= 0,
                  "port": 0 <= self.port <= 65535, "default_max_tokens": self.default_max_tokens >= 1}
        for name, ok in checks.items():
            if not ok:
                raise InvalidArgumentError(f"{name} is out of range: {getattr(self, name)}")
        if self.api_key is not None and not self.api_keys:
            raise InvalidArgumentError("the API key is empty: pass a key or leave it unset")

    @property
    def api_keys(self) -> tuple[str, ...]:
        return parse_keys(self.api_key)

    @property
    def db_path(self) -> Path:
        return Path(self.db) if self.db else cache_dir() / "sessions.db"

    @property
    def model_id(self) -> str:
        return Path(self.model).name  # a directory's name, not its full path: paths are nobody's business


def create_app(config: ServerConfig, loaded: LoadedModel | None = None) -> FastAPI:
    """The app for one model. Loads it (unless `loaded` is given) before returning, so a server built on
    this app answers /health only once it can answer requests."""
    from kuaida.bot import make_passage_cache

    if loaded is None:
        from kuaida.bot import load_weights

        loaded = load_weights(config.model, config.dtype)
    if loaded.backend == "gru":
        raise UnsupportedModelError(f"{config.model} is a recurrent (GRU) student: it runs in `kuaida chat` and the "
                                    "Python API; the server batches KV caches and needs a Transformer")
    ahead = config.prefill_next_turn
    scheduler = Scheduler(loaded.model, loaded.tokenizer, end_of_turn_ids(loaded.tokenizer, loaded.path),
                          max_batch=config.max_batch, max_context=config.max_context,
                          cache_budget_mb=config.cache_mb, max_queue=config.max_queue,
                          enable_prefix_cache=config.prefix_cache,
                          passages=make_passage_cache(loaded.model, loaded.tokenizer,
                                                      config.passage_cache_mb),
                          lookup=LookupConfig() if config.prompt_lookup else None,
                          next_turn_ids=next_turn_ids(loaded.tokenizer) if ahead else (),
                          grounded_next_turn_ids=(next_turn_ids(loaded.tokenizer, grounded=True)
                                                  if ahead else ()))
    store = SessionStore(config.db_path)
    metrics = ServerMetrics(scheduler)
    retriever = Retriever(config.kb_dir)
    for name in config.knowledge_bases:
        retriever.warm(name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:  # uvicorn has let in-flight responses finish (or cancelled them) by now
            await asyncio.to_thread(scheduler.stop, config.shutdown_timeout)
            store.close()
            retriever.close()

    app = FastAPI(title="kuaida", summary="OpenAI-compatible chat server with server-side sessions",
                  version="0.1.0", lifespan=lifespan)
    app.state.config, app.state.metrics = config, metrics
    app.state.serving = OpenAIServing(scheduler, loaded.tokenizer, store, metrics, config.model_id,
                                      config.default_max_tokens, retriever)
    app.include_router(open_routes)
    app.include_router(v1)
    install_error_handlers(app, metrics)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def respond(status: int, message: str, type_: str, **kw) -> JSONResponse:
        metrics.errors.labels(type_).inc()
        return error_response(status, message, type_, **kw)

    @app.exception_handler(KuaidaError)
    async def kuaida_error(request: Request, exc: KuaidaError) -> JSONResponse:
        status, type_, code = next((s, t, c) for cls, s, t, c in ERROR_MAP if isinstance(exc, cls))
        headers = {"Retry-After": "1"} if status == 429 else None
        return respond(status, str(exc), type_, code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = describe_validation_error(exc.errors())
        return respond(400, message, "invalid_request_error", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return respond(exc.status_code, str(exc.detail), type_, headers=exc.headers)

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError) -> JSONResponse:
        return respond(500, str(exc), "server_error")


def describe_validation_error(errors: list[dict]) -> tuple[str | None, str]:
    """pydantic's first error -> (param, one-line message naming the field). The input is not echoed."""
    first = errors[0]
    # loc is ("body", "messages", 0, "role"); union branches add tags like "list[TextPart]": drop those.
    parts = [str(p) for p in first.get("loc", ())[1:] if isinstance(p, int) or str(p).isidentifier()]
    param = ".".join(parts) or None
    if first["type"] == "extra_forbidden":
        return param, f"unsupported field '{param}': this server does not implement it"
    if first["type"] == "json_invalid":
        return None, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}"
    if first["type"] == "missing" and param is None:
        return None, "the request needs a JSON body"
    return param, f"{param or 'body'}: {first['msg'].removeprefix('Value error, ')}"


class _Server(uvicorn.Server):
    """uvicorn, telling the caller the URL once it listens, and draining the scheduler on shutdown."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None],
                 drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_ready, self.drain = on_ready, drain

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}")

    async def shutdown(self, sockets=None) -> None:
        # Stop the scheduler while uvicorn waits for open connections: replies in flight get
        # shutdown_timeout s to finish, then are cancelled and still end with a finish chunk and [DONE].
        # Without this uvicorn would cut long streams mid-way when its own timeout (the backstop) expires.
        draining = asyncio.create_task(asyncio.to_thread(self.drain))
        await super().shutdown(sockets)
        await draining


def run_server(app: FastAPI, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting, let replies in flight finish (or cancel them
    after shutdown_timeout s) and close the session store."""
    config: ServerConfig = app.state.config
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                               timeout_graceful_shutdown=config.shutdown_timeout + 5)
    drain = partial(app.state.serving.scheduler.stop, config.shutdown_timeout)
    _Server(uv_config, on_ready, drain).run()
