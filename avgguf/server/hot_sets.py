"""The server's hot sets: coefficient sets asked for often enough run on merged weights (avgguf.runtime.merged), each in
a batching context of its own next to the base's."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from avgguf.runtime.batching import Batcher
from avgguf.runtime.merged import MergedSets


class Host(Protocol):
    """What a hot set needs of the model it serves (avgguf.server.registry.Served)."""

    parallel: int

    @property
    def engine(self): ...

    def add_context(self, engine) -> Batcher: ...

    def remove_context(self, batcher: Batcher) -> None: ...


class MergedServing:
    """A hot set's merged model and its batching context (a peer of the base's contexts)."""

    def __init__(self, host: Host, path):
        self.engine = host.engine.sibling(path)
        self.batcher = host.add_context(self.engine)
        self._host = host

    def close(self, timeout: float = 10.0) -> None:
        """Runs on a worker thread when the set is evicted (avgguf.runtime.merged.MergedSets.take), so the event loop never
        waits for the decoding thread; the model is freed only once that thread has stopped."""
        self._host.remove_context(self.batcher)
        if self.batcher.close(timeout):
            self.engine.close()


class HotSets:
    """Which coefficient sets of a model run on merged weights: a set that `HOT_SHARE` of the last `WINDOW`
    requests asked for is baked in the background (at most `CAPACITY` kept, the least recently used one
    with no requests freed); once `CAPACITY` are kept, a set is baked only if asked for twice as often as the
    least asked-for kept one (evenly alternating sets would otherwise be re-baked in turn). Until its model
    is ready, and for every other set, the base's contexts serve."""

    WINDOW, HOT_SHARE, CAPACITY = 32, 0.25, 2

    def __init__(self, served: Host):
        engine = served.engine
        paths = {n: a.path for n, a in engine.adapters.items()}
        self._control_vectors = engine.control_vectors  # not weights: a set using one is never merged
        self._recent: deque = deque(maxlen=self.WINDOW)
        self._sets = MergedSets(
            engine.model_path,
            paths,
            lambda p: MergedServing(served, p),
            capacity=self.CAPACITY,
            ram_extra=kv_bytes(engine, served.parallel),
        )

    def batcher(self, key: tuple) -> Batcher | None:
        if not key or any(v and n in self._control_vectors.vectors for n, v in key):
            return None
        self._recent.append(key)
        merged = self._sets.take(key, lambda m: m.batcher.load > 0)
        if merged is not None:
            return merged.batcher
        count = self._recent.count(key)
        if count >= self.HOT_SHARE * self.WINDOW:
            kept = self._sets.ready()
            if len(kept) < self.CAPACITY or count >= 2 * min(self._recent.count(k) for k in kept):
                self._sets.request(key, replace=False)  # sets that alternate must not cancel each other
        return None

    def card(self) -> dict:
        """For GET /v1/models/{id}: the sets served from merged weights now, and the one being baked."""
        baking = self._sets.baking
        return {"merged_sets": [dict(key) for key in self._sets.ready()], "merging": None if baking is None else dict(baking)}

    def wait(self, timeout: float | None = None) -> None:
        self._sets.wait(timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Stop baking and free the merged models, waiting at most about `timeout` s; whether all stopped."""
        return self._sets.close(timeout)


def kv_bytes(engine, n_seq: int) -> int:
    """The f16 K/V cache of a batching context of `n_seq` sequences of the engine's context length (what a
    merged set's context costs besides its weights), from the base's K and V projection shapes."""
    base = engine.base
    per_token = 0
    for i in range(base.block_count or 0):
        for name in (f"blk.{i}.attn_k.weight", f"blk.{i}.attn_v.weight"):
            shape = base.shapes.get(name)
            per_token += 2 * (shape[0] if shape else (base.embedding_length or 0))
    return per_token * n_seq * engine.n_ctx
