"""Request bodies and errors of the OpenAI-compatible server, with the one body parser every route uses."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_BODY = 1 << 20  # bytes
T = TypeVar("T")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_response(status: int, message: str, param=None, code=None, type_="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def validation_message(exc: ValidationError | Any) -> tuple[str, str | None]:
    """The first problem of a pydantic/FastAPI validation error as (message, param)."""
    first = exc.errors()[0]
    loc = ".".join(str(x) for x in first["loc"] if x != "body")
    if first["type"] == "json_invalid":
        return "malformed JSON body", None
    return f"{loc}: {first['msg']}" if loc else first["msg"], loc or None


async def parse_body(request: Request, kind: type[T] | Any, shape: str = "a JSON object") -> T:
    """Read, size-check, decode and validate a body into `kind` (a model or a type like list[LoraScale])."""
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "malformed JSON body") from None
    try:
        return TypeAdapter(kind).validate_python(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, f"{message} (the body must be {shape})", param=param) from None


class LoraScale(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0)
    scale: float


class AvggufOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    coefficients: dict[str, float] = {}
    decode: Literal["weights", "pad", "pad-full"] | None = None  # pad: coefficients are PAD reward weights


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, ge=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None   # chat: bool (+ top_logprobs); completions: how many alternatives
    top_logprobs: int | None = None
    n_probs: int | None = None           # llama-server's spelling: refused, pointing at logprobs
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    lora: list[LoraScale] | None = None
    avgguf: AvggufOptions | None = None


MAX_TOP_LOGPROBS = 20


def unsupported(body: Common, logprobs_ok: bool = True) -> str | None:
    """The first field a request sets that this server does not implement (answered with a 400, never ignored);
    `logprobs_ok`: False where the decoding path has no log-probabilities to give (PAD)."""
    if body.n_probs not in (None, 0):
        return "n_probs: send OpenAI's logprobs (and top_logprobs) instead"
    if not logprobs_ok:
        for name in ("logprobs", "top_logprobs"):
            if getattr(body, name) not in (None, False):
                return f"{name}: log-probabilities are not available with decode pad/pad-full"
    if body.n not in (None, 1):
        return "n: one choice per request is supported (send n requests)"
    return None


def top_logprobs(body: Common, chat: bool) -> int | None:
    """How many alternatives to report per token (0: only the sampled one), None for no logprobs. Chat:
    `logprobs: true` with `top_logprobs` 0-20; completions: `logprobs` 0-20 (OpenAI's legacy field)."""
    if chat:
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise ValueError("logprobs: true or false on /v1/chat/completions (top_logprobs gives the count)")
        if body.top_logprobs is not None and body.logprobs is not True:
            raise ValueError("top_logprobs: needs logprobs: true")
        top = body.top_logprobs or 0 if body.logprobs is True else None
    else:
        top = None if body.logprobs in (None, False) else int(body.logprobs)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ValueError(f"{'top_logprobs' if chat else 'logprobs'}: between 0 and {MAX_TOP_LOGPROBS}, got {top}")
    return top


class ChatBody(Common):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(Common):
    prompt: str
