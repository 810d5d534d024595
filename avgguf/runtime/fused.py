"""Fused adapters of one model, per coefficient set, built in the background (the file format: avgguf.gguf.fuse)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from avgguf.gguf.fuse import Cancelled, fused_path, write_fused
from avgguf.runtime.scratch import (
    SHM_DIR,
    SPACE_MARGIN,
    free_bytes,
    fused_bytes,
    make_scratch,
    remove_stale_scratch,
    user_cache_dir,
)
from avgguf.atomic import OutputError
from avgguf.errors import AdapterError, AvggufError

log = logging.getLogger(__name__)

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
            raise AvggufError(
                f"no room for a fused adapter of about {need >> 20} MiB "
                f"({'; '.join(tried) or f'{SHM_DIR} and the user cache dir are too full'})"
            )
        except Cancelled:
            return None
        except Exception as exc:  # noqa: BLE001 (the separate adapters keep serving this set)
            log.warning("fused adapter for %s not built (%s); the separate adapters serve it (same answers)", dict(key), exc)
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
