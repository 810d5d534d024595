"""Modelfiles: YAML naming a base model, its alignment vectors, named coefficient profiles and
generation defaults. Validated at the edge with precise messages (file, key, expected vs found)."""

from __future__ import annotations

import difflib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
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

from avgguf.gguf import adapter_format as fmt
from avgguf.gguf import control_vector as cvf
from avgguf.config.coefficients import CoefficientError, Resolver, check_value
from avgguf.errors import AvggufError
from avgguf.config.builtin import builtin_names, builtin_path
from avgguf.config.safe_yaml import YAMLLimitError, parse_yaml, short

BUILTIN_PREFIX = "builtin:"
MAX_MODELFILE_BYTES = 1 << 20  # a modelfile is a short YAML file; anything larger is not one
RESERVED_AV_NAMES = ("decode",)  # a profile's `decode:` key is its decoding mode, not a coefficient


class ModelfileError(AvggufError):
    pass


class Strict(BaseModel):
    """No unknown keys, no NaN/Inf; a modelfile is validated with strict=True too (no `true` or "1.5" read as
    a number)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Defaults(Strict):
    max_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    repeat_penalty: float = Field(1.1, ge=0.0)
    seed: int | None = None
    n_ctx: int = Field(2048, ge=64)
    n_threads: int | None = Field(None, ge=0)  # None or 0: adaptive (avgguf.runtime.threads)
    n_gpu_layers: int = Field(0, ge=-1)
    merge: Literal["auto", "on", "off"] = "auto"  # a set in use runs on merged weights (avgguf.runtime.merged)
    fused_rank: int | None = Field(None, ge=1)  # a set's fused adapter re-compressed to this rank (not exact)


class AVSpec(Strict):
    path: str
    description: str = ""


class ModelfileSpec(Strict):
    """The modelfile's keys. `system:` is the system prompt of every chat turn; `system_policy` says what a
    client's own system message does to it:
      default  the client's system message replaces the modelfile's (as llama-server and Ollama do);
      enforce  the modelfile's system prompt always comes first; a client's system (or developer) messages
               are appended after it, in one system turn, so a client can add instructions but never remove
               the operator's."""

    base: str
    description: str = ""
    system: str | None = None
    system_policy: Literal["default", "enforce"] = "default"
    avs: dict[str, AVSpec] = {}
    profiles: dict[str, dict[str, float]] = {}
    baked: dict[str, str] = {}  # profile name -> a baked GGUF (`avgguf bake --format gguf`): full speed, no knobs
    default_profile: str | None = None
    defaults: Defaults = Defaults()
    profile_decode: dict[str, Literal["weights", "pad", "pad-full"]] = {}  # from each profile's `decode:` key
    # blocks the control vectors among the avs apply to, inclusive (llama.cpp's --control-vector-layer-range);
    # None: all (1..n_layer)
    control_vector_layers: list[int] | None = None

    @field_validator("control_vector_layers")
    @classmethod
    def _layer_range(cls, v):
        if v is not None and len(v) != 2:
            raise ValueError(f"control_vector_layers is [START, END] (two block numbers), found {v}")
        if v is not None and v[0] > 0 and v[1] > 0 and v[0] > v[1]:
            raise ValueError(f"control_vector_layers [{v[0]}, {v[1]}] is empty: START must be <= END")
        return v

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
            given = raw.get("profile_decode", {})
            merged = {**given, **decode} if isinstance(given, dict) else given
            raw = {**raw, "profiles": profiles, "profile_decode": merged}
        return raw

    @field_validator("avs", mode="before")
    @classmethod
    def _short_avs(cls, v: Any):
        if isinstance(v, dict):
            return {k: ({"path": p} if isinstance(p, str) else p) for k, p in v.items()}
        return v

    @field_validator("avs")
    @classmethod
    def _av_names(cls, v: dict[str, AVSpec]):
        for name in v:
            if name in RESERVED_AV_NAMES or not name.strip():
                raise ValueError(f"an AV may not be named {name!r} (in a profile, `decode:` is the decoding mode); rename it")
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
        spec = ModelfileSpec(
            base=str(path),
            description=f"{self.name}:{profile} (baked)",
            system=self.spec.system,
            system_policy=self.spec.system_policy,
            defaults=self.spec.defaults,
        )
        return Modelfile(self.path, spec, path, {})

    def system_messages(self, messages: list[dict]) -> list[dict]:
        """The messages of a chat turn with this modelfile's `system:` applied by its `system_policy`
        (see ModelfileSpec): default adds it only when no message has role system; enforce puts it first
        and appends every client system/developer message's text after it, in that one system turn."""
        system = self.spec.system
        if not system:
            return list(messages)
        if self.spec.system_policy != "enforce":
            if any(m.get("role") == "system" for m in messages):
                return list(messages)
            return [{"role": "system", "content": system}, *messages]
        extra = [_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
        rest = [m for m in messages if m.get("role") not in ("system", "developer")]
        content = "\n\n".join([system, *(t for t in extra if t)])
        return [{"role": "system", "content": content}, *rest]

    def with_saved_profile(self, name: str, coefs: dict[str, float], decode: str | None = None) -> Modelfile:
        """This modelfile with profile `name` set in memory (what a save wrote), nothing else changed."""
        decodes = {k: v for k, v in self.spec.profile_decode.items() if k != name}
        if decode and decode != "weights":
            decodes[name] = decode
        spec = self.spec.model_copy(update={"profiles": {**self.spec.profiles, name: dict(coefs)}, "profile_decode": decodes})
        return Modelfile(self.path, spec, self.base_path, self.av_paths, self.baked_paths)

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
        return Resolver(tuple(self.av_paths), dict(self.spec.profiles), self.spec.default_profile, where=str(self.path))

    def coefficients(
        self, profile: str | None = None, overrides: dict[str, float] | None = None, source: str = "override"
    ) -> dict[str, float]:
        """All AVs at 0, then the profile (or default_profile), then per-call overrides; validated."""
        return self.resolver.resolve(profile, overrides=overrides, source=source)


def _text(content: Any) -> str:
    """A message's content as text (OpenAI's list of parts too)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "" if content is None else str(content)


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


HIDDEN_KEYS = ("profile_decode",)  # filled from each profile's `decode:`, not written by hand


def _loc(loc: tuple) -> str:
    if loc[:1] == ("profile_decode",) and len(loc) == 2:  # the user wrote profiles.NAME.decode
        loc = ("profiles", loc[1], "decode")
    return ".".join(str(x)[:80] for x in loc if x != "[key]") or "(top level)"


def _format_validation(path: Path, exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = _loc(e["loc"])
        if e["type"] == "extra_forbidden":
            where, model = _section(e["loc"])
            allowed = [k for k in (model.model_fields if model else []) if k not in HIDDEN_KEYS]
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if not isinstance(e["loc"][-1], str):
                hint = f" (YAML reads it as {type(e['loc'][-1]).__name__}; quote it if you meant text)"
            parts.append(f"unknown key {short(loc)}{hint}; allowed {where} keys: {', '.join(allowed)}")
        elif e["type"] == "missing":
            parts.append(
                f"missing key {loc!r}"
                + (
                    f" (the base model: a .gguf path relative to the modelfile, or {BUILTIN_PREFIX}{builtin_names()[0]})"
                    if e["loc"] == ("base",)
                    else ""
                )
            )
        elif e["loc"][-1:] == ("[key]",):
            section = _loc(e["loc"][:-2])
            parts.append(
                f"{section}: a name YAML reads as {type(e.get('input')).__name__} "
                f"({short(e.get('input'))}), not text (yes/no/on/off/null and numbers are read so); "
                f"quote it, e.g. 'yes': ..."
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (found {short(e.get('input'))})")
    more = len(exc.errors()) - 5
    return f"{path}: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def resolve_base(base: str, where: Path) -> Path:
    if base.startswith(BUILTIN_PREFIX):
        name = base[len(BUILTIN_PREFIX) :]
        if name not in builtin_names():
            raise ModelfileError(
                f"{where}: base {base!r}: unknown built-in; built-in: {[BUILTIN_PREFIX + n for n in builtin_names()]}"
            )
        return builtin_path(name)
    path = (where.parent / base).resolve()
    if not path.is_file():
        raise ModelfileError(
            f"{where}: base {short(base)} not found (looked at {short(str(path))}); give a .gguf "
            f"path relative to the modelfile or {BUILTIN_PREFIX}{builtin_names()[0]}"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != fmt.GGUF_MAGIC:
        raise ModelfileError(
            f"{where}: base {short(base)} ({short(str(path))}) is not a GGUF file (it starts with "
            f"{magic!r}, a GGUF with b'GGUF'); name a .gguf base model (convert a Hugging Face "
            f"checkpoint with llama.cpp's convert_hf_to_gguf.py)"
        )
    return path


def read_modelfile_text(path: Path) -> str:
    """The modelfile's text, or a ModelfileError saying what the file is instead."""
    if not path.is_file():
        raise ModelfileError(f"modelfile {short(str(path))} not found")
    kind = fmt.gguf_kind(path)
    if kind is not None:
        raise ModelfileError(
            f"{path} is a GGUF {kind}, not a YAML modelfile; "
            + (
                f'run a base GGUF directly: avgguf run {path} "PROMPT" [--lora AV.gguf[=SCALE] ...]'
                if kind == "model"
                else f'an adapter needs a base: avgguf run BASE.gguf "PROMPT" --lora {path}[=SCALE]'
            )
        )
    size = path.stat().st_size
    if size > MAX_MODELFILE_BYTES:
        raise ModelfileError(
            f"{path} is {size / 2**20:.1f} MiB; a modelfile is a short YAML file (at most "
            f"{MAX_MODELFILE_BYTES // 2**20} MiB, see modelfiles/demo.yaml): is this the right file?"
        )
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ModelfileError(
            f"{path} is not a text file; expected a YAML modelfile (see modelfiles/demo.yaml) or a .gguf base model"
        ) from None


def load_modelfile(path: str | Path, check_adapters: bool = True) -> Modelfile:
    path = Path(path)
    return parse_modelfile(read_modelfile_text(path), path, check_adapters)


def _yaml_message(path: Path, exc: yaml.YAMLError, text: str) -> str:
    """One line: file:line:column, what the YAML parser found, where the construct started, the line itself."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow (a code point, at an offset)
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return (
            f"{path}:{line}: not valid YAML: character #x{code:04x} is not allowed in YAML ({exc.reason}); "
            f"remove it (is this a text modelfile?)"
        )
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    message = f"{where}: not valid YAML: {problem}"
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        message += f" ({context}" + (f" started at line {cmark.line + 1})" if cmark is not None else ")")
    if mark is not None:
        lines = text.splitlines()
        if mark.line < len(lines):
            message += f"; the line: {short(lines[mark.line], 100)}"
    if "\t" in problem or "cannot start any token" in problem and "\t" in text:
        message += "; YAML does not allow tabs for indentation: indent with spaces"
    return message


def parse_modelfile(text: str, path: Path, check_adapters: bool = True) -> Modelfile:
    """A modelfile from its text, as if read from `path` (relative paths resolve beside it); validated."""
    try:
        raw = parse_yaml(text)
    except YAMLLimitError as exc:
        raise ModelfileError(f"{path}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise ModelfileError(_yaml_message(path, exc, text)) from None
    except RecursionError:
        raise ModelfileError(f"{path}: refused: nested too deeply to read") from None
    if raw is None:
        raise ModelfileError(f"{path} is empty; a modelfile needs at least `base: MODEL.gguf` (see modelfiles/demo.yaml)")
    if not isinstance(raw, dict):
        raise ModelfileError(
            f"{path}: expected a mapping of keys (base:, avs:, profiles:, ...), found a YAML "
            f"{type(raw).__name__} ({short(raw, 80)}); see modelfiles/demo.yaml"
        )
    try:
        spec = ModelfileSpec.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise ModelfileError(_format_validation(path, exc)) from None
    except RecursionError:
        raise ModelfileError(f"{path}: refused: nested too deeply to validate") from None

    for profile, coefs in spec.profiles.items():
        for name, value in coefs.items():
            if name not in spec.avs:
                raise ModelfileError(
                    f"{path}: profiles.{profile}: unknown alignment vector {short(name)}; avs: {sorted(spec.avs) or 'none'}"
                )
            try:
                check_value(name, value, f"{path}: profiles.{profile}")
            except CoefficientError as exc:
                raise ModelfileError(str(exc)) from None
    if spec.default_profile is not None and spec.default_profile not in spec.profiles:
        raise ModelfileError(
            f"{path}: default_profile {short(spec.default_profile)} is not among profiles {sorted(spec.profiles)}"
        )
    base_path = resolve_base(spec.base, path)
    av_paths = {}
    for name, av in spec.avs.items():
        p = (path.parent / av.path).resolve()
        if not p.is_file():
            raise ModelfileError(f"{path}: avs.{name}: adapter {short(av.path)} not found (looked at {short(str(p))})")
        av_paths[name] = p
    mf = Modelfile(path, spec, base_path, av_paths, _baked_paths(path, spec))
    if check_adapters and av_paths:
        check_adapters_fit(path, base_path, av_paths)
    return mf


_FITS: OrderedDict[tuple, None] = OrderedDict()  # (base, adapter) file identities checked to fit
_FITS_LOCK = threading.Lock()
_FITS_MAX = 256


def _identity(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


_KINDS: OrderedDict[tuple, str | None] = OrderedDict()


def _gguf_kind(path: Path) -> str | None:
    """fmt.gguf_kind, remembered while the file is unchanged (it parses the whole GGUF header)."""
    key = _identity(path)
    with _FITS_LOCK:
        if key in _KINDS:
            return _KINDS[key]
    kind = fmt.gguf_kind(path)
    with _FITS_LOCK:
        _KINDS[key] = kind
        while len(_KINDS) > _FITS_MAX:
            _KINDS.popitem(last=False)
    return kind


def check_adapters_fit(where: Path, base_path: Path, av_paths: dict[str, Path]) -> None:
    """Every AV is a valid adapter for the base (adapter_format's checks). A pair already checked in this
    process is not read again while neither file changed (path, inode, size and mtime): a profile save
    then costs no GGUF parse."""
    base_id = _identity(base_path)
    todo = {}
    for name, p in av_paths.items():
        key = (base_id, _identity(p))
        with _FITS_LOCK:
            if key in _FITS:
                _FITS.move_to_end(key)
                continue
        todo[name] = (p, key)
    if not todo:
        return
    try:
        base = fmt.read_base_model(base_path)
    except AvggufError as exc:
        raise ModelfileError(f"{where}: base: {exc}") from None
    for name, (p, key) in todo.items():
        try:
            check_knob(p, base)
        except AvggufError as exc:
            raise ModelfileError(f"{where}: avs.{name}: {exc}") from None
        with _FITS_LOCK:
            _FITS[key] = None
            while len(_FITS) > _FITS_MAX:
                _FITS.popitem(last=False)


def check_knob(path: Path, base: fmt.BaseModelInfo) -> None:
    """A LoRA adapter or a control vector (told apart by the file: avgguf.gguf.control_vector) fits the base."""
    if cvf.is_control_vector(path):
        cv = cvf.read_control_vector(path)
        cvf.check_against_base(cv, base.embedding_length, base.block_count, base.arch, str(base.path))
    else:
        fmt.check_against_base(fmt.read_adapter(path), base)


def _baked_paths(path: Path, spec: ModelfileSpec) -> dict[str, Path]:
    out = {}
    for name, rel in spec.baked.items():
        if name in spec.profiles:
            raise ModelfileError(f"{path}: baked.{name}: a profile of that name exists too; rename one")
        p = (path.parent / rel).resolve()
        if not p.is_file():
            raise ModelfileError(
                f"{path}: baked.{name}: {rel!r} not found (looked at {p}); make it with "
                f"avgguf bake {path.name}:PROFILE --format gguf --out {rel}"
            )
        if _gguf_kind(p) != "model":
            raise ModelfileError(
                f"{path}: baked.{name}: {rel!r} is not a GGUF model (a baked profile is a whole model: avgguf bake --format gguf)"
            )
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
            raise ModelfileError(f"--lora {item!r}: expected PATH[=SCALE] with a number after '=', found {scale!r}") from None
    return Path(item), 1.0


def _unique_name(raw: str, taken: set[str]) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in raw) or "av"
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def modelfile_from_gguf(base: Path, loras: list[tuple[Path, float]], cvec_layers: tuple[int, int] | None = None) -> Modelfile:
    """A base GGUF plus adapters given on the command line, as an in-memory modelfile: AV names from each
    adapter's avgguf.av.name (else its file stem), the given scales as its default profile 'lora'."""
    base_path = base.resolve()
    base_info = fmt.read_base_model(base_path)
    av_paths: dict[str, Path] = {}
    scales: dict[str, float] = {}
    for path, scale in loras:
        if not path.is_file():
            hint = "; a comma list is not split: repeat --lora for each adapter" if "," in str(path) else ""
            raise ModelfileError(f"--lora {str(path)!r} not found{hint}")
        if cvf.is_control_vector(path):  # --control-vector, or a control vector given to --lora
            cv = cvf.read_control_vector(path)
            cvf.check_against_base(cv, base_info.embedding_length, base_info.block_count, base_info.arch, str(base_path))
            raw_name = cv.meta.get("general.name") or path.stem
        else:
            info = fmt.read_adapter(path)
            fmt.check_against_base(info, base_info)
            raw_name = info.meta.get(fmt.KEY_NAME) or info.path.stem
        name = _unique_name(str(raw_name), set(av_paths))
        av_paths[name], scales[name] = path.resolve(), scale
    spec = ModelfileSpec(
        base=str(base_path),
        avs={n: AVSpec(path=str(p)) for n, p in av_paths.items()},
        profiles={LORA_PROFILE: scales} if loras else {},
        default_profile=LORA_PROFILE if loras else None,
        control_vector_layers=list(cvec_layers) if cvec_layers else None,
    )
    return Modelfile(base_path, spec, base_path, av_paths)


def open_target(
    target: str, loras: list[str] | None = None, cvec_layers: tuple[int, int] | None = None
) -> tuple[Modelfile, str | None]:
    """What the CLI accepts where a model is expected: MODELFILE[:PROFILE], BASE.gguf or builtin:NAME (then
    adapters and control vectors come from --lora/--control-vector PATH[=SCALE]; `cvec_layers`:
    --control-vector-layer-range, which overrides a modelfile's control_vector_layers). Returns the modelfile
    and the profile named, if any."""
    loras = loras or []
    if target.startswith(BUILTIN_PREFIX):
        base = resolve_base(target, Path("command line"))
        return modelfile_from_gguf(base, [parse_lora(x) for x in loras], cvec_layers), None
    path, profile = parse_target(target)
    if not Path(path).is_file():
        raise ModelfileError(
            f"{path!r} not found; expected a YAML modelfile, a base .gguf or "
            f"{BUILTIN_PREFIX}{builtin_names()[0]} (`avgguf profiles --builtins` lists them)"
        )
    kind = fmt.gguf_kind(path)
    if kind == "adapter":
        raise ModelfileError(
            f"{path} is a LoRA adapter, not a base model; give the base and the adapter: BASE.gguf --lora {path}[=SCALE]"
        )
    if kind == "model":
        if profile:
            raise ModelfileError(f"{target!r}: a bare GGUF has no profiles; set coefficients with --lora/--set")
        return modelfile_from_gguf(Path(path), [parse_lora(x) for x in loras], cvec_layers), None
    if loras:
        raise ModelfileError(
            f"--lora applies to a bare base GGUF; {path} is a modelfile: list the adapter under its avs: instead"
        )
    mf = load_modelfile(path)
    if cvec_layers is not None:
        mf = replace(mf, spec=mf.spec.model_copy(update={"control_vector_layers": list(cvec_layers)}))
    if profile in mf.baked_paths:
        return mf.baked(profile), None
    mf.coefficients(profile)  # an unknown profile fails before any model loads
    return mf, profile


PROFILE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
