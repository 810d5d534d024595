"""What the server serves: each model id's runtime, its batching contexts, its PAD slot and its hot sets."""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass

from fastapi import Request

from avgguf.config.modelfile import Modelfile
from avgguf.runtime import merged as hot
from avgguf.runtime.batching import Batcher
from avgguf.runtime.contexts import auto_parallel
from avgguf.runtime.session import Runtime
from avgguf.server.guard import Handoff
from avgguf.server.hot_sets import HotSets
from avgguf.server.protocol import APIError


@dataclass
class Served:
    """One model id: its runtime (prompt formatting, decoding-time alignment) and its batchers: `contexts`
    llama.cpp contexts (weights shared), each decoding its share of `parallel` requests together, the cores
    split between those with work (avgguf.runtime.batching)."""

    modelfile: Modelfile
    runtime: Runtime
    global_scales: dict[str, float] | None = None  # set by POST /lora-adapters
    max_queue: int | None = None
    parallel: int | None = None  # None: avgguf.runtime.contexts.auto_parallel (8 where the K/V fits 1 GiB, else 4)
    kv_unified: bool = False
    contexts: int = 1
    merge: bool = False  # hot sets on merged weights (avgguf.runtime.merged)
    waiting: int = 0

    def __post_init__(self):
        if self.parallel is None:
            engine = self.runtime.engine
            self.parallel = auto_parallel(engine.base.shapes, engine.n_ctx)
        self.pool: asyncio.Queue = asyncio.Queue()  # the runtime, for PAD requests (one at a time)
        self.pool.put_nowait(self.runtime)
        n = self.contexts
        self.peers: list[Batcher] = []  # every context of this model: the cores are split between those with work
        self.batchers = [self.add_batcher(self.runtime.engine, -(-self.parallel // n)) for _ in range(n)]
        self.hot = HotSets(self) if self.merge else None
        self.inflight: weakref.WeakSet[threading.Event] = weakref.WeakSet()  # cancel flags (Registry.cancel_all)
        self.runtime.engine.max_token_bytes  # noqa: B018 (one pass over the vocabulary now, not in a request)

    def add_batcher(self, engine, n_seq: int) -> Batcher:
        """Another batching context of this model (its weights may be another file: a merged set)."""
        batcher = Batcher(engine, n_seq=n_seq, max_queue=self.max_queue, kv_unified=self.kv_unified, peers=self.peers)
        self.peers.append(batcher)
        return batcher

    def route(self, key: tuple) -> tuple[Batcher, tuple]:
        """Where a request with this coefficient set decodes, and the set to ask that context for: a hot
        set's merged model (no adapters), else the base's contexts."""
        merged = self.hot.batcher(key) if self.hot is not None else None
        return (merged, ()) if merged is not None else (self.batcher(key), key)

    def batcher(self, key: tuple) -> Batcher:
        """The context for a request: one already serving its coefficient set with a sequence free (they
        decode together), else the least busy."""
        serving = [b for b in self.batchers if key in b.keys and b.load < b.n_seq]
        return min(serving or self.batchers, key=lambda b: b.load)

    async def acquire(self) -> Runtime:
        """The runtime for a PAD request; 503 in OpenAI's shape when --max-queue requests already wait."""
        if self.pool.empty() and self.max_queue is not None and self.waiting >= self.max_queue:
            raise APIError(
                503,
                f"server busy: {self.waiting} requests queued (--max-queue {self.max_queue}); retry later",
                code="server_busy",
                type_="server_error",
            )
        self.waiting += 1
        try:
            return await self.pool.get()
        finally:
            self.waiting -= 1

    def release(self, runtime: Runtime) -> None:
        """Give back the runtime `acquire` gave (call on the event loop's thread)."""
        self.pool.put_nowait(runtime)

    def idle(self) -> bool:
        """No PAD request holds the runtime (no thread of this model is inside llama.cpp for PAD)."""
        return self.pool.qsize() == 1

    @property
    def engine(self):
        """The base's engine (a merged set's engine is its sibling)."""
        return self.runtime.engine

    def add_context(self, engine) -> Batcher:
        """A batching context of `parallel` sequences on `engine` (a merged set's model), a peer of the base's."""
        return self.add_batcher(engine, self.parallel)

    def remove_context(self, batcher: Batcher) -> None:
        """`batcher` no longer shares this model's cores (closed by its owner)."""
        if batcher in self.peers:
            self.peers.remove(batcher)

    def close(self, timeout: float = 10.0) -> bool:
        """Stop every context of this model; whether all their threads stopped (only then may the model be
        freed: a thread still inside llama.cpp keeps it)."""
        stopped = self.hot.close(timeout) if self.hot is not None else True
        return all([b.close(timeout) for b in self.batchers]) and stopped


class Registry:
    """Model ids -> what serves them. `runtimes` keys are modelfile names, or NAME:PROFILE for baked profiles
    (a GGUF of their own, served without knobs)."""

    def __init__(
        self,
        runtimes: dict[str, tuple[Modelfile, Runtime]],
        api_key: str | None = None,
        stats: bool = False,
        allow_write: bool = False,
        max_queue: int | None = None,
        parallel: int | None = None,
        kv_unified: bool = False,
        contexts: int = 1,
        merge: str | None = "off",
    ):
        """`merge`: avgguf.runtime.merged's mode for every live model (baked profiles have no sets to merge)."""

        def served(mf, rt) -> Served:
            return Served(
                mf,
                rt,
                max_queue=max_queue,
                parallel=parallel,
                kv_unified=kv_unified,
                contexts=contexts,
                merge=bool(mf.av_paths) and hot.enabled(merge or mf.spec.defaults.merge, rt.engine),
            )

        self.models = {name: served(mf, rt) for name, (mf, rt) in runtimes.items() if ":" not in name}
        self.baked = {name: served(mf, rt) for name, (mf, rt) in runtimes.items() if ":" in name}
        self.api_key = api_key
        self.handoff: Handoff | None = None  # desktop: the page's one-time code for the key
        self.stats = stats
        self.allow_write = allow_write  # POST /avgguf/profiles may write modelfiles

    def cancel_all(self) -> int:
        """Ask every in-flight request to stop (shutdown): each ends "cancelled" at its next step, queued or
        running, batched or PAD; how many were asked."""
        served = [*self.models.values(), *self.baked.values()]
        flags = [f for s in served for f in list(s.inflight) if not f.is_set()]
        for flag in flags:
            flag.set()
        return len(flags)  # queued ones too: the flag is set at submit; each batcher drops them next step

    def close(self) -> None:
        """Stop every model's contexts, then free the models whose threads stopped (scratch removed)."""
        for served in [*self.models.values(), *self.baked.values()]:
            if served.close() and served.idle():  # no PAD thread still inside llama.cpp
                served.runtime.close()

    def ids(self) -> list[str]:
        out = []
        for name, s in self.models.items():
            out.append(name)
            out += [f"{name}:{p}" for p in s.modelfile.spec.profiles]
        return out + list(self.baked)

    def resolve(self, model_id: str) -> tuple[Served, str | None]:
        if model_id in self.baked:
            return self.baked[model_id], None
        name, _, profile = model_id.partition(":")
        served = self.models.get(name)
        if served is None or (profile and profile not in served.modelfile.spec.profiles):
            raise APIError(
                404,
                f"model {model_id!r} does not exist; GET /v1/models lists {self.ids()}",
                param="model",
                code="model_not_found",
            )
        return served, profile or None

    def pick(self, model: str | None) -> Served:
        """?model=ID on the llama-server-style routes; the first model when none is named."""
        if model is None:
            return next(iter(self.models.values()))
        return self.resolve(model)[0]


def get_registry(request: Request) -> Registry:
    return request.app.state.registry
