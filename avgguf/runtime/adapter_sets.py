"""Which weights serve a coefficient set, and the product's central invariant: no output mixes K/V computed
under two coefficient sets.

A set (avgguf.runtime.background.Key: the non-zero AVs, sorted) is served one of three ways, all giving the
same sum:
- the separate adapters, each at its value (always available, from the first request on);
- one fused adapter at scale 1 (avgguf.runtime.fused: two or more AVs, built in the background);
- a merged model (avgguf.runtime.merged: a set that stays in use, baked into weights of its own).

The invariant, kept in two shapes:
- `AdapterSets` (an engine's one context, avgguf.runtime.engine): whenever the adapters on the base model's
  context change, its KV cache is reset in the same step; a merged model's context only ever holds K/V of its
  own weights. A new variant (fused or merged) comes in at a call of `select`, i.e. at a request boundary.
- `BatchAdapters` (a batching context, avgguf.runtime.batching): a sequence keeps the variant it started
  with, its group (set, fused?) is what decodes together and what its prompt cache is keyed on, and the
  context carries the group's adapters before each decode step.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from avgguf.errors import AvggufError
from avgguf.gguf import adapter_format as fmt
from avgguf.runtime import llama, merged
from avgguf.runtime.background import Key
from avgguf.runtime.cvec import ContextVectors, ControlVectors
from avgguf.runtime.fused import FusedAdapters
from avgguf.runtime.merged import MergedSets

log = logging.getLogger(__name__)
FUSE_MODES = ("async", "sync", "off")


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    info: fmt.AdapterInfo
    handle: object  # llama_adapter_lora_p, owned by the model


def check_fuse(fuse: str) -> str:
    if fuse not in FUSE_MODES:
        raise AvggufError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
    return fuse


def pairs_for(adapters: Mapping[str, LoadedAdapter], key: Key, fused: object | None = None) -> list[tuple[object, float]]:
    """The (handle, scale) pairs that compute this set: its fused adapter at 1 (exact: avgguf.gguf.fuse), or
    each AV at its value."""
    return [(fused, 1.0)] if fused is not None else [(adapters[name].handle, value) for name, value in key]


class Host(Protocol):
    """What the sets need of the engine they serve (avgguf.runtime.engine.Engine)."""

    model_path: Path
    adapters: Mapping[str, LoadedAdapter]
    control_vectors: ControlVectors

    @property
    def n_threads(self) -> int: ...

    @property
    def n_params(self) -> int: ...

    @property
    def n_gpu_layers(self) -> int: ...

    def fusion_cache(self, capacity: int = 4) -> FusedAdapters: ...

    def load_merged(self, path: Path): ...


class AdapterSets:
    """The weights serving an engine's coefficient set: `llm` is what evaluates now (the base model with the
    set's adapters, or a merged set's model), `key` the set in effect.

    Two or more active AVs run as one fused adapter once it is built: with fuse="async" the separate adapters
    serve at once, `settle()` (called when an answer is done) builds the fused one in the background, and it
    replaces them at a later `select` of the same set; "sync" builds it before `select` returns; "off" never
    fuses. With merging on (avgguf.runtime.merged), `settle()` also bakes the set into merged weights, which
    serve it from a later `select` of the same set."""

    def __init__(self, host: Host, llm, fuse: str = "async", merge: str = "off"):
        """`llm`: the host's base model (a llama-cpp-python Llama); `merge`: auto | on | off."""
        self._host = host
        self._base = llm
        self.llm = llm
        self.fuse = check_fuse(fuse)
        self._merge = merged.enabled(merge, host)
        self.key: Key = ()  # the set in effect, on whichever path
        self._applied: Key = ()  # the set the base context's adapters compute
        self._applied_fused = None  # the fused adapter on the base context, if any
        self._keep: tuple = ()  # the arrays handed to llama.cpp with the adapters
        self.fusion: FusedAdapters | None = None
        self._merged: MergedSets | None = None
        self._vectors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per serving model: its vectors

    def select(self, key: Key) -> bool:
        """Serve this set from now on; True if what llama.cpp computes with changed (then the KV cache of the
        context that serves it holds nothing computed under another set). Control-vector knobs
        (avgguf.runtime.cvec) go to whichever context serves the LoRA part, reset with it."""
        lora_key, cvec_key = self._host.control_vectors.split(key)
        changed = self._select_lora(lora_key)
        vectors = self._vectors.get(self.llm)
        if vectors is None:
            vectors = self._vectors[self.llm] = ContextVectors(self._host.control_vectors)
        if vectors.set(llama.context_handle(self.llm), cvec_key):
            self.llm.reset()  # K/V computed under the old control vectors must never be reused
            return True
        return changed

    def _select_lora(self, key: Key) -> bool:
        self.key = key
        merged_llm = self._merged.take(key, lambda llm: llm is self.llm) if self._merged is not None and key else None
        if merged_llm is not None:
            return self._switch(merged_llm)
        changed = self._switch(self._base)
        if key == self._applied and (self._applied_fused is not None or not self._fusable(key)):
            return changed
        fused = self._fused_for(key)
        if key == self._applied and fused is None:
            return changed
        self._apply(key, fused)
        return True

    def _switch(self, llm) -> bool:
        """Evaluate with `llm` from now on (each model keeps its own K/V, computed under its own weights)."""
        if llm is self.llm:
            return False
        llama.set_threads(llama.context_handle(llm), self._host.n_threads)
        self.llm = llm
        return True

    def _apply(self, key: Key, fused=None) -> None:
        """The base context's adapters compute `key` from now on, and its KV cache is empty: the one place
        where they change."""
        pairs = pairs_for(self._host.adapters, key, fused)
        self._keep = llama.set_adapters(llama.context_handle(self._base), pairs, f"adapters {dict(key)}")
        self._applied, self._applied_fused = key, fused
        self._base.reset()  # K/V computed under the old coefficients must never be reused

    @property
    def fused(self) -> bool:
        """Whether the set in effect runs as one fused adapter right now."""
        return self.llm is self._base and self._applied_fused is not None

    @property
    def merged(self) -> bool:
        """Whether the set in effect runs on merged weights right now."""
        return self.llm is not self._base

    def _fusable(self, key: Key) -> bool:
        return self.fuse != "off" and len(key) >= 2

    def _fused_for(self, key: Key):
        if not self._fusable(key):
            return None
        if self.fusion is None:
            self.fusion = self._host.fusion_cache()
        handle = self.fusion.ready(key, self._applied_fused)
        if handle is None and self.fuse == "sync":
            return self.fusion.build_now(key, self._applied_fused)
        if handle is None and key != self._applied:
            self.fusion.cancel()  # the knobs moved on: drop a build for the previous set
        return handle

    def settle(self) -> None:
        """The knobs have settled (an answer under them is done): build their fused adapter in the background,
        so a knob change never waits for it (measured: building at the change itself pushed the next first
        token from ~55 to ~145 ms), and, with merging on, their merged model."""
        if self.fuse == "async" and self._fusable(self._applied) and self._applied_fused is None:
            self._fused_for(self._applied)  # creates the cache on first use
            self.fusion.request(self._applied)
        if self._merge and self.key and not self.merged:
            if self._merged is None:
                paths = {n: a.path for n, a in self._host.adapters.items()}
                self._merged = MergedSets(self._host.model_path, paths, self._host.load_merged)
            self._merged.request(self.key)

    def wait_fused(self, timeout: float | None = None) -> None:
        if self.fusion is not None:
            self.fusion.wait(timeout)

    def wait_merged(self, timeout: float | None = None) -> None:
        if self._merged is not None:
            self._merged.wait(timeout)

    def close(self) -> None:
        if self.fusion is not None:
            self.fusion.close()
        if self._merged is not None:
            self._merged.close()


class BatchAdapters:
    """Which weights serve each sequence of a batching context: a set of two or more AVs starts on its fused
    adapter where that is loaded, else on the separate adapters (the same sum, the same answers) while the
    fused one builds in the background, and for good if it cannot be built. A sequence keeps the variant it
    started with (the switch happens at a request boundary), so its K/V is never part separate, part fused."""

    def __init__(
        self,
        adapters: Mapping[str, LoadedAdapter],
        ctx,
        fusion: FusedAdapters,
        fuse: bool = True,
        vectors: ControlVectors | None = None,
    ):
        """`ctx`: the batching context (avgguf.runtime.contexts.BatchContext); `fusion`: its fused adapters;
        `vectors`: the engine's control vectors (a set's control-vector part is applied with its LoRA part)."""
        self._adapters, self._ctx, self._fusion, self.fuse = adapters, ctx, fusion, fuse
        self._split = vectors.split if vectors is not None else lambda key: (key, ())
        self._vectors = ContextVectors(vectors) if vectors is not None else None
        self._group: tuple | None = None  # the (set, fused?) the context's adapters are at
        self._applied_fused: object | None = None  # the fused adapter set on the context (never freed while so)

    def start(self, key: Key, in_use: Sequence[object] = ()) -> object | None:
        """The fused adapter a new sequence of this set starts with: the loaded one if it is ready, else None
        (the separate adapters) and a background build is asked for. `in_use`: fused adapters that running
        sequences compute with (never evicted)."""
        key = self._split(key)[0]  # fusion is of the LoRA part only
        if not self.fuse or len(key) < 2 or self._fusion.failed(key) is not None:
            return None
        try:
            handle = self._fusion.ready(key, keep=(self._applied_fused, *in_use))
        except AvggufError as exc:  # llama.cpp refused the file: recorded, the separate adapters serve
            log.warning("%s; the separate adapters serve %s", exc, dict(key))
            return None
        if handle is None:
            self._fusion.request(key, replace=False)  # concurrent sets queue up, none cancels another
        return handle

    def use(self, group: tuple, fused: object | None) -> None:
        """The context computes this group ((set, fused?); `fused`: its adapter) at the next decode step."""
        if group == self._group and fused is self._applied_fused:
            return
        key, is_fused = group
        lora_key, cvec_key = self._split(key)
        self._ctx.set_adapters(pairs_for(self._adapters, lora_key, fused if is_fused else None))
        if self._vectors is not None:
            self._vectors.set(self._ctx.ctx, cvec_key)  # each sequence's K/V stays its own group's
        self._group, self._applied_fused = group, fused

    def forget(self) -> None:
        """After a failed step: set the adapters again before the next one."""
        self._group = None
