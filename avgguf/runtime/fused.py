"""Fused adapters of one model, per coefficient set, built in the background (the file format: avgguf.gguf.fuse;
the worker, its priority and the LRU: avgguf.runtime.background)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from avgguf.atomic import OutputError
from avgguf.errors import AdapterError, AvggufError
from avgguf.gguf.fuse import Cancelled, fused_path, write_fused
from avgguf.gguf.recompress import write_recompressed
from avgguf.runtime import llama
from avgguf.runtime.background import Failures, Key, Lru, Worker, niced
from avgguf.runtime.scratch import (
    SHM_DIR,
    SPACE_MARGIN,
    free_bytes,
    fused_bytes,
    make_scratch,
    remove_stale_scratch,
    user_cache_dir,
)

log = logging.getLogger(__name__)

__all__ = ["FusedAdapters", "Key"]


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

    def __init__(self, model, arch: str, paths: dict[str, Path], capacity: int = 4, rank: int | None = None):
        """`model`: the llama_model pointer the adapters are loaded into (avgguf.runtime.llama.model_handle).
        `rank`: re-compress each set's sum to this rank per tensor (avgguf.gguf.recompress: cheaper to run,
        no longer exact; `energy_kept` says how close); None: the exact concatenation."""
        self._llama_model = model
        self._arch = arch
        self._paths = paths
        self.capacity = capacity
        self.rank = rank
        self.energy_kept: dict[Key, float] = {}  # per re-compressed set: the share of the exact sum's energy
        self._dirs: dict[Path, Path] = {}  # location -> this cache's scratch directory there
        self._built: Lru[Path] = Lru()  # files the worker wrote, oldest first (the worker adds, callers take)
        self._loaded: Lru[object] = Lru()  # adapters loaded into llama.cpp (callers' threads only)
        self._failed = Failures()
        self._sizes: dict[tuple, int] = {}
        self._worker = Worker(self._build_wished, self._has, "avgguf-fuse", limit=capacity)
        for location in (SHM_DIR, user_cache_dir()):  # what killed processes left (at start, cheap)
            remove_stale_scratch(location)

    @property
    def directories(self) -> list[Path]:
        """The scratch directories this cache made so far."""
        return list(self._dirs.values())

    def _has(self, key: Key) -> bool:
        return key in self._built or key in self._loaded

    def _need(self, paths: list[Path]) -> int:
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

    def _write(self, key: Key, stop) -> Path:
        """This set's fused file, in the first location with room; AvggufError where none had."""
        sources = [(name, self._paths[name], value) for name, value in key]
        need = self._need([path for _, path, _ in sources])
        tried = []
        for location in self._locations(need):
            try:
                return self._write_at(self._scratch(location), key, sources, stop)
            except (OSError, OutputError) as exc:  # full (ENOSPC), read-only...: the next location
                tried.append(f"{location}: {exc}")
        raise AvggufError(
            f"no room for a fused adapter of about {need >> 20} MiB "
            f"({'; '.join(tried) or f'{SHM_DIR} and the user cache dir are too full'})"
        )

    def _write_at(self, directory: Path, key: Key, sources: list, stop) -> Path:
        out = fused_path(directory, key)
        if self.rank is None:
            return write_fused(sources, out, self._arch, stop=stop)
        exact = write_fused(sources, out.with_suffix(".exact.gguf"), self._arch, stop=stop)
        try:
            self.energy_kept[key] = write_recompressed(exact, out, self._arch, self.rank, stop=stop)
        finally:
            exact.unlink(missing_ok=True)
        log.info("set %s re-compressed to rank %d: %.3f of its energy kept", dict(key), self.rank, self.energy_kept[key])
        return out

    def _build(self, key: Key, stop=None) -> Path | None:
        """Write this set's fused file; its path, or None (cancelled, or failed: recorded and logged)."""
        try:
            path = self._write(key, stop)
        except Cancelled:
            return None
        except Exception as exc:  # noqa: BLE001 (the separate adapters keep serving this set)
            log.warning("fused adapter for %s not built (%s); the separate adapters serve it (same answers)", dict(key), exc)
            self._failed.record(key, exc)
            return None
        self._built.put(key, path)
        return path

    def _build_wished(self, key: Key) -> None:
        """The worker's build: never competes with decoding (avgguf.runtime.background.niced)."""
        niced(lambda: self._build(key, stop=lambda: self._worker.stopped(key)), name="avgguf-fuse-build")

    def failed(self, key: Key) -> Exception | None:
        """Why this set's last build failed, if it did within RETRY_AFTER seconds."""
        return self._failed.get(key, self.RETRY_AFTER)

    def request(self, key: Key, replace: bool = True) -> None:
        """Build this set's fused adapter in the background: `replace` drops every older wish (a build under way
        for another set stops at its next tensor); else it queues behind them (at most `capacity` wishes: the
        oldest not being built is dropped)."""
        if self.failed(key) is None and not self._has(key):
            self._worker.request(key, replace)

    def cancel(self) -> None:
        """The knobs moved: a build in progress stops at its next tensor, queued wishes are dropped."""
        self._worker.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the worker (benchmarks, tests, shutdown); whether it is done."""
        return self._worker.wait(timeout)

    def ready(self, key: Key, applied: object | None = None, keep: tuple = ()):
        """The loaded fused adapter for this set, loading a built file now; None if not built yet. Eviction
        spares `applied` and the handles in `keep` (adapters some context still uses)."""
        handle = self._loaded.use(key)
        if handle is not None:
            return handle
        path = self._built.pop(key)
        if path is None:
            return None
        handle = llama.init_adapter(self._llama_model, path)
        path.unlink(missing_ok=True)  # llama.cpp has copied the data into its own buffers
        if handle is None:
            exc = AdapterError(f"llama.cpp refused the fused adapter {path.name}")
            self._failed.record(key, exc)
            raise exc
        self._loaded.put(key, handle)
        self._evict(keep=(handle, applied, *keep))
        return handle

    def build_now(self, key: Key, applied: object | None = None, keep: tuple = ()):
        """Build (on this thread) and load this set's fused adapter; None where that failed (logged; the
        caller serves the separate adapters, which give the same answers)."""
        if not self._has(key):
            if self.failed(key) is not None or self._build(key) is None:
                return None
        return self.ready(key, applied, keep)

    def _evict(self, keep: tuple) -> None:
        for handle in self._loaded.evict(self.capacity, spare=lambda h: h in keep):
            llama.free_adapter(handle)
        for path in self._built.evict(self.capacity):
            path.unlink(missing_ok=True)

    @property
    def loaded(self) -> int:
        return len(self._loaded)

    def close(self, timeout: float = 10.0) -> None:
        """Stop building (a build under way stops at its next tensor; waited for up to `timeout` s) and remove
        the files; the adapters themselves are freed with the model."""
        self._worker.close(timeout)
        self._loaded.clear()
        for directory in self._dirs.values():
            shutil.rmtree(directory, ignore_errors=True)
