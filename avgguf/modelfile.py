"""Modelfiles: YAML naming a base model, its alignment vectors, named coefficient profiles and
generation defaults. Validated at the edge with precise messages (file, key, expected vs found)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import adapter_format as fmt
from .errors import AvggufError
from .models import builtin_names, builtin_path

# Coefficients outside this range push SmolLM2-class models into degenerate text; larger models may
# tolerate more, but a typo like 80 instead of 0.8 should fail loudly.
COEF_MIN, COEF_MAX = -2.0, 2.0
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
    n_threads: int | None = Field(None, ge=1)
    n_gpu_layers: int = Field(0, ge=-1)


class AVSpec(Strict):
    path: str
    description: str = ""


class ModelfileSpec(Strict):
    base: str
    description: str = ""
    system: str | None = None
    avs: dict[str, AVSpec] = {}
    profiles: dict[str, dict[str, float]] = {}
    default_profile: str | None = None
    defaults: Defaults = Defaults()

    @field_validator("avs", mode="before")
    @classmethod
    def _short_avs(cls, v: Any):
        if isinstance(v, dict):
            return {k: ({"path": p} if isinstance(p, str) else p) for k, p in v.items()}
        return v


def check_coefficient(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelfileError(f"{where}: coefficient {name!r} must be a number in [{COEF_MIN}, {COEF_MAX}], "
                             f"found {value!r}")
    value = float(value)
    if not math.isfinite(value) or not COEF_MIN <= value <= COEF_MAX:
        raise ModelfileError(f"{where}: coefficient {name!r} = {value} is outside [{COEF_MIN}, {COEF_MAX}]")
    return value


@dataclass
class Modelfile:
    path: Path
    spec: ModelfileSpec
    base_path: Path
    av_paths: dict[str, Path]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def profiles(self) -> dict[str, dict[str, float]]:
        return dict(self.spec.profiles)

    def coefficients(self, profile: str | None = None, overrides: dict[str, float] | None = None) -> dict[str, float]:
        """All AVs at 0, then the profile (or default_profile), then per-call overrides; validated."""
        coefs = {name: 0.0 for name in self.av_paths}
        profile = profile or self.spec.default_profile
        if profile is not None:
            if profile not in self.spec.profiles:
                raise ModelfileError(f"{self.path}: no profile {profile!r}; profiles: "
                                     f"{sorted(self.spec.profiles) or 'none'}")
            coefs.update(self.spec.profiles[profile])
        for name, value in (overrides or {}).items():
            if name not in self.av_paths:
                raise ModelfileError(f"unknown alignment vector {name!r}; {self.path.name} has "
                                     f"{sorted(self.av_paths) or 'none'}")
            coefs[name] = check_coefficient(name, value, "override")
        return coefs


def _format_validation(path: Path, exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif e["type"] == "missing":
            parts.append(f"missing key {loc!r}")
        else:
            parts.append(f"{loc}: {e['msg']} (found {e.get('input')!r})")
    keys = "base, description, system, avs, profiles, default_profile, defaults"
    return f"{path}: " + "; ".join(parts) + f". Allowed top-level keys: {keys}"


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
    try:
        raw = yaml.safe_load(path.read_text())
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
            check_coefficient(name, value, f"{path}: profiles.{profile}")
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
    mf = Modelfile(path, spec, base_path, av_paths)
    if check_adapters and av_paths:
        base = fmt.read_base_model(base_path)
        for name, p in av_paths.items():
            try:
                fmt.check_against_base(fmt.read_adapter(p), base)
            except AvggufError as exc:
                raise ModelfileError(f"{path}: avs.{name}: {exc}") from None
    return mf


def parse_target(target: str) -> tuple[str, str | None]:
    """'modelfiles/demo.yaml:expert' -> ('modelfiles/demo.yaml', 'expert')."""
    if ":" in target and not Path(target).is_file():
        path, _, profile = target.rpartition(":")
        return path, profile or None
    return target, None


def parse_assignments(items: list[str]) -> dict[str, float]:
    """['medical=0.8', 'legal=-0.5'] -> {'medical': 0.8, 'legal': -0.5}."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ModelfileError(f"expected NAME=VALUE (e.g. medical=0.8), found {item!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ModelfileError(f"{name.strip()}: expected a number, found {value.strip()!r}") from None
    return out
