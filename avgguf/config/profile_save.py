"""Saving a named profile into a modelfile (the page's "save as profile", `avgguf tune --save-profile`).

The one owner of that read-modify-write. The file's text is edited (every other line and comment kept),
the edit is checked in memory to change nothing but that profile, and then written with
avgguf.atomic.write_bytes_atomic (through symlinks, owner and mode kept, file and directory fsync'd) under an
advisory lock on the modelfile (fcntl.flock; two processes saving at once both keep their profile). The
written file is read back and compared; on any difference the old text is put back."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from avgguf.atomic import remove_stale, resolve_target, write_bytes_atomic
from avgguf.config.modelfile import PROFILE_NAME, Modelfile, ModelfileError, parse_modelfile
from avgguf.config.safe_yaml import parse_yaml, short

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 10.0
DECODE_MODES = ("weights", "pad", "pad-full")


class ModelfileBusy(ModelfileError):
    """Another process holds the modelfile's lock for longer than LOCK_TIMEOUT_S."""


@dataclass(frozen=True)
class SavedProfile:
    name: str
    coefficients: dict[str, float]  # every AV, as written
    decode: str
    replaced: bool  # a profile of that name existed and was overwritten
    path: Path  # the file written (symlinks resolved)
    modelfile: Modelfile  # the modelfile as now on disk


def check_profile_name(mf: Modelfile, name: str, flag: str = "") -> None:
    """Whether `name` can be saved into `mf` at all (checked before any long work, e.g. a tune); `flag` (the
    option that gave the name) starts the message."""
    lead = f"{flag}: " if flag else ""
    if not isinstance(name, str) or not re.fullmatch(PROFILE_NAME, name):
        raise ModelfileError(
            f"{lead}profile name {short(name)}: use letters, digits, '-', '_' or '.', starting "
            f"with a letter or digit (at most 64)"
        )
    if mf.path.suffix.lower() == ".gguf" or not mf.path.is_file():
        raise ModelfileError("this model is a bare GGUF: there is no modelfile to save a profile into")
    if name in mf.baked_paths:
        raise ModelfileError(f"{name!r} is a baked profile in {mf.path}; choose another name")


# --- text editing ------------------------------------------------------------------------------------------


def yaml_key(name: str) -> str:
    """`name` as a YAML flow-mapping key that reads back as the same string: plain where YAML keeps it text,
    else quoted ('yes', 'on', 'null', '123', '0x1F', '1_000' would become bool, None or int)."""
    try:
        if parse_yaml("{" + name + ": 0}") == {name: 0}:
            return name
    except Exception:  # noqa: BLE001 (not a plain scalar: quote it)
        pass
    return json.dumps(name)  # a JSON string is a YAML double-quoted scalar


def yaml_number(value: float) -> str:
    """A float as YAML 1.1 (PyYAML) reads back exactly: repr, with a '.0' where an exponent has no dot."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
    return text


def flow_entry(coefs: dict[str, float], decode: str | None) -> str:
    items = [f"{yaml_key(k)}: {yaml_number(v)}" for k, v in coefs.items()]
    if decode and decode != "weights":
        items.append(f"decode: {decode}")
    return "{" + ", ".join(items) + "}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _comment_or_blank(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


_EMPTY_FLOW = re.compile(r"^profiles\s*:\s*(\{\s*\}|~|null|Null|NULL)?\s*(#.*)?$")


def with_profile(text: str, name: str, coefs: dict[str, float], decode: str | None = None) -> str:
    """The modelfile's text with profile `name` added or replaced; every other line (comments too) kept.

    The `profiles:` block runs to the first line at column 0 that is not a comment: a comment at column 0
    inside the block does not end it. An empty flow mapping (`profiles: {}  # note`) becomes a block, its
    comment kept; a non-empty flow mapping is refused (it cannot be extended without rewriting it)."""
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    key = yaml_key(name)
    entry_text = f"{key}: {flow_entry(coefs, decode)}"
    head = next((i for i, ln in enumerate(lines) if re.match(r"^profiles\s*:", ln)), None)
    if head is None:
        while lines and not lines[-1].strip():
            lines.pop()
        return newline.join([*lines, "profiles:", f"  {entry_text}"]) + newline
    m = _EMPTY_FLOW.match(lines[head])
    if m is None:
        raise ModelfileError(
            "profiles are written in YAML flow style ({...}); write them one per line under "
            "`profiles:` so a new one can be added without losing your formatting"
        )
    if m.group(1):  # `profiles: {}` / `profiles: ~`: a block from now on, the comment kept
        lines[head] = "profiles:" + (f"  {m.group(2)}" if m.group(2) else "")
    end = head + 1
    while end < len(lines) and (_indent(lines[end]) > 0 or _comment_or_blank(lines[end])):
        end += 1  # the block: indented lines, blank lines and comments (at any column)
    entries = [i for i in range(head + 1, end) if not _comment_or_blank(lines[i])]
    indent = min((_indent(lines[i]) for i in entries), default=2)
    own = re.compile(rf"^\s*(['\"]?){re.escape(name)}\1\s*:")
    existing = next((i for i in entries if _indent(lines[i]) == indent and own.match(lines[i])), None)
    entry = " " * indent + entry_text
    if existing is None:
        last = max(entries, default=head)  # after the last entry: trailing comments stay where they were
        lines.insert(last + 1, entry)
    else:
        stop = existing + 1  # the entry and its continuation lines (a block mapping under it)
        while stop < end and (_comment_or_blank(lines[stop]) or _indent(lines[stop]) > indent):
            stop += 1
        while stop > existing + 1 and _comment_or_blank(lines[stop - 1]):
            stop -= 1  # blank lines and comments after it stay
        lines[existing:stop] = [entry]
    return newline.join(lines) + newline


# --- the save ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def modelfile_lock(target: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock) for a read-modify-write of the modelfile: first on its
    directory, whose inode a save never replaces (a lock on the file alone let a newcomer lock the new file a
    save had just renamed into place while that save was still reading it back), then on the file itself
    (what another tool locking the modelfile holds); if the file was replaced while waiting, the new one is
    locked instead."""
    try:
        import fcntl  # noqa: F401 (only to know whether advisory locks exist here)
    except ImportError:  # Windows: no advisory locks; saves within one process are still serialized
        yield
        return
    deadline = time.monotonic() + timeout
    with _flocked(os.open(target.parent, os.O_RDONLY), target, deadline, timeout):
        while True:
            with _flocked(os.open(target, os.O_RDONLY), target, deadline, timeout) as fd:
                held, now = os.fstat(fd), _stat(target)
                if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    yield
                    return


@contextlib.contextmanager
def _flocked(fd: int, target: Path, deadline: float, timeout: float) -> Iterator[int]:
    """`fd` locked exclusively (waiting until `deadline`), closed (so unlocked) at the end."""
    import fcntl

    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ModelfileBusy(
                        f"{target} is locked by another avgguf process saving a profile for more than {timeout:g} s; try again"
                    ) from None
                time.sleep(0.02)
        yield fd
    finally:
        os.close(fd)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _others(mf: Modelfile, name: str) -> tuple:
    """Everything in the spec except profile `name`: a save must leave it unchanged."""
    spec = mf.spec
    return (
        spec.model_dump(exclude={"profiles", "profile_decode"}),
        {k: v for k, v in spec.profiles.items() if k != name},
        {k: v for k, v in spec.profile_decode.items() if k != name},
    )


def _check_written(
    path: Path, text: str, before: Modelfile, name: str, coefs: dict[str, float], decode: str, check_adapters: bool = True
) -> Modelfile:
    """The text parsed as the modelfile at `path`, if it holds exactly `before` plus profile `name`."""
    after = parse_modelfile(text, path, check_adapters=check_adapters)
    got = (after.spec.profiles.get(name), after.decode_mode(name) if name in after.spec.profiles else None)
    if got != (coefs, decode) or _others(after, name) != _others(before, name):
        raise ModelfileError(
            f"{path}: adding profile {name!r} to the text would not give exactly that profile "
            f"(found {short(got[0])}, decode {got[1]}) with everything else unchanged; add it by "
            f"hand under `profiles:`: {yaml_key(name)}: {flow_entry(coefs, decode)}"
        )
    return after


def save_profile(mf: Modelfile, name: str, coefs: dict[str, float], decode: str | None = None) -> SavedProfile:
    """Write profile `name` (coefficients checked against `mf`'s AVs, every AV written) into `mf`'s file.

    Under the lock: read the file as it is now, edit its text, check the edit in memory, write it atomically
    (avgguf.atomic), read it back and check again; a failed check after writing restores the old text.
    Raises ModelfileError (ModelfileBusy when another process holds the lock)."""
    check_profile_name(mf, name)
    decode = decode or "weights"
    if decode not in DECODE_MODES:
        raise ModelfileError(f"decode {short(decode)}: expected one of {', '.join(DECODE_MODES)}")
    checked = mf.resolver.resolve(None, overrides=coefs, source="profile")
    target = resolve_target(mf.path)
    try:
        return _save_locked(mf, target, name, checked, decode)
    except OSError as exc:
        raise ModelfileError(
            f"{mf.path}: could not save profile {name!r}: {exc.strerror or exc} "
            f"({exc.filename or target}); check that the file and its directory are "
            f"writable"
        ) from None


def _save_locked(mf: Modelfile, target: Path, name: str, checked: dict[str, float], decode: str) -> SavedProfile:
    with modelfile_lock(target):
        old_bytes = target.read_bytes()
        try:
            old_text = old_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelfileError(f"{mf.path} is no longer a UTF-8 text file; not saving into it") from None
        try:
            before = parse_modelfile(old_text, mf.path, check_adapters=False)
        except ModelfileError as exc:
            raise ModelfileError(f"the modelfile on disk no longer loads, so no profile was saved: {exc}") from None
        if set(before.spec.avs) != set(checked):
            raise ModelfileError(
                f"{mf.path}: its avs: were edited since it was loaded (on disk "
                f"{sorted(before.spec.avs)}, loaded {sorted(checked)}); restart to load them, "
                f"then save again"
            )
        new_text = with_profile(old_text, name, checked, decode)
        _check_written(mf.path, new_text, before, name, checked, decode)
        remove_stale(target.parent)  # temp files of avgguf processes killed mid-write
        write_bytes_atomic(target, new_text.encode("utf-8"))
        try:
            after = _check_written(mf.path, target.read_bytes().decode("utf-8"), before, name, checked, decode)
        except (ModelfileError, UnicodeDecodeError, OSError) as exc:
            write_bytes_atomic(target, old_bytes)
            raise ModelfileError(
                f"{mf.path}: the saved file did not read back as written ({exc}); the old text was restored"
            ) from None
    log.info("saved profile %s into %s", name, target)
    return SavedProfile(name, checked, decode, name in before.spec.profiles, target, after)
