"""The HTTP routes, thin: parse (pydantic), authenticate, hand over to OpenAIServing (serving.py).

/v1/* need the API key when one is set; /health, /metrics and the web chat at / are open, so load
balancers, Prometheus and a browser reach them without one (none of them reveals a conversation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kuaida.serve.auth import request_owner
from kuaida.serve.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatDraftRequest,
    DraftAccepted,
    DraftRequest,
    ErrorResponse,
    ModelList,
    SessionCreateRequest,
    SessionDeleted,
    SessionHistory,
    SessionMessage,
    SessionMessageRequest,
    SessionObject,
)
from kuaida.serve.serving import OpenAIServing

STATIC_DIR = Path(__file__).parent / "static"
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429)}
SSE = {200: {"content": {"text/event-stream": {}},
             "description": "JSON, or server-sent events with stream=true"}}


def get_serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


Serving = Annotated[OpenAIServing, Depends(get_serving)]
Owner = Annotated[str | None, Depends(request_owner)]

open_routes = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(request_owner)], responses=ERRORS)


@open_routes.get("/health")
async def health(request: Request) -> dict:
    """200 once the model is loaded and the scheduler runs (the app starts serving only then)."""
    return {"status": "ok", "model": request.app.state.serving.model_id}


@open_routes.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@open_routes.get("/", include_in_schema=False)
async def web_chat() -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return JSONResponse(ErrorResponse.model_validate(
            {"error": {"message": "the web chat page is not installed", "type": "not_found_error"}}
        ).model_dump(), status_code=404)
    return FileResponse(page)


@v1.get("/models", response_model=ModelList)
async def list_models(serving: Serving) -> ModelList:
    return serving.models()


@v1.post("/chat/completions", response_model=ChatCompletion, responses=SSE)
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: Serving):
    """OpenAI chat completions; with `stream: true`, server-sent `chat.completion.chunk` events."""
    return await serving.chat_completion(body, request)


@v1.post("/chat/drafts", response_model=DraftAccepted, status_code=202)
async def chat_draft(body: ChatDraftRequest, serving: Serving) -> DraftAccepted:
    """kuaida extra: the conversation so far, its last message the user's as typed so far. The server
    writes that prompt, up to the last whole word, into the conversation's cache while idle: the
    completion request sent with the finished message then prefills only its last words."""
    return await serving.chat_draft(body)


@v1.post("/sessions", response_model=SessionObject)
async def create_session(body: SessionCreateRequest, serving: Serving, owner: Owner) -> SessionObject:
    """A conversation the server keeps: send only each new user message."""
    return await serving.create_session(body, owner)


@v1.post("/sessions/{session_id}/messages", response_model=SessionMessage, responses=SSE)
async def session_message(session_id: str, body: SessionMessageRequest, request: Request, serving: Serving,
                          owner: Owner):
    """The reply to one user message; the user turn is stored first, the reply once it is complete."""
    return await serving.session_message(session_id, body, owner, request)


@v1.post("/sessions/{session_id}/draft", response_model=DraftAccepted, status_code=202)
async def session_draft(session_id: str, body: DraftRequest, serving: Serving, owner: Owner) -> DraftAccepted:
    """kuaida extra: the next user message as typed so far (nothing is stored); its prompt is written
    ahead while the server is idle, so the message, once sent, starts its reply sooner."""
    return await serving.session_draft(session_id, body, owner)


@v1.get("/sessions/{session_id}", response_model=SessionHistory)
async def session_history(session_id: str, serving: Serving, owner: Owner) -> SessionHistory:
    return await serving.session_history(session_id, owner)


@v1.delete("/sessions/{session_id}", response_model=SessionDeleted)
async def delete_session(session_id: str, serving: Serving, owner: Owner) -> SessionDeleted:
    return await serving.delete_session(session_id, owner)
