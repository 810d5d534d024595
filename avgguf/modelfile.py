"""Modelfiles: YAML naming a base model, its alignment vectors, named coefficient profiles and
generation defaults. Validated at the edge with precise messages (file, key, expected vs found)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import adapter_format as fmt
from .coefficients import CoefficientError, Resolver, check_value
from .errors import AvggufError
from .models import builtin_names, builtin_path

BUILTIN_PREFIX = "builtin:"


class ModelfileError(AvggufError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(Strict):
    max_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    repeat_penalty: float = Field(1.1, ge=0.0)
    seed: int | None = None
    n_ctx: int = Field(2048, ge=64)
    n_threads: int | None = Field(None, ge=0)  # None or 0: adaptive (avgguf.threads)
    n_gpu_layers: int = Field(0, ge=-1)
    merge: Literal["auto", "on", "off"] = "auto"  # a set in use runs on merged weights (avgguf.hot)


class AVSpec(Strict):
    path: str
    description: str = ""


class ModelfileSpec(Strict):
    base: str
    description: str = ""
    system: str | None = None
    avs: dict[str, AVSpec] = {}
    profiles: dict[str, dict[str, float]] = {}
    baked: dict[str, str] = {}  # profile name -> a baked GGUF (`avgguf bake --format gguf`): full speed, no knobs
    default_profile: str | None = None
    defaults: Defaults = Defaults()
    profile_decode: dict[str, Literal["weights", "pad", "pad-full"]] = {}  # from each profile's `decode:` key

    @model_validator(mode="before")
    @classmethod
    def _decode_keys(cls, raw: Any):
        """`profiles: {p: {medical: 1, decode: pad}}`: the decoding mode is not a coefficient."""
        if isinstance(raw, dict) and isinstance(raw.get("profiles"), dict):
            profiles, decode = {}, {}
            for name, coefs in raw["profiles"].items():
                if isinstance(coefs, dict) and "decode" in coefs:
                    coefs = dict(coefs)
                    decode[name] = coefs.pop("decode")
                profiles[name] = coefs
            raw = {**raw, "profiles": profiles, "profile_decode": {**raw.get("profile_decode", {}), **decode}}
        return raw

    @field_validator("avs", mode="before")
    @classmethod
    def _short_avs(cls, v: Any):
        if isinstance(v, dict):
            return {k: ({"path": p} if isinstance(p, str) else p) for k, p in v.items()}
        return v


@dataclass
class Modelfile:
    path: Path
    spec: ModelfileSpec
    base_path: Path
    av_paths: dict[str, Path]
    baked_paths: dict[str, Path] = field(default_factory=dict)

    def baked(self, profile: str) -> Modelfile:
        """A baked profile as a modelfile of its own: the baked GGUF, no AVs, this one's system and defaults."""
        path = self.baked_paths[profile]
        spec = ModelfileSpec(base=str(path), description=f"{self.name}:{profile} (baked)", system=self.spec.system,
                             defaults=self.spec.defaults)
        return Modelfile(self.path, spec, path, {})

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def profiles(self) -> dict[str, dict[str, float]]:
        return dict(self.spec.profiles)

    def decode_mode(self, profile: str | None = None) -> str:
        """The profile's `decode:` (weights, pad, pad-full); weights when it names none."""
        return self.spec.profile_decode.get(profile or self.spec.default_profile or "", "weights")

    @property
    def resolver(self) -> Resolver:
        """The coefficient rules for this modelfile's AVs and profiles (see avgguf.coefficients)."""
        return Resolver(tuple(self.av_paths), dict(self.spec.profiles), self.spec.default_profile,
                        where=str(self.path))

    def coefficients(self, profile: str | None = None, overrides: dict[str, float] | None = None,
                     source: str = "override") -> dict[str, float]:
        """All AVs at 0, then the profile (or default_profile), then per-call overrides; validated."""
        return self.resolver.resolve(profile, overrides=overrides, source=source)


def _section(loc: tuple) -> tuple[str, type[BaseModel] | None]:
    """The key path of the mapping that holds `loc`'s last key, and the model that defines its keys."""
    parent = loc[:-1]
    if not parent:
        return "top-level", ModelfileSpec
    if parent == ("defaults",):
        return "defaults", Defaults
    if len(parent) == 2 and parent[0] == "avs":
        return f"avs.{parent[1]}", AVSpec
    return ".".join(str(x) for x in parent), None


def _format_validation(path: Path, exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            where, model = _section(e["loc"])
            allowed = list(model.model_fields) if model else []
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parts.append(f"unknown key {loc!r}{hint}; allowed {where} keys: {', '.join(allowed)}")
        elif e["type"] == "missing":
            parts.append(f"missing key {loc!r}")
        else:
            parts.append(f"{loc}: {e['msg']} (found {e.get('input')!r})")
    return f"{path}: " + "; ".join(parts)


def resolve_base(base: str, where: Path) -> Path:
    if base.startswith(BUILTIN_PREFIX):
        name = base[len(BUILTIN_PREFIX):]
        if name not in builtin_names():
            raise ModelfileError(f"{where}: base {base!r}: unknown built-in; built-in: "
                                 f"{[BUILTIN_PREFIX + n for n in builtin_names()]}")
        return builtin_path(name)
    path = (where.parent / base).resolve()
    if not path.is_file():
        raise ModelfileError(f"{where}: base {base!r} not found (looked at {path}); give a .gguf path relative to "
                             f"the modelfile or {BUILTIN_PREFIX}{builtin_names()[0]}")
    return path


def load_modelfile(path: str | Path, check_adapters: bool = True) -> Modelfile:
    path = Path(path)
    if not path.is_file():
        raise ModelfileError(f"modelfile {str(path)!r} not found")
    kind = fmt.gguf_kind(path)
    if kind is not None:
        raise ModelfileError(f"{path} is a GGUF {kind}, not a YAML modelfile; " + (
            f"run a base GGUF directly: avgguf run {path} \"PROMPT\" [--lora AV.gguf[=SCALE] ...]" if kind == "model"
            else f"an adapter needs a base: avgguf run BASE.gguf \"PROMPT\" --lora {path}[=SCALE]"))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelfileError(f"{path} is not a text file; expected a YAML modelfile (see modelfiles/demo.yaml) "
                             f"or a .gguf base model") from None
    except yaml.YAMLError as exc:
        raise ModelfileError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelfileError(f"{path}: expected a mapping with at least 'base', found {type(raw).__name__}")
    try:
        spec = ModelfileSpec.model_validate(raw)
    except ValidationError as exc:
        raise ModelfileError(_format_validation(path, exc)) from None

    for profile, coefs in spec.profiles.items():
        for name, value in coefs.items():
            if name not in spec.avs:
                raise ModelfileError(f"{path}: profiles.{profile}: unknown alignment vector {name!r}; "
                                     f"avs: {sorted(spec.avs) or 'none'}")
            try:
                check_value(name, value, f"{path}: profiles.{profile}")
            except CoefficientError as exc:
                raise ModelfileError(str(exc)) from None
    if spec.default_profile is not None and spec.default_profile not in spec.profiles:
        raise ModelfileError(f"{path}: default_profile {spec.default_profile!r} is not among profiles "
                             f"{sorted(spec.profiles)}")
    base_path = resolve_base(spec.base, path)
    av_paths = {}
    for name, av in spec.avs.items():
        p = (path.parent / av.path).resolve()
        if not p.is_file():
            raise ModelfileError(f"{path}: avs.{name}: adapter {av.path!r} not found (looked at {p})")
        av_paths[name] = p
    mf = Modelfile(path, spec, base_path, av_paths, _baked_paths(path, spec))
    if check_adapters and av_paths:
        base = fmt.read_base_model(base_path)
        for name, p in av_paths.items():
            try:
                fmt.check_against_base(fmt.read_adapter(p), base)
            except AvggufError as exc:
                raise ModelfileError(f"{path}: avs.{name}: {exc}") from None
    return mf


def _baked_paths(path: Path, spec: ModelfileSpec) -> dict[str, Path]:
    out = {}
    for name, rel in spec.baked.items():
        if name in spec.profiles:
            raise ModelfileError(f"{path}: baked.{name}: a profile of that name exists too; rename one")
        p = (path.parent / rel).resolve()
        if not p.is_file():
            raise ModelfileError(f"{path}: baked.{name}: {rel!r} not found (looked at {p}); make it with "
                                 f"avgguf bake {path.name}:PROFILE --format gguf --out {rel}")
        if fmt.gguf_kind(p) != "model":
            raise ModelfileError(f"{path}: baked.{name}: {rel!r} is not a GGUF model (a baked profile is a whole "
                                 f"model: avgguf bake --format gguf)")
        out[name] = p
    return out


def parse_target(target: str) -> tuple[str, str | None]:
    """'modelfiles/demo.yaml:expert' -> ('modelfiles/demo.yaml', 'expert')."""
    if ":" in target and not Path(target).is_file():
        path, _, profile = target.rpartition(":")
        return path, profile or None
    return target, None


LORA_PROFILE = "lora"  # the profile a bare GGUF's --lora scales become (its default, like llama-server's scales)


def parse_lora(item: str) -> tuple[Path, float]:
    """'med.gguf=0.8' -> (Path('med.gguf'), 0.8); 'med.gguf' -> scale 1.0, as llama.cpp's --lora."""
    path, sep, scale = item.rpartition("=")
    if sep and not Path(item).is_file():
        try:
            return Path(path), check_value(Path(path).stem, float(scale), f"--lora {item}")
        except ValueError:
            raise ModelfileError(f"--lora {item!r}: expected PATH[=SCALE] with a number after '=', "
                                 f"found {scale!r}") from None
    return Path(item), 1.0


def _av_name(info: fmt.AdapterInfo, taken: set[str]) -> str:
    raw = str(info.meta.get(fmt.KEY_NAME) or info.path.stem)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in raw) or "av"
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def modelfile_from_gguf(base: Path, loras: list[tuple[Path, float]]) -> Modelfile:
    """A base GGUF plus adapters given on the command line, as an in-memory modelfile: AV names from each
    adapter's avgguf.av.name (else its file stem), the given scales as its default profile 'lora'."""
    base_path = base.resolve()
    base_info = fmt.read_base_model(base_path)
    av_paths: dict[str, Path] = {}
    scales: dict[str, float] = {}
    for path, scale in loras:
        if not path.is_file():
            raise ModelfileError(f"--lora {str(path)!r} not found")
        info = fmt.read_adapter(path)
        fmt.check_against_base(info, base_info)
        name = _av_name(info, set(av_paths))
        av_paths[name], scales[name] = path.resolve(), scale
    spec = ModelfileSpec(base=str(base_path), avs={n: AVSpec(path=str(p)) for n, p in av_paths.items()},
                         profiles={LORA_PROFILE: scales} if loras else {},
                         default_profile=LORA_PROFILE if loras else None)
    return Modelfile(base_path, spec, base_path, av_paths)


def open_target(target: str, loras: list[str] | None = None) -> tuple[Modelfile, str | None]:
    """What the CLI accepts where a model is expected: MODELFILE[:PROFILE], BASE.gguf or builtin:NAME (then
    adapters come from --lora PATH[=SCALE]). Returns the modelfile and the profile named, if any."""
    loras = loras or []
    if target.startswith(BUILTIN_PREFIX):
        return modelfile_from_gguf(resolve_base(target, Path("command line")), [parse_lora(x) for x in loras]), None
    path, profile = parse_target(target)
    if not Path(path).is_file():
        raise ModelfileError(f"{path!r} not found; expected a YAML modelfile, a base .gguf or "
                             f"{BUILTIN_PREFIX}{builtin_names()[0]} (`avgguf profiles --builtins` lists them)")
    kind = fmt.gguf_kind(path)
    if kind == "adapter":
        raise ModelfileError(f"{path} is a LoRA adapter, not a base model; give the base and the adapter: "
                             f"BASE.gguf --lora {path}[=SCALE]")
    if kind == "model":
        if profile:
            raise ModelfileError(f"{target!r}: a bare GGUF has no profiles; set coefficients with --lora/--set")
        return modelfile_from_gguf(Path(path), [parse_lora(x) for x in loras]), None
    if loras:
        raise ModelfileError(f"--lora applies to a bare base GGUF; {path} is a modelfile: list the adapter "
                             f"under its avs: instead")
    mf = load_modelfile(path)
    if profile in mf.baked_paths:
        return mf.baked(profile), None
    mf.coefficients(profile)  # an unknown profile fails before any model loads
    return mf, profile


PROFILE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


def _flow(coefs: dict[str, float], decode: str | None) -> str:
    items = [f"{k}: {v:g}" for k, v in coefs.items()] + ([f"decode: {decode}"] if decode and decode != "weights" else [])
    return "{" + ", ".join(items) + "}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def with_profile(text: str, name: str, coefs: dict[str, float], decode: str | None = None) -> str:
    """The modelfile's text with profile `name` added or replaced; every other line (comments too) kept."""
    import re

    lines = text.splitlines()
    head = next((i for i, ln in enumerate(lines) if re.match(r"^profiles\s*:", ln)), None)
    if head is None:
        return "\n".join([*lines, "profiles:", f"  {name}: {_flow(coefs, decode)}"]) + "\n"
    if not re.match(r"^profiles\s*:\s*(#.*)?$", lines[head]):  # flow style, e.g. `profiles: {}`
        lines[head] = "profiles:"
        if yaml.safe_load(text).get("profiles"):
            raise ModelfileError("profiles are written in YAML flow style ({...}); write them one per line "
                                 "under `profiles:` so a new one can be added without losing your formatting")
    end, existing, indent = head + 1, None, None
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > 0):
        if lines[end].strip() and not lines[end].lstrip().startswith("#"):
            indent = indent if indent is not None else _indent(lines[end])
            if _indent(lines[end]) == indent and re.match(rf"^\s*{re.escape(name)}\s*:", lines[end]):
                existing = end
        end += 1
    while end > head + 1 and not lines[end - 1].strip():
        end -= 1  # keep blank lines after the block where they were
    entry = " " * (indent or 2) + f"{name}: {_flow(coefs, decode)}"
    if existing is None:
        lines.insert(end, entry)
    else:
        stop = existing + 1
        while stop < end and (not lines[stop].strip() or _indent(lines[stop]) > (indent or 2)):
            stop += 1
        lines[existing:stop] = [entry]
    return "\n".join(lines) + "\n"


def save_profile(mf: Modelfile, name: str, coefs: dict[str, float], decode: str | None = None) -> Modelfile:
    """Write profile `name` into the modelfile atomically (validated first; comments kept); the reloaded file."""
    import os
    import re
    import tempfile

    if not re.fullmatch(PROFILE_NAME, name):
        raise ModelfileError(f"profile name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    if mf.path.suffix.lower() == ".gguf" or not mf.path.is_file():
        raise ModelfileError("this model is a bare GGUF: there is no modelfile to save a profile into")
    if name in mf.baked_paths:
        raise ModelfileError(f"{name!r} is a baked profile in {mf.path}; choose another name")
    checked = mf.resolver.resolve(None, overrides=coefs, source="profile")
    text = with_profile(mf.path.read_text(encoding="utf-8"), name, checked, decode)
    fd, tmp = tempfile.mkstemp(dir=mf.path.parent, prefix=f".{mf.path.stem}-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        load_modelfile(tmp)  # the new text must be a valid modelfile before it replaces the old one
        os.chmod(tmp, mf.path.stat().st_mode & 0o777)
        os.replace(tmp, mf.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return load_modelfile(mf.path)
