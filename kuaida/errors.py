"""Errors a user can cause. Each message says what to do; the CLI prints it on one line, the server
maps it to a 4xx JSON body."""


class KuaidaError(Exception):
    """Base class of every error a user can cause (bad path, bad file, too-long prompt, ...)."""


class ModelNotFoundError(KuaidaError):
    """The model path or name does not exist."""


class ModelFormatError(KuaidaError):
    """The path exists but is not a model we can read (not a HF directory, not a GGUF file)."""


class UnsupportedModelError(KuaidaError):
    """The checkpoint's architecture or a feature of it is not supported."""


class ContextLengthError(KuaidaError):
    """A prompt (plus the tokens asked for) does not fit the model's context window."""


class InvalidArgumentError(KuaidaError):
    """A parameter is out of range (temperature < 0, top_p > 1, unknown dtype, ...)."""


class BusyError(KuaidaError):
    """The request queue is full; try again shortly (the server answers 429 with Retry-After)."""


class SessionNotFoundError(KuaidaError):
    """No session with that id for this API key (the server answers 404 either way, so ids of other
    keys' sessions cannot be probed)."""


class DataError(KuaidaError):
    """Training data cannot be used (missing file, no valid conversation, nothing to learn)."""


class KnowledgeBaseNotFoundError(KuaidaError):
    """No knowledge base of that name (`kuaida kb list` shows the bases; `kuaida kb create` makes one)."""


class IngestError(KuaidaError):
    """A file cannot be added to a knowledge base (unsupported type, empty, binary, too big, broken)."""
