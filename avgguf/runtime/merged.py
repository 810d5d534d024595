"""Merged hot sets: a coefficient set that stays in use runs on merged weights instead of LoRA adapters.

llama.cpp's LoRA path costs two matmuls, a scale and an add per adapted tensor: with the three demo AVs,
SmolLM2 decodes at 0.67 of base speed even through one fused adapter (bench/results/fused_layouts.md), and
no adapter layout does much better. Merged weights (base + Σλ·ΔW, quantized by llama.cpp: avgguf.export.bake)
decode at base speed. So once a set has served an answer, a worker bakes it in the background (lowest CPU
priority, one quantizer thread) and loads it as a model of its own; requests with that set then run on it,
any other set goes back to the adapters at once (the knob itself never waits for a bake).

Not exact: merged weights are quantized (for a base below 8 bits, q8_0: a 4-bit re-quantization would snap
the small delta back onto the old grid, avgguf.export.bake). And not always faster: where decoding is memory-bound
(bigger models, GPUs) 8-bit merged weights are slower than a 4-bit base plus adapters. `auto` merges where
it measured faster here (bench/bake_speed.py): the merged model keeps the base's own type, or the model is
small enough for CPU decoding to be compute-bound.

Never at any cost: a bake starts only where a disk (not a RAM file system) has room for its float32
intermediate and output, and memory for one more model (MergedSets); else the set stays on adapters.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gguf

from avgguf.errors import AvggufError
from avgguf.gguf import adapter_format as fmt
from avgguf.gguf.fuse import Cancelled, fused_path
from avgguf.runtime import llama
from avgguf.runtime.background import LOWEST, Failures, Key, Lru, Worker, niced
from avgguf.runtime.scratch import (
    HIDDEN_SCRATCH,
    SPACE_MARGIN,
    free_bytes,
    in_ram,
    make_scratch,
    remove_stale_scratch,
    user_cache_dir,
)

log = logging.getLogger(__name__)

MERGE_MODES = ("auto", "on", "off")
# Parameters below which CPU decoding is compute-bound: there q8_0 merged weights outrun a 4-bit base with
# adapters (SmolLM2-135M: 0.98 of base vs 0.67 fused); above it memory-bound (a 1.2B Q4_0: 0.60 vs 0.73).
SMALL_MODEL = 500e6


free_disk = free_bytes  # the probes a merge consults (tests replace them)


def check_mode(mode: str) -> str:
    if mode not in MERGE_MODES:
        raise AvggufError(f"merge must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
    return mode


def enabled(mode: str, engine) -> bool:
    """Whether an engine's model merges its hot sets under `mode` (auto: see merge_pays)."""
    check_mode(mode)
    return mode == "on" or (mode == "auto" and merge_pays(engine.model_path, engine.n_params, engine.n_gpu_layers))


def merge_pays(base_path: Path, n_params: int, n_gpu_layers: int) -> bool:
    """`auto`: whether merged weights decode faster than the base with adapters (see the module's doc)."""
    from avgguf.export.bake import default_ftype, stored_ftype

    reader = gguf.GGUFReader(base_path)
    if default_ftype(reader) == stored_ftype(reader):
        return True  # merged in the base's own type: base speed, whatever the hardware
    return n_gpu_layers == 0 and n_params < SMALL_MODEL


def available_ram() -> int | None:
    """Bytes of memory available to a new allocation without swapping (/proc/meminfo's MemAvailable; else the
    free pages); None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


class Refused(AvggufError):
    """A merge the machine has no room for (disk or memory); the adapters keep serving the set."""


def merge_needs(base: Path, adapters: list[Path]) -> tuple[int, int]:
    """(disk, memory) in bytes that baking and loading a merged model of `base` with these adapters takes: the
    bake's float32 intermediate plus its quantized output on disk (avgguf.export.bake.bake_bytes), and the output
    once more in memory (llama.cpp maps or copies it), each with a margin."""
    from avgguf.export.bake import GGUF_TYPES, bake_bytes, default_ftype

    reader = gguf.GGUFReader(base)
    ftype = default_ftype(reader)
    type_name = next((k for k, v in GGUF_TYPES.items() if llama.ftype(v) == ftype), "f32")
    touched = {name for path in adapters for name in fmt.read_adapter(path).pairs}
    merged, output = bake_bytes(reader, touched, type_name)
    return int((merged + output) * SPACE_MARGIN) + (64 << 20), int(output * SPACE_MARGIN) + (64 << 20)


def bake_set(base: Path, adapters: dict[str, Path], key: Key, out: Path, stop) -> None:
    """Write the merged GGUF of `base` under this coefficient set to `out` (one quantizer thread); Cancelled
    when `stop()` turns true."""
    from avgguf.config.modelfile import modelfile_from_gguf
    from avgguf.export.bake import Bake, baked_gguf

    mf = modelfile_from_gguf(base, [(adapters[name], 1.0) for name, _ in key])
    names = list(mf.av_paths)
    baked_gguf(Bake(mf, "hot", {n: v for n, (_, v) in zip(names, key)}), out, threads=1, stop=stop)


class MergedSets:
    """Coefficient sets baked into merged models on a worker thread, one at a time (only the latest set asked
    for: a bake for another set stops at its next tensor; a wish with `replace=False` waits for none);
    `load(path)` makes what serves a merged file (a llama-cpp-python model, an engine). At most `capacity` are
    kept; taking one frees the least recently used others (on a thread of their own: closing one waits for its
    decoding thread). The worker, its priority and the LRU: avgguf.runtime.background.

    Resources (audit findings 13, 23): a bake starts only where a disk has room for its float32 intermediate
    and output (merge_needs) and memory for one more model (`ram_extra`: what else loading it takes, e.g. a
    batching context's K/V); else it is refused (logged, retried after RETRY_AFTER s). Its scratch directory
    (`avgguf-merged-PID-*`, removed after the bake) goes to the user cache dir or beside the model, whichever has
    the most room, never a RAM file system (tmpfs /tmp); what a killed process left there is removed at start."""

    RETRY_AFTER = 60.0

    def __init__(
        self,
        base: Path,
        adapters: dict[str, Path],
        load: Callable[[Path], object],
        capacity: int = 1,
        nice: int = LOWEST,
        ram_extra: int = 0,
    ):
        """`nice`: the bake's CPU priority (avgguf.runtime.background: only the cores decoding leaves). `load`
        runs at normal priority: what it starts (a server's batching thread) inherits that."""
        self._nice = nice
        self._base = Path(base)
        self._adapters = adapters
        self._load = load
        self.capacity = capacity
        self.ram_extra = ram_extra
        self._lock = threading.Lock()  # moves between _built and _taken
        self._built: Lru[object] = Lru()  # baked and loaded, not taken yet
        self._taken: Lru[object] = Lru()  # serving
        self._failed = Failures()  # refused (retried after RETRY_AFTER s) or failed (never retried)
        self.refusal: str | None = None  # why the last merge was refused
        self._worker = Worker(self._bake, self._has, "avgguf-merge")
        self._closing: list[threading.Thread] = []
        remove_stale_scratch(user_cache_dir())
        remove_stale_scratch(self._base.parent, HIDDEN_SCRATCH)

    def _has(self, key: Key) -> bool:
        return key in self._built or key in self._taken

    def request(self, key: Key, replace: bool = True) -> None:
        """Bake this set in the background, replacing any older wish (a bake under way for it stops), or with
        `replace=False` only if no other set is wanted or being baked."""
        if key and not self._has(key) and self._failed.get(key, self.RETRY_AFTER) is None:
            self._worker.request(key, replace)

    def take(self, key: Key, in_use: Callable[[object], bool] = lambda item: False):
        """What serves this set's merged model, or None if it is not ready; the least recently used others
        beyond `capacity` are closed (on a worker thread: never blocks the caller), except those `in_use`."""
        with self._lock:
            built = self._built.pop(key)
            item = self._taken.put(key, built) if built is not None else self._taken.use(key)
            if item is None:
                return None
            closing = self._taken.evict(self.capacity - len(self._built), spare=lambda v: v is item or in_use(v))
        if closing:
            self._close_later(closing)
        return item

    def _close_later(self, items: list) -> None:
        def run() -> None:
            for old in items:
                try:
                    old.close()
                except Exception:  # noqa: BLE001 (an eviction must not take the server down)
                    log.exception("closing an evicted merged set failed")

        thread = threading.Thread(target=run, daemon=True, name="avgguf-merge-evict")
        with self._lock:
            self._closing = [t for t in self._closing if t.is_alive()] + [thread]
        thread.start()

    @property
    def baking(self) -> Key | None:
        """The set being baked now, if any."""
        return self._worker.current

    def ready(self) -> list[Key]:
        """The sets whose merged model is ready, least recently used first."""
        with self._lock:
            return [*self._built.keys(), *self._taken.keys()]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the worker; whether it is done."""
        return self._worker.wait(timeout)

    def _scratch(self, key: Key) -> Path:
        """A scratch directory with room for this set's bake; Refused where no disk or not enough memory."""
        disk, ram = merge_needs(self._base, [self._adapters[name] for name, _ in key])
        ram += self.ram_extra
        have = available_ram()
        if have is not None and have < ram:
            raise Refused(f"needs about {_gb(ram)} of memory for one more model, {_gb(have)} available")
        places = []
        for parent, hidden in ((user_cache_dir(), False), (self._base.parent, True)):
            if parent is None or in_ram(parent):
                continue
            free = free_disk(parent)
            places.append((free, str(parent), parent, hidden))
        fits = [p for p in places if p[0] >= disk]
        if not fits:
            seen = "; ".join(f"{where}: {_gb(free)} free" for free, where, _, _ in places) or "no disk that is not RAM"
            raise Refused(f"needs about {_gb(disk)} of disk for the bake ({seen})")
        _, _, parent, hidden = max(fits, key=lambda p: p[0])
        return make_scratch("merged", parent, hidden=hidden)

    def _bake(self, key: Key) -> None:
        """The worker's job: bake (niced), then load at normal priority; failures are recorded, not raised."""
        directory = None
        try:
            directory = self._scratch(key)
            out = fused_path(directory, key)
            stop = self._worker.stopped
            niced(lambda: bake_set(self._base, self._adapters, key, out, lambda: stop(key)), self._nice, "avgguf-merge-bake")
            if self._worker.closed:
                raise Cancelled
            item = self._load(out)
        except Cancelled:
            return  # closed, or another set is wanted now: a later request starts over
        except Refused as exc:
            self.refusal = f"not merging {dict(key)}: {exc}; it stays on adapters"
            log.warning("%s (retried after %.0f s)", self.refusal, self.RETRY_AFTER)
            self._failed.record(key, exc)
            return
        except Exception as exc:  # noqa: BLE001 (the adapters keep serving this set)
            log.warning("could not merge %s (%s); it stays on adapters", dict(key), exc)
            self._failed.record(key, exc, permanent=True)
            return
        finally:  # after the quantizer returned (never under it); llama.cpp keeps its own copy or mapping
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        self._keep(key, item)

    def _keep(self, key: Key, item) -> None:
        with self._lock:
            if self._worker.closed:
                dropped = [item]
            else:
                self._built.put(key, item)
                dropped = self._built.evict(self.capacity)
        for old in dropped:  # outside the lock: take() on the event loop never waits for a close
            old.close()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop baking and close every merged model; waits up to `timeout` s for a bake under way (llama.cpp's
        quantizer cannot be interrupted). One still running then keeps its scratch directory (the worker
        removes it when the quantizer returns, or the next start does if the process exits first). Whether
        everything stopped."""
        deadline = time.monotonic() + timeout
        done = self._worker.close(timeout)
        if not done:
            log.warning(
                "a merge is still quantizing; its scratch directory stays until it returns (or is removed at the next start)"
            )
        with self._lock:
            items = [*self._built.clear(), *self._taken.clear()]
            closing = list(self._closing)
        for item in items:
            item.close()
        for thread in closing:
            thread.join(max(0.0, deadline - time.monotonic()))
            done = done and not thread.is_alive()
        return done
