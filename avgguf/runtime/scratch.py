"""Scratch space: fused adapters (/dev/shm or the user cache dir) and merged hot sets; a dead process's
scratch is removed at the next start."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import gguf

from avgguf.atomic import remove_stale

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# A process's scratch directories carry its pid (mkdtemp's 8-character suffix after it), so a later start can
# remove what a killed process left (avgguf.atomic.remove_stale): in /dev/shm and the user cache dir...
SCRATCH = re.compile(r"^avgguf-(?:fused|merged)-(\d+)-[a-z0-9_]{8}$")
HIDDEN_SCRATCH = re.compile(r"^\.avgguf-merged-(\d+)-[a-z0-9_]{8}$")  # ...and beside a model
SPACE_MARGIN = 1.1  # free space wanted over an estimate
_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()


def user_cache_dir() -> Path | None:
    """$XDG_CACHE_HOME/avgguf, else ~/.cache/avgguf (not created here); None without a home directory."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "avgguf"
    try:
        return Path.home() / ".cache" / "avgguf"
    except (RuntimeError, KeyError):
        return None


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would: its nearest existing ancestor); 0 if unknown."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def in_ram(path: Path) -> bool:
    """Whether `path` lies on a RAM-backed file system (tmpfs, ramfs): what is written there costs memory."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    best, fstype = "", ""
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # \040 is a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype in ("tmpfs", "ramfs")


def remove_stale_scratch(directory: Path | None, pattern: re.Pattern = SCRATCH) -> list[Path]:
    """Remove the scratch directories that processes now dead left in `directory` (a kill -9, a crash);
    once per process and directory. The removed paths."""
    if directory is None or not directory.is_dir():
        return []
    key = f"{os.path.realpath(directory)}\0{pattern.pattern}"
    with _cleaned_lock:
        if key in _cleaned:
            return []
        _cleaned.add(key)
    removed = remove_stale(directory, pattern)
    for path in removed:
        log.info("removed %s, scratch of a process that is gone", path)
    return removed


def make_scratch(kind: str, parent: Path, hidden: bool = False) -> Path:
    """A private scratch directory `[.]avgguf-KIND-PID-XXXXXXXX` in `parent` (created if missing), once the
    scratch that dead processes left there is removed."""
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_stale_scratch(parent, HIDDEN_SCRATCH if hidden else SCRATCH)
    prefix = f"{'.' if hidden else ''}avgguf-{kind}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def fused_bytes(paths: list[Path]) -> int:
    """About the size of the fused file of these sources: their bytes where they all store one type (byte
    concatenation), else 4 bytes per element (float32 factors)."""
    types, stored, elements = set(), 0, 0
    for path in paths:
        for t in gguf.GGUFReader(path).tensors:
            types.add(t.tensor_type)
            stored += int(t.n_bytes)
            elements += int(t.n_elements)
    return stored if len(types) <= 1 else 4 * elements
