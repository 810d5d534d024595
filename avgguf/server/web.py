"""The desktop chat page (GET /, shipped in the package, no CDN) and the two routes it needs beyond the
OpenAI API: what each model's knobs are, and saving the knobs as a profile (only with --allow-write)."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from importlib import resources
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from avgguf.errors import AvggufError
from avgguf.config.modelfile import PROFILE_NAME
from avgguf.config.profile_edit import delete_profile, rename_profile, set_default_profile
from avgguf.config.profile_save import ModelfileBusy, save_profile
from avgguf.server.protocol import APIError, parse_body

web = APIRouter()
TYPES = {".js": "text/javascript", ".css": "text/css"}
# the page's files, the vendored renderer among them (static/vendor: marked, DOMPurify, highlight.js)
STATIC = frozenset(
    ["app.js", "style.css"]
    + [f"vendor/{n}" for n in ("marked.umd.js", "purify.min.js", "highlight.min.js", "hljs-light.min.css", "hljs-dark.min.css")]
)
PUBLIC = ("/", "/static/")  # served without the API key: the page asks for it and sends it with every call


def _registry(request: Request):
    return request.app.state.registry


RegistryDep = Annotated[object, Depends(_registry)]


def _asset(name: str) -> bytes:
    return resources.files("avgguf.server").joinpath("static", *name.split("/")).read_bytes()


@web.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(_asset("index.html"))


@web.get("/static/{name:path}")
async def static(name: str):
    if name not in STATIC:
        raise APIError(404, f"no static file {name!r}", code="not_found")
    return Response(_asset(name), media_type=TYPES[name[name.rfind(".") :]], headers={"Cache-Control": "no-cache"})


@web.get("/avgguf/models")
async def knobs(registry: RegistryDep):
    """Each model's AVs (slider order), profiles with their coefficients and decoding modes."""
    data = []
    for name, served in registry.models.items():
        mf = served.modelfile
        data.append(
            {
                "id": name,
                "avs": list(mf.av_paths),
                "kinds": _kinds(served),  # "LoRA" or "control vector" per knob (the slider's badge)
                "profiles": {p: mf.coefficients(p) for p in mf.spec.profiles},
                "default_profile": mf.spec.default_profile,
                "decode": dict(mf.spec.profile_decode),
                "writable": registry.allow_write,
                "n_ctx": _n_ctx(served),  # tokens per conversation (the page's context gauge)
            }
        )
    return {"object": "list", "data": data, "judge": _judge_available()}


def _kinds(served) -> dict[str, str]:
    runtime = getattr(served, "runtime", None)
    return runtime.knob_kinds if runtime is not None else {}


def _n_ctx(served) -> int | None:
    runtime = getattr(served, "runtime", None)  # None: a stand-in without one (tests of the save path)
    return runtime.n_ctx if runtime is not None else None


def _judge_available() -> bool:
    """Whether the level judge (avgguf.eval.answer_judge, scikit-learn) can run here: the page then asks it
    for each finished answer's level."""
    return all(importlib.util.find_spec(m) is not None for m in ("sklearn", "avgguf.eval.answer_judge"))


class JudgeRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: str = Field(max_length=64)
    query: str = Field(max_length=20000)
    answer: str = Field(max_length=40000)


class Judge(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[JudgeRow] = Field(min_length=1, max_length=8)


_JUDGE_LOCK = threading.Lock()  # the first call trains the judge (seconds); the others wait for it


def _judge(rows: list[dict]) -> list[dict]:
    from avgguf.eval.answer_judge import judge_answers

    with _JUDGE_LOCK:
        return judge_answers(rows)


@web.post("/avgguf/judge")
async def judge(request: Request):
    """The level judge's reading of answers (the same judge as `avgguf eval --generate`): rows {domain,
    query, answer} -> {level: avoidance|generic|expert|off-level, probabilities}."""
    body = await parse_body(request, Judge)
    if not _judge_available():
        raise APIError(501, "the level judge is not installed here: pip install 'avgguf[eval]'", code="not_implemented")
    try:
        judged = await asyncio.to_thread(_judge, [r.model_dump() for r in body.rows])
    except AvggufError as exc:
        raise APIError(400, str(exc)) from None
    return {"data": [{"level": j["level"], "probabilities": j["probabilities"]} for j in judged]}


class Session(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(max_length=256)


@web.post("/avgguf/session")
async def session(request: Request, registry: RegistryDep):
    """The page `desktop` opened trades its one-time code (URL fragment) for the API key, once."""
    body = await parse_body(request, Session)
    key = registry.handoff.redeem(body.code) if registry.handoff is not None else None
    if key is None:
        raise APIError(
            403,
            "this code is used, expired or wrong: start `avgguf desktop` again, or type the API key into the page",
            code="invalid_code",
            type_="permission_error",
        )
    return {"key": key}


class SaveProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    name: str = Field(pattern=f"^{PROFILE_NAME}$")
    coefficients: dict[str, float]
    decode: Literal["weights", "pad", "pad-full"] = "weights"


_SAVE_LOCK = threading.Lock()  # one save at a time in this process (across processes: the modelfile's flock)


def _save_and_update(served, body: SaveProfile):
    """On a worker thread: write the profile, then set it in the served modelfile in memory. Only that profile
    changes in memory; other edits made to the file since the start (avs, base, system) wait for a restart,
    as the loaded adapters do."""
    with _SAVE_LOCK:
        saved = save_profile(served.modelfile, body.name, body.coefficients, body.decode)
        served.modelfile = served.modelfile.with_saved_profile(saved.name, saved.coefficients, saved.decode)
        return saved


def _writable(registry, model: str):
    if not registry.allow_write:
        raise APIError(
            403, "saving profiles is off: start the server with --allow-write", code="read_only", type_="permission_error"
        )
    served = registry.models.get(model)
    if served is None:
        raise APIError(404, f"model {model!r} does not exist; models: {list(registry.models)}", param="model")
    return served


@web.post("/avgguf/profiles")
async def save(request: Request, registry: RegistryDep):
    if not registry.allow_write:
        _writable(registry, "")
    body = await parse_body(request, SaveProfile)
    served = _writable(registry, body.model)
    try:
        saved = await asyncio.to_thread(_save_and_update, served, body)
    except ModelfileBusy as exc:
        raise APIError(409, str(exc), code="busy") from None
    except AvggufError as exc:
        raise APIError(400, str(exc)) from None
    return {
        "saved": saved.name,
        "modelfile": str(served.modelfile.path),
        "coefficients": saved.coefficients,
        "decode": saved.decode,
        "replaced": saved.replaced,
    }


class EditProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    action: Literal["rename", "delete", "default"]
    name: str | None = Field(default=None, max_length=64)  # None with "default": no default profile
    new_name: str | None = Field(default=None, pattern=f"^{PROFILE_NAME}$")


def _edit_and_update(served, body: EditProfile):
    with _SAVE_LOCK:
        mf = served.modelfile
        if body.action == "delete":
            served.modelfile = delete_profile(mf, body.name)
        elif body.action == "rename":
            if not body.new_name:
                raise AvggufError("rename: give new_name, the profile's new name")
            served.modelfile = rename_profile(mf, body.name, body.new_name)
        else:
            served.modelfile = set_default_profile(mf, body.name)
        return served.modelfile


@web.post("/avgguf/profiles/edit")
async def edit_profiles(request: Request, registry: RegistryDep):
    """The page's profile editor: rename or delete a profile, or set the default one (--allow-write)."""
    if not registry.allow_write:
        _writable(registry, "")
    body = await parse_body(request, EditProfile)
    served = _writable(registry, body.model)
    if body.action != "default" and not body.name:
        raise APIError(400, f"{body.action}: give name, the profile to {body.action}", param="name")
    try:
        mf = await asyncio.to_thread(_edit_and_update, served, body)
    except ModelfileBusy as exc:
        raise APIError(409, str(exc), code="busy") from None
    except AvggufError as exc:
        raise APIError(400, str(exc)) from None
    return {"modelfile": str(mf.path), "profiles": mf.spec.profiles, "default_profile": mf.spec.default_profile}
