"""Renaming and deleting a profile, and setting the default profile, in a modelfile (the chat page's profile
editor); saving one is avgguf.config.profile_save.

As there: the file's text is edited (every other line and comment kept), the edit is checked in memory to
give exactly the expected spec, then written atomically under the modelfile's advisory lock, read back and
checked again (on a difference the old text is put back)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from avgguf.atomic import remove_stale, resolve_target, write_bytes_atomic
from avgguf.config.modelfile import PROFILE_NAME, Modelfile, ModelfileError, ModelfileSpec, parse_modelfile
from avgguf.config.profile_save import _comment_or_blank, _indent, modelfile_lock, yaml_key
from avgguf.config.safe_yaml import short

_DEFAULT = re.compile(r"^default_profile\s*:")


def _entry_span(lines: list[str], name: str) -> tuple[int, int]:
    """(first, stop) of profile `name`'s lines under `profiles:` (its continuation lines included, the blank
    lines and comments after it not)."""
    head = next((i for i, ln in enumerate(lines) if re.match(r"^profiles\s*:", ln)), None)
    if head is None:
        raise ModelfileError(f"no `profiles:` block holds {name!r}")
    end = head + 1
    while end < len(lines) and (_indent(lines[end]) > 0 or _comment_or_blank(lines[end])):
        end += 1
    entries = [i for i in range(head + 1, end) if not _comment_or_blank(lines[i])]
    indent = min((_indent(lines[i]) for i in entries), default=2)
    own = re.compile(rf"^\s*(['\"]?){re.escape(name)}\1\s*:")
    first = next((i for i in entries if _indent(lines[i]) == indent and own.match(lines[i])), None)
    if first is None:
        raise ModelfileError(f"profile {name!r} is not written one per line under `profiles:` (flow style?); edit it by hand")
    stop = first + 1
    while stop < end and (_comment_or_blank(lines[stop]) or _indent(lines[stop]) > indent):
        stop += 1
    while stop > first + 1 and _comment_or_blank(lines[stop - 1]):
        stop -= 1
    return first, stop


def _set_default(lines: list[str], name: str | None) -> list[str]:
    at = next((i for i, ln in enumerate(lines) if _DEFAULT.match(ln)), None)
    entry = [f"default_profile: {yaml_key(name)}"] if name else []
    if at is not None:
        return lines[:at] + entry + lines[at + 1 :]
    head = next((i for i, ln in enumerate(lines) if re.match(r"^profiles\s*:", ln)), len(lines))
    return lines[:head] + entry + lines[head:]


def _join(text: str, lines: list[str]) -> str:
    newline = "\r\n" if "\r\n" in text else "\n"
    return newline.join(lines) + newline


def without_profile(text: str, name: str, default: str | None) -> str:
    """The text with profile `name` removed (and `default_profile:` with it, when it named that profile)."""
    lines = text.splitlines()
    first, stop = _entry_span(lines, name)
    lines[first:stop] = []
    return _join(text, _set_default(lines, None) if default == name else lines)


def renamed_profile(text: str, name: str, new: str, default: str | None) -> str:
    lines = text.splitlines()
    first, _ = _entry_span(lines, name)
    lines[first] = re.sub(rf"^(\s*)(['\"]?){re.escape(name)}\2(\s*:)", lambda m: m[1] + yaml_key(new) + m[3], lines[first])
    return _join(text, _set_default(lines, new) if default == name else lines)


def with_default(text: str, name: str | None) -> str:
    return _join(text, _set_default(text.splitlines(), name))


def _check(path: Path, text: str, want: ModelfileSpec, what: str) -> Modelfile:
    after = parse_modelfile(text, path, check_adapters=False)
    if after.spec.model_dump() != want.model_dump():
        raise ModelfileError(f"{path}: {what} in the text would change more than that; edit the modelfile by hand")
    return after


def _edit(mf: Modelfile, what: str, edit: Callable[[str, ModelfileSpec], str], expect) -> Modelfile:
    """Under the lock: the file as it is now, edited, checked, written, read back; the Modelfile in memory
    with only the profiles part changed (other edits since the start wait for a restart)."""
    if mf.path.suffix.lower() == ".gguf" or not mf.path.is_file():
        raise ModelfileError("this model is a bare GGUF: there is no modelfile to edit profiles in")
    target = resolve_target(mf.path)
    with modelfile_lock(target):
        old_bytes = target.read_bytes()
        try:
            old_text = old_bytes.decode("utf-8")
            before = parse_modelfile(old_text, mf.path, check_adapters=False)
        except (UnicodeDecodeError, ModelfileError) as exc:
            raise ModelfileError(f"the modelfile on disk no longer loads, so nothing was changed: {exc}") from None
        want = expect(before.spec)
        new_text = edit(old_text, before.spec)
        _check(mf.path, new_text, want, what)
        remove_stale(target.parent)
        write_bytes_atomic(target, new_text.encode("utf-8"))
        try:
            _check(mf.path, target.read_bytes().decode("utf-8"), want, what)
        except (ModelfileError, UnicodeDecodeError, OSError) as exc:
            write_bytes_atomic(target, old_bytes)
            raise ModelfileError(f"{mf.path}: the file did not read back as written ({exc}); the old text was restored") from None
    keep = ("profiles", "profile_decode", "default_profile")
    spec = mf.spec.model_copy(update={k: getattr(want, k) for k in keep})
    return Modelfile(mf.path, spec, mf.base_path, mf.av_paths, mf.baked_paths)


def _known(spec: ModelfileSpec, name: str) -> None:
    if name not in spec.profiles:
        raise ModelfileError(f"profile {short(name)} is not in the modelfile; profiles: {sorted(spec.profiles)}")


def delete_profile(mf: Modelfile, name: str) -> Modelfile:
    def expect(spec: ModelfileSpec) -> ModelfileSpec:
        _known(spec, name)
        return spec.model_copy(
            update={
                "profiles": {k: v for k, v in spec.profiles.items() if k != name},
                "profile_decode": {k: v for k, v in spec.profile_decode.items() if k != name},
                "default_profile": None if spec.default_profile == name else spec.default_profile,
            }
        )

    return _edit(mf, f"deleting profile {name!r}", lambda t, s: without_profile(t, name, s.default_profile), expect)


def rename_profile(mf: Modelfile, name: str, new: str) -> Modelfile:
    if not re.fullmatch(PROFILE_NAME, new) or new in mf.baked_paths:
        raise ModelfileError(f"profile name {short(new)}: letters, digits, '-', '_' or '.', not a baked profile's")

    def expect(spec: ModelfileSpec) -> ModelfileSpec:
        _known(spec, name)
        if new in spec.profiles:
            raise ModelfileError(f"a profile {new!r} exists already; delete it first or choose another name")
        swap = lambda d: {(new if k == name else k): v for k, v in d.items()}  # noqa: E731
        default = new if spec.default_profile == name else spec.default_profile
        return spec.model_copy(
            update={"profiles": swap(spec.profiles), "profile_decode": swap(spec.profile_decode), "default_profile": default}
        )

    return _edit(mf, f"renaming {name!r}", lambda t, s: renamed_profile(t, name, new, s.default_profile), expect)


def set_default_profile(mf: Modelfile, name: str | None) -> Modelfile:
    """`name` the modelfile's default profile (None: no default, all AVs at 0 unless a request says)."""

    def expect(spec: ModelfileSpec) -> ModelfileSpec:
        if name is not None:
            _known(spec, name)
        return spec.model_copy(update={"default_profile": name})

    return _edit(mf, "setting the default profile", lambda t, s: with_default(t, name), expect)
