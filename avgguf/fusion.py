"""Several adapters at their coefficients as ONE adapter at scale 1: exact concatenation of the factors.

For every base tensor, A = [A_1; A_2; ...] (ranks stacked) and B = [c_1·B_1, c_2·B_2, ...], so
B @ A = Σ c_i·B_i @ A_i: llama.cpp then runs two matmuls per tensor instead of two per adapter. Where every
source stores a factor in the same quantized type, the fused factor is the byte concatenation of their
blocks (rows of A; column blocks of B, whose per-block scales are multiplied by c_i), so it is as small as
the sources together and exact up to one f16 rounding of each block scale; f16 sources stay f16 (B
rounded once after scaling); otherwise the factor is written in float32 (dequantized sources are exact in
f32).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from . import adapter_format as fmt
from .atomic import OutputError, remove_stale
from .errors import AdapterError, AvggufError

log = logging.getLogger(__name__)

KEY_FUSED_NAMES = "avgguf.fused.names"
KEY_FUSED_COEFS = "avgguf.fused.coefficients"
# byte offsets of the f16 block scale d (and minimum m for the *_1 types) inside one block
_SCALE_FIELDS = {QType.Q8_0: (0,), QType.Q5_0: (0,), QType.Q4_0: (0,), QType.Q5_1: (0, 2), QType.Q4_1: (0, 2)}


@dataclass
class Factor:
    raw: np.ndarray  # as stored: float rows, or uint8 rows of blocks
    qtype: QType
    shape: tuple[int, int]  # element shape, numpy order

    def floats(self) -> np.ndarray:
        return fmt.decode(self.raw, self.qtype).reshape(self.shape).astype(np.float32)


def _factor(t) -> Factor:
    return Factor(np.asarray(t.data), t.tensor_type, fmt.numpy_shape(t))


def scaled_blocks(raw: np.ndarray, qtype: QType, c: float) -> np.ndarray:
    """A quantized tensor times c: every block's f16 scale (and minimum) multiplied, the quants untouched."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.array(raw, dtype=np.uint8).reshape(-1, size)
    for offset in _SCALE_FIELDS[qtype]:
        field = blocks[:, offset:offset + 2].copy().view(np.float16)
        blocks[:, offset:offset + 2] = (field.astype(np.float32) * c).astype(np.float16).view(np.uint8)
    return blocks.reshape(raw.shape)


def _native(qtype: QType) -> bool:
    return qtype in _SCALE_FIELDS


def _fuse_a(parts: list[Factor], token_embd: bool, float_type: QType | None = None) -> Factor:
    axis = 1 if token_embd else 0  # the rank axis
    types = {p.qtype for p in parts}
    native = _native(next(iter(types))) or types <= {QType.F32, QType.F16}
    if len(types) == 1 and not token_embd and native and float_type is None:
        raw = np.concatenate([p.raw for p in parts], axis=0)
        rows = sum(p.shape[0] for p in parts)
        return Factor(raw, parts[0].qtype, (rows, parts[0].shape[1]))
    data = np.concatenate([p.floats() for p in parts], axis=axis)
    return _as(data, float_type)


def _as(data: np.ndarray, float_type: QType | None) -> Factor:
    if float_type == QType.F16:
        return Factor(data.astype(np.float16), QType.F16, data.shape)
    return Factor(data, QType.F32, data.shape)


def _fuse_b(parts: list[Factor], coefs: list[float], float_type: QType | None = None) -> Factor:
    types = {p.qtype for p in parts}
    qtype = next(iter(types))
    if len(types) == 1 and _native(qtype) and float_type is None:
        raw = np.concatenate([scaled_blocks(p.raw, qtype, c) for p, c in zip(parts, coefs)], axis=1)
        return Factor(raw, qtype, (parts[0].shape[0], sum(p.shape[1] for p in parts)))
    data = np.concatenate([c * p.floats() for p, c in zip(parts, coefs)], axis=1)
    if float_type is None and types == {QType.F16}:  # f16 sources: stay f16 (half the bytes of f32)
        float_type = QType.F16
    return _as(data, float_type)


def _coefficient(reader_alpha: float, rank: int, c: float) -> float:
    """llama.cpp's per-tensor factor scale·alpha/r (alpha 0: just scale), folded into B."""
    return c * (reader_alpha / rank if reader_alpha else 1.0)


class Cancelled(Exception):
    """A background build whose coefficient set is no longer wanted."""


def write_fused(sources: list[tuple[str, Path, float]], out: Path, arch: str, extra: dict | None = None,
                float_type: QType | None = None, stop=None) -> Path:
    """Write the adapter equal to Σ c·adapter for (name, path, c) sources (c != 0), atomically; `extra`:
    more metadata (key -> value); `float_type` (F32/F16): every factor in that type instead of natively."""
    readers = [(name, gguf.GGUFReader(path), c) for name, path, c in sources]
    infos = [fmt.read_adapter(path) for _, path, _ in sources]
    bases = sorted({b for info in infos for b in info.pairs})
    writer = fmt.AdapterWriter(out, arch, "fused:" + "+".join(name for name, _, _ in sources))
    try:
        for base in bases:
            if stop is not None and stop():
                raise Cancelled
            a_parts, b_parts, coefs = [], [], []
            for (_, reader, c), info in zip(readers, infos):
                if base not in info.pairs:
                    continue
                tensors = {t.name: t for t in reader.tensors if t.name.startswith(base + ".lora_")}
                a_parts.append(_factor(tensors[base + fmt.LORA_A]))
                b_parts.append(_factor(tensors[base + fmt.LORA_B]))
                coefs.append(_coefficient(info.alpha, info.pairs[base].rank, c))
            a = _fuse_a(a_parts, base == fmt.TOKEN_EMBD, float_type)
            b = _fuse_b(b_parts, coefs, float_type)
            writer.add_raw_pair(base, a.raw, a.qtype, b.raw, b.qtype)
        writer.add_metadata(KEY_FUSED_NAMES, [name for name, _, _ in sources])
        writer.add_metadata(KEY_FUSED_COEFS, [float(c) for _, _, c in sources])
        for key, value in (extra or {}).items():
            writer.add_metadata(key, value)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return out


def fused_path(directory: Path, key: tuple[tuple[str, float], ...]) -> Path:
    label = "_".join(f"{n}{v:+.6g}" for n, v in key)
    safe = "".join(ch if ch.isalnum() or ch in "+-._" else "-" for ch in label)[:120]
    return directory / f"fused-{os.getpid()}-{safe}.gguf"


def check_sources(sources: list[tuple[str, Path, float]]) -> None:
    if len(sources) < 1:
        raise AdapterError("nothing to fuse: every coefficient is 0")


# --- scratch space (fused adapters here, merged hot sets in avgguf.hot) --------------------------------------

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


Key = tuple[tuple[str, float], ...]
_LLAMA_ADAPTERS = threading.Lock()  # adapter init/free change the model's shared state


class FusedAdapters:
    """Fused adapters of one model, per coefficient set: built on a worker thread at the lowest CPU priority,
    loaded into llama.cpp on the caller's thread, at most `capacity` kept (the least recently used one that is
    not applied is freed). Wishes (`request`) either replace each other (an engine's knobs: only the latest set
    counts, a build for an older one stops at its next tensor) or queue up (a batcher's concurrent sets).

    Files go to /dev/shm where its free space fits the build (the writer's temp copy and the file: twice the
    estimate, with a margin: Docker's /dev/shm is 64 MB), else to the user cache dir. A build that fails there
    too (ENOSPC, ...) is logged and not retried for RETRY_AFTER seconds: the separate adapters serve that set
    meanwhile, with the same answers."""

    RETRY_AFTER = 60.0

    def __init__(self, model, arch: str, paths: dict[str, Path], capacity: int = 4):
        self._model = model
        self._arch = arch
        self._paths = paths
        self.capacity = capacity
        self._dirs: dict[Path, Path] = {}  # location -> this cache's scratch directory there
        self._lock = threading.Lock()
        self._wanted: dict[Key, None] = {}  # wishes, oldest first; the worker builds the first one
        self._built: dict[Key, Path] = {}
        self._loaded: dict[Key, object] = {}  # insertion order = recency
        self._failed: dict[Key, tuple[float, Exception]] = {}
        self._sizes: dict[Path, int] = {}
        self._worker: threading.Thread | None = None
        self._closed = False
        for location in (SHM_DIR, user_cache_dir()):  # what killed processes left (at start, cheap)
            remove_stale_scratch(location)

    @property
    def directories(self) -> list[Path]:
        """The scratch directories this cache made so far."""
        return list(self._dirs.values())

    def _sources(self, key: Key) -> list[tuple[str, Path, float]]:
        return [(name, self._paths[name], value) for name, value in key]

    def _need(self, sources: list[tuple[str, Path, float]]) -> int:
        paths = [path for _, path, _ in sources]
        key = tuple(sorted(paths))
        if key not in self._sizes:
            self._sizes[key] = fused_bytes(paths)
        return int(2 * self._sizes[key] * SPACE_MARGIN) + (1 << 20)

    def _locations(self, need: int) -> list[Path]:
        out = []
        if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) and free_bytes(SHM_DIR) >= need:
            out.append(SHM_DIR)
        cache = user_cache_dir()
        if cache is not None and free_bytes(cache) >= need:
            out.append(cache)
        return out

    def _scratch(self, location: Path) -> Path:
        directory = self._dirs.get(location)
        if directory is None or not directory.is_dir():
            directory = self._dirs[location] = make_scratch("fused", location)
        return directory

    def _build(self, key: Key, background: bool = False) -> Path | None:
        """Write this set's fused file; its path, or None (cancelled, or failed: recorded and logged)."""
        if background:  # never compete with decoding: the builder thread runs at the lowest CPU priority
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
        stop = (lambda: self._closed or key not in self._wanted) if background else None
        sources = self._sources(key)
        try:
            need = self._need(sources)
            tried = []
            for location in self._locations(need):
                try:
                    path = write_fused(sources, fused_path(self._scratch(location), key), self._arch, stop=stop)
                except (OSError, OutputError) as exc:  # full (ENOSPC), read-only...: the next location
                    tried.append(f"{location}: {exc}")
                    continue
                with self._lock:
                    self._built[key] = path
                return path
            raise AvggufError(f"no room for a fused adapter of about {need >> 20} MiB "
                              f"({'; '.join(tried) or f'{SHM_DIR} and the user cache dir are too full'})")
        except Cancelled:
            return None
        except Exception as exc:  # noqa: BLE001 (the separate adapters keep serving this set)
            log.warning("fused adapter for %s not built (%s); the separate adapters serve it (same answers)",
                        dict(key), exc)
            with self._lock:
                self._failed[key] = (time.monotonic(), exc)
            return None

    def failed(self, key: Key) -> Exception | None:
        """Why this set's last build failed, if it did within RETRY_AFTER seconds."""
        with self._lock:
            when, exc = self._failed.get(key, (None, None))
            if when is not None and time.monotonic() - when > self.RETRY_AFTER:
                del self._failed[key]
                return None
            return exc

    def _work(self) -> None:
        while True:
            with self._lock:
                for done in [k for k in self._wanted if k in self._built or k in self._loaded]:
                    del self._wanted[done]
                key = next(iter(self._wanted), None)
                if key is None or self._closed:
                    self._worker = None
                    return
            self._build(key, background=True)
            with self._lock:
                self._wanted.pop(key, None)

    def request(self, key: Key, replace: bool = True) -> None:
        """Build this set's fused adapter in the background: `replace` drops every older wish (a build under way
        for another set stops at its next tensor); else it queues behind them (at most `capacity` wishes: the
        oldest not being built is dropped)."""
        if self.failed(key) is not None:
            return
        with self._lock:
            if self._closed or key in self._built or key in self._loaded:
                return
            if replace:
                self._wanted = {key: None}
            else:
                self._wanted.setdefault(key, None)
                while len(self._wanted) > max(1, self.capacity):
                    del self._wanted[list(self._wanted)[1]]  # the first one may be building
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, daemon=True, name="avgguf-fuse")
                self._worker.start()

    def cancel(self) -> None:
        """The knobs moved: a build in progress stops at its next tensor, queued wishes are dropped."""
        with self._lock:
            self._wanted = {}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the worker (benchmarks, tests, shutdown); whether it is done."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
            return not worker.is_alive()
        return True

    def ready(self, key: Key, applied: object | None = None, keep: tuple = ()):
        """The loaded fused adapter for this set, loading a built file now; None if not built yet. Eviction
        spares `applied` and the handles in `keep` (adapters some context still uses)."""
        import llama_cpp

        if key in self._loaded:
            self._loaded[key] = self._loaded.pop(key)  # most recent
            return self._loaded[key]
        with self._lock:
            path = self._built.pop(key, None)
        if path is None:
            return None
        with _LLAMA_ADAPTERS:
            handle = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        path.unlink(missing_ok=True)  # llama.cpp has copied the data into its own buffers
        if not handle:
            exc = AdapterError(f"llama.cpp refused the fused adapter {path.name}")
            with self._lock:
                self._failed[key] = (time.monotonic(), exc)
            raise exc
        self._loaded[key] = handle
        self._evict(keep=(handle, applied, *keep))
        return handle

    def build_now(self, key: Key, applied: object | None = None, keep: tuple = ()):
        """Build (on this thread) and load this set's fused adapter; None where that failed (logged; the
        caller serves the separate adapters, which give the same answers)."""
        if key not in self._loaded and key not in self._built:
            if self.failed(key) is not None or self._build(key) is None:
                return None
        return self.ready(key, applied, keep)

    def _evict(self, keep: tuple) -> None:
        import llama_cpp

        while len(self._loaded) > self.capacity:
            victim = next((k for k, h in self._loaded.items() if h not in keep), None)
            if victim is None:
                return
            with _LLAMA_ADAPTERS:
                llama_cpp.llama_adapter_lora_free(self._loaded.pop(victim))
        with self._lock:
            while len(self._built) > self.capacity:
                old = next(iter(self._built))
                self._built.pop(old).unlink(missing_ok=True)

    @property
    def loaded(self) -> int:
        return len(self._loaded)

    def close(self, timeout: float = 10.0) -> None:
        """Stop building (a build under way stops at its next tensor; waited for up to `timeout` s) and remove
        the files; the adapters themselves are freed with the model."""
        with self._lock:
            self._closed = True
            self._wanted = {}
        self.wait(timeout)
        self._loaded.clear()
        for directory in self._dirs.values():
            shutil.rmtree(directory, ignore_errors=True)
