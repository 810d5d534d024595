"""Merged hot sets: a coefficient set that stays in use runs on merged weights instead of LoRA adapters.

llama.cpp's LoRA path costs two matmuls, a scale and an add per adapted tensor: with the three demo AVs,
SmolLM2 decodes at 0.67 of base speed even through one fused adapter (bench/results/fused_layouts.md), and
no adapter layout does much better. Merged weights (base + Σλ·ΔW, quantized by llama.cpp: avgguf.bake)
decode at base speed. So once a set has served an answer, a worker bakes it in the background (lowest CPU
priority, one quantizer thread) and loads it as a model of its own; requests with that set then run on it,
any other set goes back to the adapters at once (the knob itself never waits for a bake).

Not exact: merged weights are quantized (for a base below 8 bits, q8_0: a 4-bit re-quantization would snap
the small delta back onto the old grid, avgguf.bake). And not always faster: where decoding is memory-bound
(bigger models, GPUs) 8-bit merged weights are slower than a 4-bit base plus adapters. `auto` merges where
it measured faster here (bench/bake_speed.py): the merged model keeps the base's own type, or the model is
small enough for CPU decoding to be compute-bound.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import gguf

from .errors import AvggufError
from .fusion import Cancelled, Key, fused_path

log = logging.getLogger(__name__)

MERGE_MODES = ("auto", "on", "off")
# Parameters below which CPU decoding is compute-bound: there q8_0 merged weights outrun a 4-bit base with
# adapters (SmolLM2-135M: 0.98 of base vs 0.67 fused); above it memory-bound (a 1.2B Q4_0: 0.60 vs 0.73).
SMALL_MODEL = 500e6


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
    from .bake import default_ftype, stored_ftype

    reader = gguf.GGUFReader(base_path)
    if default_ftype(reader) == stored_ftype(reader):
        return True  # merged in the base's own type: base speed, whatever the hardware
    return n_gpu_layers == 0 and n_params < SMALL_MODEL


class MergedSets:
    """Coefficient sets baked into merged models on a worker thread, one at a time (only the latest set asked
    for: a bake for another set stops at its next tensor); `load(path)` makes what serves a merged file (a llama-cpp-python
    model, an engine). At most `capacity` are kept; taking one frees the least recently used others."""

    def __init__(self, base: Path, adapters: dict[str, Path], load: Callable[[Path], object], capacity: int = 1,
                 nice: int = 19):
        """`nice`: the bake's CPU priority (19: only the cores decoding leaves; OpenMP's busy-waiting decode
        threads stall whenever another runnable thread takes one of their cores)."""
        self._nice = nice
        self._base = base
        self._adapters = adapters
        self._load = load
        self.capacity = capacity
        self._dir = Path(tempfile.mkdtemp(prefix="avgguf-merged-"))
        self._lock = threading.Lock()
        self._wanted: Key | None = None
        self._baking: Key | None = None
        self._built: dict[Key, object] = {}
        self._taken: dict[Key, object] = {}  # insertion order = recency
        self._failed: set[Key] = set()
        self._worker: threading.Thread | None = None
        self._closed = False

    def request(self, key: Key, replace: bool = True) -> None:
        """Bake this set in the background, replacing any older wish (a bake under way for it stops), or with
        `replace=False` only if no other set is wanted or being baked."""
        with self._lock:
            if not key or self._closed or key in self._built or key in self._taken or key in self._failed:
                return
            if not replace and self._wanted not in (None, key):
                return
            self._wanted = key
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, daemon=True, name="avgguf-merge")
                self._worker.start()

    def take(self, key: Key, in_use: Callable[[object], bool] = lambda item: False):
        """What serves this set's merged model, or None if it is not ready; the least recently used others
        beyond `capacity` are closed, except those `in_use`."""
        with self._lock:
            if key in self._built:
                self._taken[key] = self._built.pop(key)
            elif key in self._taken:
                self._taken[key] = self._taken.pop(key)
            else:
                return None
            item = self._taken[key]
            victims = [k for k, v in self._taken.items() if v is not item and not in_use(v)]
            drop = victims[:max(0, len(self._taken) + len(self._built) - self.capacity)]
            closing = [self._taken.pop(k) for k in drop]
        for old in closing:
            old.close()
        return item

    @property
    def baking(self) -> Key | None:
        """The set being baked now, if any."""
        with self._lock:
            return self._baking

    def ready(self) -> list[Key]:
        """The sets whose merged model is ready, least recently used first."""
        with self._lock:
            return [*self._built, *self._taken]

    def wait(self, timeout: float | None = None) -> None:
        worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def _work(self) -> None:
        """At normal priority: what `load` starts (a server's batching thread) inherits it; only the bake
        itself runs niced (_niced)."""
        while True:
            with self._lock:
                key = self._wanted
                if key is None or self._closed or key in self._built or key in self._taken:
                    self._worker = None
                    return
            with self._lock:
                self._baking = key
            self._bake(key)
            with self._lock:
                self._baking = None
                if self._wanted == key:
                    self._wanted = None

    def _bake(self, key: Key) -> None:
        from .bake import Bake, baked_gguf
        from .modelfile import modelfile_from_gguf

        out = fused_path(self._dir, key)
        try:
            mf = modelfile_from_gguf(self._base, [(self._adapters[name], 1.0) for name, _ in key])
            names = list(mf.av_paths)
            self._niced(lambda: baked_gguf(Bake(mf, "hot", {n: v for n, (_, v) in zip(names, key)}), out, threads=1,
                                           stop=lambda: self._closed or self._wanted != key))
            item = self._load(out)
        except Cancelled:
            return  # closed, or another set is wanted now: a later request starts over
        except Exception as exc:  # noqa: BLE001 (the adapters keep serving this set)
            log.warning("could not merge %s (%s); it stays on adapters", dict(key), exc)
            with self._lock:
                self._failed.add(key)
            return
        finally:
            out.unlink(missing_ok=True)  # llama.cpp keeps its own copy (or mapping) of a loaded model
        with self._lock:
            if self._closed:
                item.close()
                return
            self._built[key] = item
            while len(self._built) > self.capacity:
                self._built.pop(next(iter(self._built))).close()

    def _niced(self, bake: Callable[[], object]) -> None:
        """Run `bake` on a thread of its own at `nice` (the quantizer threads it starts inherit that)."""
        failure: list[BaseException] = []

        def run() -> None:
            _set_nice(self._nice)
            try:
                bake()
            except BaseException as exc:  # noqa: BLE001 (re-raised on the worker thread)
                failure.append(exc)

        thread = threading.Thread(target=run, daemon=True, name="avgguf-merge-bake")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.wait(timeout=120)
        with self._lock:
            items = [*self._built.values(), *self._taken.values()]
            self._built.clear()
            self._taken.clear()
        for item in items:
            item.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _set_nice(nice: int) -> None:
    """This thread's CPU priority (the quantizer threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass
