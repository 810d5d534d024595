"""OpenAI-compatible HTTP server over modelfiles, with profiles and per-request coefficients.

Model ids: the modelfile's stem (`demo`) and `demo:PROFILE` for each profile. Coefficients for a request:
all AVs 0 -> the profile (bare id: the modelfile's default profile, then POST /lora-adapters scales) ->
llama-server's `"lora": [{"id", "scale"}]` (replaces the whole set, unlisted ids 0) ->
`"avgguf": {"coefficients": {...}}` (overrides named AVs). One base model per modelfile; requests to a
modelfile run one at a time, each from position 0 of the KV cache, so no answer depends on another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import AvggufError
from .modelfile import Modelfile, check_coefficient
from .runtime import GenerationRequest, Runtime

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20  # bytes


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_response(status: int, message: str, param=None, code=None, type_="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


# --- request bodies --------------------------------------------------------------------------------------

class LoraScale(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0)
    scale: float


class AvggufOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    coefficients: dict[str, float] = {}


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
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    lora: list[LoraScale] | None = None
    avgguf: AvggufOptions | None = None


class ChatBody(Common):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(Common):
    prompt: str


# --- models ----------------------------------------------------------------------------------------------

@dataclass
class Served:
    modelfile: Modelfile
    runtime: Runtime
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    global_scales: dict[str, float] | None = None  # set by POST /lora-adapters


class Registry:
    def __init__(self, runtimes: dict[str, tuple[Modelfile, Runtime]]):
        self.models = {name: Served(mf, rt) for name, (mf, rt) in runtimes.items()}

    def ids(self) -> list[str]:
        out = []
        for name, s in self.models.items():
            out.append(name)
            out += [f"{name}:{p}" for p in s.modelfile.spec.profiles]
        return out

    def resolve(self, model_id: str) -> tuple[Served, str | None]:
        name, _, profile = model_id.partition(":")
        served = self.models.get(name)
        if served is None or (profile and profile not in served.modelfile.spec.profiles):
            raise APIError(404, f"model {model_id!r} does not exist; GET /v1/models lists {self.ids()}",
                           param="model", code="model_not_found")
        return served, profile or None


def coefficients_for(served: Served, profile: str | None, body: Common) -> dict[str, float]:
    mf = served.modelfile
    names = list(mf.av_paths)
    coefs = mf.coefficients(profile)
    if profile is None and served.global_scales is not None:
        coefs.update(served.global_scales)
    if body.lora is not None:
        coefs = {n: 0.0 for n in names}
        for item in body.lora:
            if item.id >= len(names):
                raise APIError(400, f"lora id {item.id} does not exist; ids 0..{len(names) - 1} are "
                               f"{names}", param="lora")
            coefs[names[item.id]] = item.scale
    if body.avgguf is not None:
        for name, value in body.avgguf.coefficients.items():
            if name not in mf.av_paths:
                raise APIError(400, f"unknown alignment vector {name!r}; {mf.name} has {names}",
                               param="avgguf.coefficients")
            coefs[name] = value
    try:
        return {n: check_coefficient(n, v, "request") for n, v in coefs.items()}
    except AvggufError as exc:
        raise APIError(400, str(exc), param="avgguf.coefficients") from None


def _request(body: Common, served: Served, prompt_tokens: int) -> GenerationRequest:
    max_tokens = body.max_completion_tokens or body.max_tokens
    n_ctx = served.runtime.n_ctx
    if max_tokens is not None and prompt_tokens + max_tokens > n_ctx:
        raise APIError(400, f"max_tokens {max_tokens} + prompt {prompt_tokens} tokens exceeds the context "
                       f"length {n_ctx}", param="max_tokens", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(served.modelfile.spec.defaults.max_tokens, n_ctx - prompt_tokens)
        if max_tokens < 1:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) fills the context length {n_ctx}",
                           param="messages", code="context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return GenerationRequest(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                             seed=body.seed, stop=stop)


# --- app -------------------------------------------------------------------------------------------------

def create_app(registry: Registry, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="avgguf", version="1")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                  code="invalid_api_key", type_="authentication_error")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return error_response(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"] if x != "body")
        msg = "malformed JSON body" if first["type"] == "json_invalid" else f"{loc}: {first['msg']}"
        return error_response(400, msg, param=loc or None)

    @app.exception_handler(Exception)
    async def internal(_, exc: Exception):
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "avgguf"}
                                           for i in registry.ids()]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async def parse(request: Request, kind: type[Common]) -> Common:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "malformed JSON body") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return kind.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise APIError(400, f"{loc}: {first['msg']}", param=loc) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatBody)
        served, profile = registry.resolve(body.model)
        coefs = coefficients_for(served, profile, body)
        messages = served.runtime.with_system([{"role": "user" if m.role == "developer" else m.role,
                                                "content": m.text()} for m in body.messages])
        n_prompt = served.runtime.count_tokens(served.runtime.engine.format_chat(messages))
        req = _request(body, served, n_prompt)
        req.messages = messages
        return await generate(served, body, lambda stream: served.runtime.chat(
            req, coefs, stream=stream, reuse_prefix=False), "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionBody)
        served, profile = registry.resolve(body.model)
        coefs = coefficients_for(served, profile, body)
        req = _request(body, served, served.runtime.count_tokens(body.prompt) + 1)
        req.prompt = body.prompt
        return await generate(served, body, lambda stream: served.runtime.complete(
            req, coefs, stream=stream, reuse_prefix=False), "text_completion")

    async def generate(served: Served, body: Common, run, kind: str):
        if not body.stream:
            async with served.lock:
                try:
                    result = await asyncio.to_thread(run, False)
                except ValueError as exc:
                    raise APIError(400, str(exc)) from None
            result["model"] = body.model
            return result
        await served.lock.acquire()
        return StreamingResponse(stream_events(served, body, run), media_type="text/event-stream")

    async def stream_events(served: Served, body: Common, run):
        """SSE from a worker thread. A client that goes away sets `cancel`; the worker stops at the next
        token and releases the model lock itself, so the next request never waits on a dead stream."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def worker():
            n = 0
            try:
                for chunk in run(True):
                    if cancel.is_set():
                        break
                    n += 1
                    chunk["model"] = body.model
                    loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", n))
            except Exception as exc:  # reported in-stream: headers are already sent
                loop.call_soon_threadsafe(queue.put_nowait, ("error", str(exc)))
            finally:
                loop.call_soon_threadsafe(served.lock.release)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        last = None
        try:
            while True:
                kind, item = await queue.get()
                if kind == "chunk":
                    last = item
                    yield f"data: {json.dumps(item)}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': item, 'type': 'server_error'}})}\n\n"
                    break
                else:
                    if include_usage and last is not None:
                        usage = {"object": last.get("object"), "id": last.get("id"), "created": last.get("created"),
                                 "model": body.model, "choices": [],
                                 "usage": {"completion_tokens": item}}
                        yield f"data: {json.dumps(usage)}\n\n"
                    yield "data: [DONE]\n\n"
                    break
        finally:
            cancel.set()

    @app.get("/lora-adapters")
    async def lora_list(model: str | None = None):
        served = _pick(model)
        coefs = served.modelfile.coefficients()
        if served.global_scales is not None:
            coefs.update(served.global_scales)
        return [{"id": i, "path": str(p), "name": n, "scale": coefs[n]}
                for i, (n, p) in enumerate(served.modelfile.av_paths.items())]

    @app.post("/lora-adapters")
    async def lora_set(request: Request, model: str | None = None):
        served = _pick(model)
        try:
            items = [LoraScale.model_validate(x) for x in json.loads(await request.body())]
        except (json.JSONDecodeError, TypeError, ValidationError, UnicodeDecodeError):
            raise APIError(400, 'expected a JSON list like [{"id": 0, "scale": 0.5}]') from None
        names = list(served.modelfile.av_paths)
        scales = {n: 0.0 for n in names}
        for it in items:
            if it.id >= len(names):
                raise APIError(400, f"lora id {it.id} does not exist; ids 0..{len(names) - 1}", param="id")
            try:
                scales[names[it.id]] = check_coefficient(names[it.id], it.scale, "lora-adapters")
            except AvggufError as exc:
                raise APIError(400, str(exc)) from None
        served.global_scales = scales
        return await lora_list(model)

    def _pick(model: str | None) -> Served:
        if model is None:
            return next(iter(registry.models.values()))
        return registry.resolve(model)[0]

    return app


def serve(modelfiles: list[Modelfile], host: str, port: int, api_key: str | None, verbose: bool = False,
          n_gpu_layers: int | None = None) -> None:
    import uvicorn

    runtimes: dict[str, tuple[Modelfile, Runtime]] = {}
    for mf in modelfiles:
        if mf.name in runtimes:
            raise AvggufError(f"two modelfiles are named {mf.name!r} ({runtimes[mf.name][0].path}, {mf.path}); "
                              f"model ids come from file names, rename one")
        runtimes[mf.name] = (mf, Runtime(mf, n_gpu_layers=n_gpu_layers, verbose=verbose))
    registry = Registry(runtimes)
    app = create_app(registry, api_key)
    print(f"avgguf serve: http://{host}:{port}/v1  models: {', '.join(registry.ids())}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
