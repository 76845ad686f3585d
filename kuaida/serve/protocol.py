"""Request and response bodies of the HTTP API (pydantic), in the order of the OpenAI reference: chat
completions (request, response, stream chunk), models, errors; then kuaida's own session API.

Fields OpenAI does not have are marked `# kuaida extra`. Requests forbid unknown fields, and fields we
know but cannot honour (n > 1, logprobs, a JSON response format, penalties) accept only their neutral
value: a client relying on a feature we lack gets a 400 naming it, not a reply that ignores it.
Within a request, the sampling fields shared by every endpoint come first (one definition, SamplingFields).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer

from kuaida.engine.sampling import SamplingParams

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds
# Below this a temperature is greedy in all but name, and logits / T can overflow float32 to inf (NaN
# probabilities): such temperatures are served as 0 (argmax).
def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); neither the tokenizer nor SQLite can take them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplingFields(Strict):
    """How to sample a reply; every field is optional and falls back to the server's defaults."""

    max_completion_tokens: int | None = Field(None, ge=1, description="Longest reply, in tokens.")
    max_tokens: int | None = Field(None, ge=1, description="OpenAI's deprecated max_completion_tokens.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Text | list[Text] | None = Field(None, description="Up to 16 strings that end the reply.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (deterministic).")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="kuaida extra: keep the k most likely tokens; 0 = off.")
    repetition_penalty: float | None = Field(  # bounded away from 0: logits / penalty must stay finite
        None, ge=0.01, le=10, description="kuaida extra: CTRL-style penalty on seen tokens; 1 = off."
    )

    def sampling(self, defaults: dict[str, Any]) -> SamplingParams:
        """-> SamplingParams: this request's fields over `defaults` (SamplingParams field names)."""
        # Tiny temperatures are served as greedy by SamplingParams itself (sampling.GREEDY_BELOW).
        given = {"max_new_tokens": self.max_completion_tokens or self.max_tokens, "seed": self.seed,
                 "stop": self.stop, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "repetition_penalty": self.repetition_penalty}
        return SamplingParams(**{**defaults, **{k: v for k, v in given.items() if v is not None}})

    def options(self) -> dict[str, Any]:
        """The fields that were set, for storing as a session's defaults."""
        return self.model_dump(exclude_none=True)


def _only(neutral: tuple, what: str):
    """A validator accepting only the neutral values of a field we cannot honour."""
    def check(value):
        if value not in neutral:
            raise ValueError(f"{what} is not supported by this server")
        return value
    return check


# -- chat completions ------------------------------------------------------------------------------
class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["developer", "system", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Text | list[TextPart]
    name: str | None = None  # accepted, not used: ChatML has no speaker names

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool = False  # accepted, ignored: there is nothing to pad against here


class ResponseFormat(Strict):
    type: Literal["text"] = Field(description="Only plain text: JSON modes are not supported.")


class KnowledgeOptions(Strict):
    """kuaida extra: answer from a knowledge base (`kuaida kb create/add`)."""

    base: str = Field(min_length=1, max_length=64, description="The knowledge base's name.")
    k: int = Field(3, ge=1, le=16, description="Passages put into the prompt.")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    knowledge: KnowledgeOptions | None = None  # kuaida extra
    model: str = Field(description="Any name: the server answers with the one model it has loaded.")
    frequency_penalty: float | None = Field(None, description="Only 0 (use repetition_penalty).")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty.")
    logprobs: bool | None = Field(None, description="Only false.")
    metadata: dict[str, str] | None = None  # accepted, not stored
    n: int | None = Field(None, description="Only 1.")
    presence_penalty: float | None = Field(None, description="Only 0 (use repetition_penalty).")
    response_format: ResponseFormat | None = None
    store: bool | None = Field(None, description="Only false: use /v1/sessions to keep a conversation.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, not used

    _n = field_validator("n")(_only((None, 1), "n other than 1"))
    _logprobs = field_validator("logprobs")(_only((None, False), "logprobs"))
    _penalties = field_validator("frequency_penalty", "presence_penalty")(
        _only((None, 0), "a nonzero frequency/presence penalty"))
    _bias = field_validator("logit_bias")(_only((None, {}), "logit_bias"))
    _store = field_validator("store")(_only((None, False), "store=true"))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = Field(description="cached_tokens: prompt tokens from the cache.")


class SourcePassage(BaseModel):
    """kuaida extra: a knowledge-base passage that was in the prompt; the reply cites it as [id]."""

    id: str
    doc: str
    heading: str
    text: str
    score: float


class KuaidaStats(BaseModel):
    """kuaida extra: how this reply was served."""

    ttft_ms: float = Field(description="Request admitted -> first token, in ms (includes queueing).")
    queue_ms: float
    tokens_per_s: float = Field(description="Decode speed after the first token.")
    cached_tokens: int = Field(description="Prompt tokens reused from the KV cache instead of prefilled.")
    dropped_messages: int = Field(0, description="Sessions only: oldest messages left out of the prompt.")
    retrieval_ms: float | None = Field(None, description="Knowledge-base search time, with a base.")
    sources: list[SourcePassage] | None = Field(None, description="The passages in the prompt, with a base.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    kuaida: KuaidaStats  # kuaida extra


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_only(self) -> dict[str, str]:
        # OpenAI's deltas carry only what changed: {"role", "content": ""}, {"content"}, then {}.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only in the last chunk, and only with stream_options.include_usage
    kuaida: KuaidaStats | None = None  # kuaida extra: in the chunk carrying finish_reason


# -- models, errors --------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kuaida"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- sessions (kuaida's own API: the server keeps the history) --------------------------------------
class SessionOptions(SamplingFields):
    """Sampling defaults for every turn of a session; a message's own fields override them."""


class SessionCreateRequest(Strict):
    system: Text | None = Field(None, description="System prompt (persona) for the whole conversation.")
    options: SessionOptions | None = None
    knowledge: KnowledgeOptions | None = None  # kuaida extra: every turn answers from this base


class SessionObject(BaseModel):
    id: str
    object: Literal["session"] = "session"
    created: int
    system: str | None
    options: dict[str, Any]
    knowledge: KnowledgeOptions | None = None  # kuaida extra


class SessionMessageRequest(SamplingFields):
    content: Text = Field(min_length=1, description="The user's message; the server adds the history.")
    stream: bool = False
    stream_options: StreamOptions | None = None


class SessionMessage(BaseModel):
    id: str
    object: Literal["session.message"] = "session.message"
    created: int
    session_id: str
    model: str
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    usage: Usage
    kuaida: KuaidaStats


class StoredTurn(BaseModel):
    role: str
    content: str
    created: int


class SessionHistory(SessionObject):
    messages: list[StoredTurn]


class DraftRequest(Strict):
    """kuaida extra: the user's message as typed so far (the server prepares its prompt meanwhile)."""
    content: Text = Field("", description="The text typed so far; may end mid-word.")


class ChatDraftRequest(Strict):
    """kuaida extra: a conversation whose last message is the user's, still being typed."""
    messages: list[ChatMessage] = Field(min_length=1)
    knowledge: KnowledgeOptions | None = None  # as the completion will carry it
    model: str | None = None


class DraftAccepted(BaseModel):
    object: Literal["draft"] = "draft"
    prompt_tokens: int = Field(description="The prompt tokens known so far, queued to be written while the "
                                           "server is idle (0: nothing to write, e.g. an empty draft with a "
                                           "knowledge base, one that could never fit, or a server "
                                           "started with --no-prefix-cache).")


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True
