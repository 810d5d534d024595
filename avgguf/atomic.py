"""Every file and directory avgguf writes, written safely: the one owner of atomic writes in the project.

Rules (issue 20, point 1; audit findings 1, 10, 20, 21):
- The output appears whole or not at all: data goes to a temp name beside the target that carries the pid
  (``.NAME.avgguf-<pid>[-<n>].tmp``), is fsync'd, ``os.replace``d into place, and the directory is fsync'd.
  Any exception (KeyboardInterrupt included) removes the temp; after a ``kill -9`` the next write beside it
  removes temps of dead pids (remove_stale).
- Symlinks are written through (the link's target is replaced, the link kept); an existing file keeps its
  mode and, where permitted, its owner and group. New files get 0666 & ~umask, the umask read without
  changing it (never ``os.umask`` from a thread: finding 21).
- Nothing avgguf did not write is destroyed: an existing output is replaced only if it is an earlier avgguf
  output of the same kind (a marker avgguf wrote) or with ``force``; a directory output never loses a file
  it did not list in its marker; an output that is, or contains, one of the inputs is refused.
- Multi-GB writes check free space first (check_free_space).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from avgguf.errors import AvggufError

MARKER = "avgguf.json"  # written into every directory output; names its kind and its files
KEY_KIND = "avgguf.output"  # marker key: the kind of output ("ollama", "peft", ...)
KEY_FILES = "avgguf.files"  # marker key: the files avgguf wrote there
_TEMP = re.compile(r"\.avgguf-(\d+)(?:-\d+)?\.(?:tmp|scratch)$")
_counter = itertools.count()


class OutputError(AvggufError):
    """An output path is unsafe to write: it exists, is an input, or there is no room for it."""


# --- permissions -------------------------------------------------------------------------------------------


def _read_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read once, at import (before any avgguf thread exists)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _read_umask()


def umask() -> int:
    """The process umask, read without changing it (from /proc where there is one, else as at import)."""
    return _read_umask() if os.path.exists("/proc/self/status") else _UMASK_AT_IMPORT


def new_file_mode() -> int:
    return 0o666 & ~umask()


def _keep_owner_and_mode(fd: int, st: os.stat_result | None, default_mode: int) -> None:
    os.fchmod(fd, (st.st_mode & 0o777) if st is not None else default_mode)
    if st is None:
        return
    for uid, gid in ((st.st_uid, st.st_gid), (-1, st.st_gid)):  # a non-root user may still keep the group
        try:
            os.fchown(fd, uid, gid)
            return
        except OSError:
            continue


# --- paths -------------------------------------------------------------------------------------------------


def resolve_target(path: str | os.PathLike) -> Path:
    """The file a write to `path` must replace: symlinks followed (a dangling link names its target)."""
    return Path(os.path.realpath(os.fspath(path)))


def temp_path(target: Path, suffix: str = "tmp") -> Path:
    """A fresh temp name beside `target` carrying this process's pid (see remove_stale)."""
    n = next(_counter)
    tag = f"{os.getpid()}" if n == 0 else f"{os.getpid()}-{n}"
    return target.with_name(f".{target.name}.avgguf-{tag}.{suffix}")


def _stale(pid: int, entry: os.DirEntry) -> bool:
    """Left by a process that is gone: its pid is dead, or now names a process started after the entry was
    last written (a reused pid: a container's avgguf is PID 1 at every start)."""
    if not pid_alive(pid):
        return True
    started = process_started(pid)
    try:
        return started is not None and entry.stat(follow_symlinks=False).st_mtime < started - 1.0
    except OSError:
        return False


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, from /proc), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(directory: str | os.PathLike, pattern: re.Pattern | None = None) -> list[Path]:
    """Remove avgguf temp files/dirs in `directory` (not recursive) whose pid (group 1 of `pattern`, by
    default the ``.NAME.avgguf-<pid>.tmp`` names of this module) is dead; the removed paths."""
    pattern = pattern or _TEMP
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.search(entry.name)
        if m is None or not _stale(int(m.group(1)), entry):
            continue
        p = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], flag: str = "--out") -> None:
    """Refuse an output that is one of the inputs or (a directory that) contains one (resolved paths)."""
    target = resolve_target(out)
    for given in inputs:
        if given is None:
            continue
        src = resolve_target(given)
        inside = src.is_dir() and _within(target, src) and os.path.lexists(target)  # a file of an input dir
        if _within(src, target) or inside:
            what = "is" if src == target else ("is a file of" if inside else "contains")
            raise OutputError(
                f"{flag} {os.fspath(out)!r} {what} the input {os.fspath(given)!r} "
                f"({src}); writing there would destroy it. Choose another {flag}"
            )


def check_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """Raise OutputError unless `directory`'s file system has `needed` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OutputError(
            f"{what}: needs about {_size(needed)} in {os.fspath(directory)!r} but only {_size(free)} "
            f"is free; free some space or choose an --out on another disk"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def fsync_dir(directory: str | os.PathLike) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path, st: os.stat_result | None, default_mode: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _keep_owner_and_mode(fd, st, default_mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _check_parent(target: Path, given: str | os.PathLike, flag: str) -> None:
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(
            f"{flag} {os.fspath(given)!r}: directory {str(parent)!r} does not exist; create it or choose another {flag}"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {os.fspath(given)!r}: directory {str(parent)!r} is not writable; choose another {flag}")


# --- files -------------------------------------------------------------------------------------------------


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Replace `path` (through symlinks) by `data`, all or nothing, durable; owner/mode of an existing file
    kept (`mode`: the mode of a new file, default 0666 & ~umask)."""
    target = resolve_target(path)
    st = _stat(target)
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            _keep_owner_and_mode(fd, st, new_file_mode() if mode is None else mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8", mode: int | None = None) -> None:
    write_bytes_atomic(path, text.encode(encoding), mode)


def check_output_file(
    path: str | os.PathLike,
    *,
    force: bool = False,
    previous: Callable[[Path], bool] | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    what: str = "output",
    flag: str = "--out",
) -> Path:
    """The file a write to `path` will replace (symlinks followed), once it is safe to write: its directory
    exists and is writable, it is no directory and none of `inputs`, and it is new, or `previous(target)` says
    avgguf wrote it (same kind), or `force`. Call before heavy work; output_file checks again."""
    target = resolve_target(path)
    _check_parent(target, path, flag)
    if target.is_dir():
        raise OutputError(f"{flag} {os.fspath(path)!r} is a directory; give a file name")
    check_not_input(path, inputs, flag)
    if target.exists() and not force and not (previous is not None and _safe(previous, target)):
        raise OutputError(
            f"{flag} {os.fspath(path)!r} already exists and is not an earlier avgguf {what}; "
            f"avgguf does not overwrite files it did not write. Choose another {flag}, or add "
            f"--force to replace it"
        )
    return target


@contextlib.contextmanager
def output_file(
    path: str | os.PathLike,
    *,
    force: bool = False,
    previous: Callable[[Path], bool] | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    needed_bytes: int | None = None,
    what: str = "output",
    flag: str = "--out",
) -> Iterator[Path]:
    """A temp path (beside the target, pid in the name) to write one output file to; published (fsync,
    rename, fsync of the directory; an existing file's mode and owner kept) when the block ends normally,
    removed on any exception, KeyboardInterrupt included.

    The target is checked by check_output_file (previous=None with force=False: any existing file is
    refused); temps of dead processes beside it are removed; `needed_bytes`: free space checked first."""
    target = check_output_file(path, force=force, previous=previous, inputs=inputs, what=what, flag=flag)
    remove_stale(target.parent)
    if needed_bytes:
        check_free_space(target.parent, needed_bytes, f"{flag} {os.fspath(path)!r}")
    tmp = temp_path(target)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"{flag} {os.fspath(path)!r}: nothing was written")
        _fsync_file(tmp, _stat(target), new_file_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _safe(check: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(check(path))
    except Exception:  # noqa: BLE001 (an unreadable file is not a previous output)
        return False


@contextlib.contextmanager
def scratch_dir(beside: str | os.PathLike) -> Iterator[Path]:
    """A private temp directory next to `beside` (same file system, pid in the name), removed at the end."""
    target = resolve_target(beside)
    remove_stale(target.parent)
    path = temp_path(target, "scratch")
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- directories -------------------------------------------------------------------------------------------


@dataclass
class DirOutput:
    """A directory being built: write files into `path`; `meta` goes into the marker (avgguf.json)."""

    path: Path
    kind: str
    meta: dict = field(default_factory=dict)


def read_marker(directory: Path) -> dict | None:
    """The marker of an earlier avgguf directory output, or None if there is none (or it is not ours)."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get(KEY_FILES), list):
        return None
    files = data[KEY_FILES]  # plain names in that directory only: a crafted marker names nothing elsewhere
    if not all(isinstance(f, str) and f not in ("", ".", "..") and "/" not in f and "\0" not in f for f in files):
        return None
    return data


def _foreign_entries(directory: Path, kind: str) -> list[str] | None:
    """None if `directory` is missing or empty; [] if it holds only an earlier `kind` output's files; else the
    entries avgguf did not write there."""
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return None
    if not entries:
        return None
    marker = read_marker(directory)
    ours = set(marker[KEY_FILES]) | {MARKER} if marker and marker.get(KEY_KIND) == kind else set()
    return [e for e in entries if e not in ours]


@contextlib.contextmanager
def output_dir(
    path: str | os.PathLike,
    kind: str,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    needed_bytes: int | None = None,
    flag: str = "--out",
) -> Iterator[DirOutput]:
    """A temp directory to build a directory output in; published when the block ends normally, removed on
    any exception.

    Publishing: a missing or empty target is replaced by one rename. An earlier avgguf output of the same
    `kind` holding only the files its marker lists is swapped in one atomic exchange (renameat2) where the
    kernel has it, else file by file; its old files are then removed. Any other non-empty directory is
    refused unless `force`, and then avgguf's files are renamed into it one by one: files avgguf did not
    write are kept, never removed."""
    target = resolve_target(path)
    _check_parent(target, path, flag)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {os.fspath(path)!r} exists and is not a directory; choose a directory path")
    check_not_input(path, inputs, flag)
    foreign = _foreign_entries(target, kind)
    if foreign and not force:
        marker = read_marker(target)
        if marker is not None and marker.get(KEY_KIND) != kind and not set(foreign) - set(marker[KEY_FILES]) - {MARKER}:
            raise OutputError(
                f"{flag} {os.fspath(path)!r} is an earlier avgguf {marker.get(KEY_KIND)!r} output, not "
                f"{kind!r}; avgguf replaces an output only with one of the same format. Choose another "
                f"{flag}, or add --force to write the {kind} files into it (the others are kept)"
            )
        shown = ", ".join(repr(e) for e in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"{flag} {os.fspath(path)!r} is a non-empty directory avgguf did not write (it holds "
            f"{shown}); avgguf only replaces an earlier {kind!r} output of its own. Choose a new or "
            f"empty directory, or add --force to write avgguf's files into it (other files are kept)"
        )
    remove_stale(target.parent)
    if needed_bytes:
        check_free_space(target.parent, needed_bytes, f"{flag} {os.fspath(path)!r}")
    tmp = temp_path(target)
    tmp.mkdir(mode=0o700)
    out = DirOutput(tmp, kind)
    try:
        yield out
        files = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
        marker = {**out.meta, KEY_KIND: kind, KEY_FILES: files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        for name in files + [MARKER]:  # durable before publishing (modes are the writers' own: a hard-linked
            _fsync(tmp / name)  # base keeps its mode)
        st = _stat(target)
        os.chmod(tmp, (st.st_mode & 0o777) if st is not None else 0o777 & ~umask())
        fsync_dir(tmp)
        _publish_dir(tmp, target, kind, foreign, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_dir(tmp: Path, target: Path, kind: str, foreign: list[str] | None, files: list[str]) -> None:
    if foreign is None:  # missing or empty: one rename (over an empty directory too)
        try:
            os.rename(tmp, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            foreign = _foreign_entries(target, "") or []  # filled meanwhile: merge, keeping everything else
    old = read_marker(target) or {}
    old_files = old.get(KEY_FILES, []) if old.get(KEY_KIND) == kind else []
    if not foreign and _exchange(tmp, target):
        for name in set(old_files) | {MARKER}:  # tmp now holds the old output: remove only our own files
            with contextlib.suppress(OSError):
                (tmp / name).unlink()
        for leftover in os.listdir(tmp):  # written there meanwhile by someone else: put it back, never lose it
            if not (target / leftover).exists():
                os.rename(tmp / leftover, target / leftover)
        with contextlib.suppress(OSError):
            tmp.rmdir()
        return
    # File by file. The marker goes first listing old and new files, so a kill in between leaves a
    # directory the next run still recognises as its own; stale files avgguf wrote before are removed.
    stale = [n for n in old_files if n not in files and n != MARKER]
    final = json.loads((tmp / MARKER).read_text(encoding="utf-8"))
    both = {**final, KEY_FILES: sorted(set(files) | set(stale))}
    write_text_atomic(target / MARKER, json.dumps(both, indent=1) + "\n")
    for name in files:
        os.replace(tmp / name, target / name)
    for name in stale:
        with contextlib.suppress(OSError):
            (target / name).unlink()
    os.replace(tmp / MARKER, target / MARKER)
    fsync_dir(target)
    shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


__all__ = [
    "MARKER",
    "DirOutput",
    "OutputError",
    "check_free_space",
    "check_not_input",
    "check_output_file",
    "fsync_dir",
    "output_dir",
    "output_file",
    "pid_alive",
    "read_marker",
    "remove_stale",
    "resolve_target",
    "scratch_dir",
    "temp_path",
    "umask",
    "write_bytes_atomic",
    "write_text_atomic",
]
