"""The server's hot sets: coefficient sets asked for often enough run on merged weights (avgguf.hot), each in
a batching context of its own next to the base's."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .batching import Batcher
from .hot import MergedSets

if TYPE_CHECKING:
    from .server import Served


class MergedServing:
    """A hot set's merged model and its batching context (a peer of the base's contexts)."""

    def __init__(self, served: Served, path):
        self.engine = served.runtime.engine.sibling(path)
        self.batcher = served.add_batcher(self.engine, served.parallel)
        self._peers = served.peers

    def close(self) -> None:
        self._peers.remove(self.batcher)
        self.batcher.close()
        self.engine.close()


class HotSets:
    """Which coefficient sets of a model run on merged weights: a set that `HOT_SHARE` of the last `WINDOW`
    requests asked for is baked in the background (at most `CAPACITY` kept, the least recently used one
    with no requests freed); once `CAPACITY` are kept, a set is baked only if asked for twice as often as the
    least asked-for kept one (evenly alternating sets would otherwise be re-baked in turn). Until its model
    is ready, and for every other set, the base's contexts serve."""

    WINDOW, HOT_SHARE, CAPACITY = 32, 0.25, 2

    def __init__(self, served: Served):
        engine = served.runtime.engine
        paths = {n: a.path for n, a in engine.adapters.items()}
        self._recent: deque = deque(maxlen=self.WINDOW)
        self._sets = MergedSets(engine.model_path, paths, lambda p: MergedServing(served, p),
                                capacity=self.CAPACITY)

    def batcher(self, key: tuple) -> Batcher | None:
        if not key:
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
        return {"merged_sets": [dict(key) for key in self._sets.ready()],
                "merging": None if baking is None else dict(baking)}

    def wait(self, timeout: float | None = None) -> None:
        self._sets.wait(timeout)

    def close(self) -> None:
        self._sets.close()
