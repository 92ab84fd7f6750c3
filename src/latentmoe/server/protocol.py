"""Request bodies of the OpenAI-compatible API (with vLLM's extra sampling fields) and the error envelope."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..engine import SamplingParams


class APIError(Exception):
    """An error the client caused or must handle; rendered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def parse_body(raw: bytes, model: type[BaseModel]):
    """The body as `model`, or a 400 naming the first bad field.

    Parsed here rather than by FastAPI so that bad bodies get 400 (not 422) and a message without internals.
    pydantic's own JSON parser does the parsing: it rejects invalid UTF-8, lone surrogates (which no tokenizer can
    encode) and nesting deeper than its recursion limit, so none of them gets past this point.
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        if err["type"] == "json_invalid":
            raise bad_request(f"the request body is not valid JSON ({err['ctx']['error']})") from None
        if err["type"] == "model_type" and not err["loc"]:
            raise bad_request("the request body must be a JSON object") from None
        loc = ".".join(str(p) for p in err["loc"])
        raise bad_request(f"{loc}: {err['msg']}" if loc else err["msg"],
                          str(err["loc"][0]) if err["loc"] else None) from None


# Strict: a string is never taken for a number or a boolean ("stream": "yes", "max_tokens": "10" are 400s).
_STRICT = ConfigDict(extra="ignore", strict=True)
MAX_LOGPROBS = 20   # alternatives per token, as vLLM's default max_logprobs: bounds the response size
MAX_STOP = 64       # stop strings / stop token ids per request
_StopString = Annotated[str, Field(max_length=1024)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Request(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI clients send newer ones freely.
    model_config = _STRICT

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)   # the upper bound is the engine's batch size, checked by the routes
    temperature: float | None = None
    top_p: float | None = None
    # Every stop string and id is checked at every step: bounded, as OpenAI bounds `stop` (to 4).
    stop: _StopString | Annotated[list[_StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)   # sample i draws from seed + i: within torch's range
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP)
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(None, min_length=1)   # vLLM's: only requests with the same salt share cached prefixes

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, cache_salt: str | None = None,
                        max_n: int | None = None) -> SamplingParams:
        """The engine's parameters; `cache_salt` is the server's (per key and request salt, see state.py), and
        `max_n` the engine's batch size: all of a request's samples must fit in one batch."""
        if max_n is not None and self.n > max_n:
            raise bad_request(f"n = {self.n} is more than this server's batch size ({max_n})", "n")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        kw: dict[str, Any] = dict(
            n=self.n, max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            cache_salt=cache_salt)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise bad_request(str(e), _param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    if message.startswith("SamplingParams."):
        return message[len("SamplingParams."):].split(" ", 1)[0]
    return None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")   # OpenAI's


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)   # e.g. `name`; passed on to the chat template
    role: str
    content: str | list[TextPart] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        # Checked here, not left to the chat template: many templates render any role silently.
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown role {role!r}: must be one of {', '.join(CHAT_ROLES)}")
        return role

    def for_template(self) -> dict:
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            msg["content"] = "".join(p.text for p in self.content)
        msg.setdefault("content", "")
        return msg


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None


class TokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    tokens: list[int]
