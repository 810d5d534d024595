"""Request bodies and errors of the OpenAI-compatible server, with the one body parser every route uses."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

MAX_BODY = 1 << 20  # bytes
BODY_SECONDS = 30  # a body that trickles in slower than this is refused (408)
MAX_DEPTH = 32  # JSON nesting
BAN = -1e30  # logit_bias -100: finite (an -inf could leave a grammar no token at all)
MAX_STOP, MAX_STOP_CHARS = 16, 64  # stop strings per request, characters each (OpenAI allows 4)
SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
T = TypeVar("T")


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type_: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_response(status: int, message: str, param=None, code=None, type_="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}  # union branches pydantic puts in a loc


def validation_message(exc: ValidationError | Any) -> tuple[str, str | None]:
    """The most specific problem of a pydantic/FastAPI validation error as (message, param): of a union's
    branches, the one that got furthest into the value (a text part's `text`, not "content: not a string")."""
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return "malformed JSON body", None
    first = max(errors, key=lambda e: len(e["loc"]))
    loc = ".".join(str(x) for x in first["loc"] if x != "body" and not _type_tag(x))
    return f"{loc}: {first['msg']}" if loc else first["msg"], loc or None


def _type_tag(part) -> bool:
    return isinstance(part, str) and (part in TYPE_TAGS or "[" in part)


async def parse_body(request: Request, kind: type[T] | Any, shape: str = "a JSON object") -> T:
    """Read (within BODY_SECONDS; the size cap is counted as it arrives: avgguf.server.guard), decode and
    validate a body into `kind` (a model or a type like list[LoraScale])."""
    try:
        raw = await asyncio.wait_for(request.body(), BODY_SECONDS)
    except ClientDisconnect:  # gone mid-body: nobody to answer
        raise APIError(400, "the client disconnected before its body arrived", code="client_disconnected") from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_SECONDS} s", code="timeout") from None
    if len(raw) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "malformed JSON body") from None
    except RecursionError:
        raise APIError(400, "JSON body nested too deeply", code="invalid_value") from None
    problem = _bad_text(data) if SURROGATE_ESCAPE.search(raw) else None  # only \\udXXX escapes make one
    if problem:
        raise APIError(400, problem, code="invalid_value")
    try:
        return TypeAdapter(kind).validate_python(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, f"{message} (the body must be {shape})", param=param) from None


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _bad_text(data, depth: int = 0) -> str | None:
    """Nesting deeper than MAX_DEPTH, or a string that is not valid Unicode (a lone surrogate is legal JSON)."""
    if depth > MAX_DEPTH:
        return f"JSON body nested deeper than {MAX_DEPTH} levels"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        for s in (key, value):
            if isinstance(s, str):
                try:
                    s.encode()
                except UnicodeEncodeError:
                    return f"{key}: a string holds a lone UTF-16 surrogate (not valid Unicode)"
        if isinstance(value, (dict, list)):
            problem = _bad_text(value, depth + 1)
            if problem:
                return problem
    return None


class LoraScale(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0)
    scale: float


class AvggufOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    coefficients: dict[str, float] = {}
    decode: Literal["weights", "pad", "pad-full"] | None = None  # pad: coefficients are PAD reward weights


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]  # images, audio, files: this server runs text models (a 400 names the part)
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)  # OpenAI's participant name: not shown to the model

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def turn(self) -> dict:
        """The chat template's message: OpenAI's `developer` is a system turn."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


# Fields a client may send that change nothing in the answer (accepted and ignored); any other field this
# server does not implement is a 400 naming it, never dropped in silence.
IGNORED_FIELDS = frozenset(
    {"user", "store", "metadata", "service_tier", "cache_prompt", "id_slot", "timings_per_token", "parallel_tool_calls"}
)


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by unsupported(): ignored only if in IGNORED_FIELDS
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n_predict: int | None = Field(None, ge=-1)  # llama-server's spelling of max_tokens (-1: no limit)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, ge=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None  # chat: bool (+ top_logprobs); completions: how many alternatives
    top_logprobs: int | None = None
    n_probs: int | None = None  # llama-server's spelling: refused, pointing at logprobs
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    lora: list[LoraScale] | None = Field(None, max_length=256)
    avgguf: AvggufOptions | None = None
    # constrained output through llama.cpp's grammar sampler: OpenAI's response_format, llama-server's fields
    response_format: dict[str, Any] | None = None
    grammar: str | None = Field(None, max_length=65536)  # further bounds: avgguf.runtime.sampling.check_grammar
    json_schema: dict[str, Any] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1024)

    def token_bias(self, n_vocab: int) -> dict[int, float]:
        """logit_bias as {token id: bias}; ValueError naming a key that is not a token id of this model."""
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= n_vocab:
                raise ValueError(f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})")
            out[int(key)] = BAN if bias <= -100 else bias  # OpenAI: -100 bans the token
        return out

    @model_validator(mode="before")
    @classmethod
    def _few_stops(cls, data):
        """The count first: 64 000 stop strings are refused before any of them is validated."""
        stop = data.get("stop") if isinstance(data, dict) else None
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings, got {len(stop)}")
        return data

    @field_validator("stop")
    @classmethod
    def _short_stop(cls, v):
        if isinstance(v, str) and not 0 < len(v) <= MAX_STOP_CHARS:
            raise ValueError(f"a stop string has 1 to {MAX_STOP_CHARS} characters, got {len(v)}")
        return v

    def limit(self) -> int | None:
        """max_completion_tokens, max_tokens or llama-server's n_predict (-1: none)."""
        n = self.max_completion_tokens or self.max_tokens
        return n if n is not None or self.n_predict in (None, -1) else self.n_predict

    @field_validator("n_predict")
    @classmethod
    def _some_tokens(cls, v):
        if v == 0:
            raise ValueError("n_predict 0 generates nothing: send -1 (no limit) or a positive count")
        return v


MAX_TOP_LOGPROBS = 20


def unsupported(body: Common, logprobs_ok: bool = True) -> str | None:
    """The first field a request sets that this server does not implement (answered with a 400, never ignored);
    `logprobs_ok`: False where the decoding path has no log-probabilities to give (PAD)."""
    for name in body.model_extra or {}:
        if name not in IGNORED_FIELDS:
            return f"{name}: not supported by this server (remove the field)"
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
