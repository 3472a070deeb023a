"""Typed errors of the HTTP server. Each one knows its HTTP status and OpenAI error ``type``/``code``,
so the app turns any of them into the JSON body OpenAI clients parse::

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "..."}}
"""

from __future__ import annotations

from ..errors import BloombeeError


class ServeError(BloombeeError):
    """Base of every error a request can get from ``bloombee-nb serve``."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(ServeError, ValueError):
    """The request is malformed or asks for something this server cannot do."""

    code = "invalid_request"


class ModelNotFoundError(ServeError, LookupError):
    """The request names a model this server does not serve."""

    status, code = 404, "model_not_found"


class ContextLengthError(ServeError, ValueError):
    """Prompt plus ``max_tokens`` do not fit in the model's context."""

    code = "context_length_exceeded"


class NoChatTemplateError(ServeError, ValueError):
    """``/v1/chat/completions`` on a model whose tokenizer has no chat template."""

    code = "no_chat_template"


class AuthenticationError(ServeError, PermissionError):
    """Keys are configured and the request carries none of them."""

    status, type, code = 401, "authentication_error", "invalid_api_key"


class RateLimitError(ServeError, RuntimeError):
    """This key sent more requests than its rate allows; ``retry_after_s`` says when to try again."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFullError(ServeError, RuntimeError):
    """Every generation slot is busy and the waiting queue is full."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class GenerationFailedError(ServeError, RuntimeError):
    """The swarm could not run the request (e.g. a stage is gone and recovery failed)."""

    status, type, code = 503, "server_error", "generation_failed"


class ServeStartError(BloombeeError, OSError):
    """The HTTP server could not start (port taken, bad certificate, missing extra)."""
