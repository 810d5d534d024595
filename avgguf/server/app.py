"""OpenAI-compatible HTTP server over modelfiles, with profiles and per-request coefficients.

Model ids: the modelfile's stem (`demo`) and `demo:PROFILE` for each profile. Coefficients for a request are
resolved by avgguf.coefficients.Resolver (profile -> POST /lora-adapters scales -> llama-server's `lora` ->
`"avgguf": {"coefficients": {...}}`). One base model per modelfile; its requests decode together by continuous
batching (avgguf.runtime.batching: one sequence each, one coefficient set per decode step), so no answer depends on
another; PAD requests run one at a time on the model's runtime.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from avgguf.runtime.sampling import Sampling, grammar_for
from avgguf.config.coefficients import CoefficientError
from avgguf.errors import AvggufError
from avgguf.config.modelfile import Modelfile
from avgguf.runtime.session import GenerationRequest, Runtime
from avgguf.server.streaming import BatchJob, Job, generate, generate_batched
from avgguf.server.guard import Guard, Handoff, allowed_hosts, is_loopback
from avgguf.server.registry import Registry, Served, get_registry
from avgguf.server.protocol import (
    MAX_BODY,
    APIError,
    ChatBody,
    Common,
    CompletionBody,
    LoraScale,
    error_response,
    parse_body,
    top_logprobs,
    unsupported,
    validation_message,
)
from avgguf.server.web import web

log = logging.getLogger(__name__)


def coefficients_for(served: Served, profile: str | None, body: Common) -> dict[str, float]:
    lora = None if body.lora is None else [(item.id, item.scale) for item in body.lora]
    overrides = body.avgguf.coefficients if body.avgguf is not None else None
    try:
        return served.modelfile.resolver.resolve(
            profile,
            global_scales=served.global_scales,
            lora=lora,
            overrides=overrides,
            param="avgguf.coefficients",
            source="avgguf.coefficients",
        )
    except CoefficientError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


def decode_for(served: Served, profile: str | None, body: Common) -> str:
    """The request's `avgguf.decode`, else its profile's `decode:`, else weights."""
    if body.avgguf is not None and body.avgguf.decode is not None:
        return body.avgguf.decode
    return served.modelfile.decode_mode(profile)


def _top_logprobs(body: Common, chat: bool) -> int | None:
    try:
        return top_logprobs(body, chat)
    except ValueError as exc:
        raise APIError(400, str(exc), param=str(exc).split(":")[0], code="invalid_value") from None


async def _request(body: Common, served: Served, prompt_tokens: int, logprobs_ok: bool = True) -> GenerationRequest:
    max_tokens = body.limit()
    n_ctx = served.runtime.n_ctx
    if max_tokens is not None and prompt_tokens + max_tokens > n_ctx:
        raise APIError(
            400,
            f"max_tokens {max_tokens} + prompt {prompt_tokens} tokens exceeds the context length {n_ctx}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(served.modelfile.spec.defaults.max_tokens, n_ctx - prompt_tokens)
        if max_tokens < 1:
            raise APIError(
                400,
                f"the prompt ({prompt_tokens} tokens) fills the context length {n_ctx}",
                param="messages",
                code="context_length_exceeded",
            )
    problem = unsupported(body, logprobs_ok)
    if problem:
        raise APIError(400, problem, param=problem.split(":")[0], code="unsupported_parameter")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    grammar, bias = await asyncio.to_thread(_constraints, body, served)  # a JSON Schema is converted here
    return GenerationRequest(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=stop,
        grammar=grammar,
        logit_bias=bias,
    )


# --- routes ----------------------------------------------------------------------------------------------

router = APIRouter()
RegistryDep = Annotated[Registry, Depends(get_registry)]


@router.get("/v1/models")
async def list_models(registry: RegistryDep):
    now = int(time.time())
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": now, "owned_by": "avgguf"} for i in registry.ids()],
    }


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, registry: RegistryDep):
    served, _ = registry.resolve(model_id)  # 404 in OpenAI's shape when unknown
    card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "avgguf"}
    if served.hot is not None:  # which coefficient sets run at full speed now (avgguf.runtime.merged)
        card["avgguf"] = served.hot.card()
    return card


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, registry: RegistryDep):
    body = await parse_body(request, ChatBody)
    served, profile = registry.resolve(body.model)
    coefs = coefficients_for(served, profile, body)
    rt = served.runtime
    messages = rt.with_system([m.turn() for m in body.messages])
    _check_length(served, sum(len(m["content"].encode()) for m in messages), "messages")
    tokens = await asyncio.to_thread(rt.engine.chat_tokens, messages)  # the template writes its own BOS
    decode = decode_for(served, profile, body)
    if decode != "weights":
        req = await _request(body, served, len(tokens), logprobs_ok=False)
        req.messages = [m.turn() for m in body.messages]  # pad_pieces applies the system policy itself
        if req.grammar is not None:
            if decode == "pad":
                raise APIError(
                    400,
                    "response_format/grammar/json_schema with decode pad: PAD scores only the base's "
                    "top 10 tokens, which a grammar may all exclude; use decode pad-full or weights",
                    param="avgguf.decode",
                    code="unsupported_parameter",
                )
            (await _sampler(served, Sampling(max_tokens=1, grammar=req.grammar))).close()

        def run(slot, stream):
            return slot.chat_pad(req, coefs, decode, stream=stream)

        return await generate(Job(served, body, run, coefs, len(tokens), registry.stats, decode), request, req)
    return await _batched(request, served, body, coefs, tokens, registry.stats, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, registry: RegistryDep):
    body = await parse_body(request, CompletionBody)
    served, profile = registry.resolve(body.model)
    coefs = coefficients_for(served, profile, body)
    if decode_for(served, profile, body) != "weights":
        raise APIError(400, "decode pad/pad-full is served on /v1/chat/completions only", param="avgguf.decode")
    _check_length(served, len(body.prompt.encode()), "prompt")
    tokens = await asyncio.to_thread(served.runtime.engine.prompt_tokens, body.prompt)
    return await _batched(request, served, body, coefs, tokens, registry.stats, chat=False)


def _check_length(served: Served, n_bytes: int, param: str) -> None:
    """A prompt that cannot fit, refused before any tokenizing (a text of B bytes has at least B / the
    longest token's bytes tokens)."""
    engine = served.runtime.engine
    least = n_bytes // engine.max_token_bytes
    if least >= engine.n_ctx:
        raise APIError(
            400,
            f"the prompt ({n_bytes} bytes, at least {least} tokens) cannot fit the context length {engine.n_ctx}: shorten it",
            param=param,
            code="context_length_exceeded",
        )


async def _batched(
    request: Request, served: Served, body: Common, coefs: dict[str, float], tokens: list[int], stats: bool, chat: bool
):
    if not tokens:
        raise APIError(
            400, "the prompt is empty (and this model adds no BOS token): send some text", param="prompt", code="invalid_value"
        )
    req = await _request(body, served, len(tokens))
    kw = {k: v for k, v in served.runtime.sampling(req).items() if v is not None}
    kw.setdefault("seed", random.getrandbits(32))  # no seed anywhere: a fresh draw per request
    sampling = Sampling(**kw, logprobs=_top_logprobs(body, chat), grammar=req.grammar, logit_bias=req.logit_bias or {})
    sampler = await _sampler(served, sampling)
    job = Job(served, body, None, coefs, len(tokens), stats)
    try:
        key = served.runtime.engine.coefficient_key(coefs)
    except AvggufError as exc:
        sampler.close()
        raise APIError(400, str(exc), param="avgguf.coefficients") from None
    return await generate_batched(BatchJob(job, tokens, key, sampling, chat, sampler), request)


def _constraints(body: Common, served: Served) -> tuple[str | None, dict[int, float]]:
    """The request's grammar (response_format, grammar or json_schema) and logit bias, checked."""
    try:
        grammar = grammar_for(body.response_format, body.grammar, body.json_schema)
        return grammar, body.token_bias(served.runtime.engine.n_vocab)
    except (AvggufError, ValueError) as exc:
        raise APIError(400, str(exc), param=str(exc).split(":")[0].split(" ")[0], code="invalid_value") from None


async def _sampler(served: Served, sampling: Sampling):
    """The request's llama.cpp sampler chain, built off the event loop (a grammar is parsed here: a bad one
    is a 400 naming it, never an error on the scheduler thread)."""
    try:
        return await asyncio.to_thread(served.runtime.engine.sampler, sampling)
    except AvggufError as exc:
        raise APIError(400, str(exc), param="grammar", code="invalid_value") from None


@router.get("/lora-adapters")
async def lora_list(registry: RegistryDep, model: str | None = None):
    served = registry.pick(model)
    coefs = served.modelfile.resolver.resolve(None, global_scales=served.global_scales)
    return [{"id": i, "path": str(p), "name": n, "scale": coefs[n]} for i, (n, p) in enumerate(served.modelfile.av_paths.items())]


@router.post("/lora-adapters")
async def lora_set(request: Request, registry: RegistryDep, model: str | None = None):
    served = registry.pick(model)
    items = await parse_body(request, list[LoraScale], 'a JSON list like [{"id": 0, "scale": 0.5}]')
    try:
        served.global_scales = served.modelfile.resolver.from_lora([(it.id, it.scale) for it in items], "id")
    except CoefficientError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    return await lora_list(registry, model)


# --- app -------------------------------------------------------------------------------------------------


async def _api_error(_, exc: APIError):
    response = error_response(exc.status, exc.message, exc.param, exc.code, exc.type)
    if getattr(exc, "close", False):  # a body cut off mid-way (avgguf.server.guard.BodyTooLarge): not read on
        response.headers["connection"] = "close"
    return response


async def _bad_body(_, exc: RequestValidationError):
    message, param = validation_message(exc)
    return error_response(400, message, param=param)


async def _http_error(_, exc: StarletteHTTPException):
    if exc.status_code == 404:
        return error_response(
            404,
            "no such route; see GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET|POST /lora-adapters, GET /",
            code="not_found",
        )
    return error_response(exc.status_code, str(exc.detail), code="method_not_allowed" if exc.status_code == 405 else None)


async def _internal(_, exc: Exception):
    log.exception("internal error")  # the detail stays in the log: it can hold paths
    return error_response(500, "internal error (the server log has the details)", type_="server_error")


def create_app(registry: Registry, host: str = "127.0.0.1", docs: bool = False) -> Guard:
    """The app behind its Guard (avgguf.server.guard): `host` is the bind address (its Host allow-list);
    `docs`: FastAPI's /docs and /openapi.json (off by default)."""
    app = FastAPI(
        title="avgguf",
        version="1",
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.registry = registry
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _bad_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
    app.include_router(router)
    app.include_router(web)
    return Guard(app, api_key=registry.api_key, hosts=allowed_hosts(host), max_body=MAX_BODY)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before any model loads so a busy port fails in a second, not after."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AvggufError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "is already in use (another server running?)" if exc.errno == 98 else f"cannot be opened ({exc.strerror})"
        raise AvggufError(f"port {port} on {host} {reason}; choose another with --port") from None
    sock.listen(128)
    return sock


def serve(
    modelfiles: list[Modelfile],
    host: str,
    port: int,
    api_key: str | None,
    verbose: bool = False,
    n_gpu_layers: int | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    stats: bool = False,
    allow_write: bool = False,
    on_ready=None,
    parallel: int | None = None,
    max_queue: int | None = None,
    kv_unified: bool = False,
    contexts: int = 1,
    merge: str | None = None,
    shutdown_timeout: float | None = None,
    max_connections: int | None = None,
    header_timeout: float | None = None,
    docs: bool = False,
) -> None:
    """Serve until SIGINT/SIGTERM, then close every model (scratch removed). `on_ready(url)`: called once
    the socket serves (desktop opens the page there; the URL's fragment carries the key)."""
    from avgguf.server import run as server_run

    check_exposure(host, api_key, allow_write)
    names = model_ids(modelfiles)
    sock = bind(host, port)
    runtimes = {
        name: (
            mf,
            Runtime(mf, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads, verbose=verbose, fuse="sync", merge="off"),
        )
        for name, mf in names.items()
    }
    registry = Registry(runtimes, api_key, stats, allow_write, max_queue, parallel, kv_unified, contexts, merge)
    try:
        app = create_app(registry, host=host, docs=docs)
        ready = _announce(registry, host, sock.getsockname()[1], api_key, on_ready)
        stopped = server_run.run(
            app,
            sock,
            cancel_all=registry.cancel_all,
            on_ready=ready,
            verbose=verbose,
            shutdown_timeout=server_run.SHUTDOWN_SECONDS if shutdown_timeout is None else shutdown_timeout,
            max_connections=max_connections or server_run.MAX_CONNECTIONS,
            header_timeout=header_timeout if header_timeout else server_run.HEADER_SECONDS,
        )
        if stopped:
            print(f"avgguf serve: stopped ({', '.join(stopped)})", flush=True)
    finally:
        registry.close()


def model_ids(modelfiles: list[Modelfile]) -> dict[str, Modelfile]:
    """Model id -> modelfile: each modelfile's name, then NAME:PROFILE for each of its baked profiles (a GGUF
    of its own); two modelfiles of one name are refused."""
    names: dict[str, Modelfile] = {}
    for mf in modelfiles:
        if mf.name in names:
            raise AvggufError(
                f"two models are named {mf.name!r} ({names[mf.name].path}, {mf.path}); model ids come from file names, rename one"
            )
        names[mf.name] = mf
    for mf in list(names.values()):
        names.update({f"{mf.name}:{profile}": mf.baked(profile) for profile in mf.baked_paths})
    return names


def _announce(registry: Registry, host: str, port: int, api_key: str | None, on_ready):
    """Print the server's addresses; what to call once it serves: `on_ready(url)`, the URL's fragment carrying
    a one-time code for the key (the page trades it for the key: avgguf.server.guard.Handoff)."""
    url = f"http://{_url_host(host)}:{port}/"
    print(f"avgguf serve: {url}v1  chat page: {url}  models: {', '.join(registry.ids())}", flush=True)
    if on_ready is None:
        return None
    if api_key:
        registry.handoff = Handoff(api_key)
    code = f"#code={registry.handoff.code}" if registry.handoff else ""
    return lambda: on_ready(url + code)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_exposure(host: str, api_key: str | None, allow_write: bool) -> None:
    """Beyond loopback without a key anyone on the network can run the models: say so; and never let them
    write modelfiles."""
    if is_loopback(host) or api_key is not None:
        return
    if allow_write:
        raise AvggufError(
            f"--allow-write on --host {host} without --api-key would let anyone on the network "
            f"rewrite your modelfiles: add --api-key-file FILE (or AVGGUF_API_KEY), or serve on "
            f"127.0.0.1"
        )
    print(
        f"avgguf serve: warning: --host {host} without --api-key: anyone who can reach this port can use "
        f"the models (set AVGGUF_API_KEY or --api-key-file)",
        flush=True,
    )
