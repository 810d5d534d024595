"""Continuous batching: the requests to one model decode together in one llama.cpp context.

Every request is a sequence of its own (own K/V cells, own llama.cpp sampler chain). A scheduler thread runs
one decode step at a time for ONE coefficient set: every sequence of that set contributes its next token (or a
chunk of its prompt), the sets with work take turns step by step, new requests join between steps and finished
or abandoned ones leave. A sequence's K/V is always computed under its own set, so no answer depends on
another request's coefficients. A finished sequence's K/V stays as a prompt cache: the next request with the
same set evaluates only what follows the longest common prefix (chat templates repeat the system prompt).
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import Engine, log_softmax
from .errors import AvggufError
from .fusion import Key

log = logging.getLogger(__name__)
PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the window repeat/presence/frequency penalties see
ADAPT_EVERY = 16     # steps between thread-policy checks


@dataclass
class Sampling:
    """llama-cpp-python's sampler settings and defaults (so a served answer equals `avgguf run`'s)."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's log-probability and the top k


class Sampler:
    """A llama.cpp sampler chain in llama-cpp-python's order: penalties, then greedy, or top-k, top-p, min-p,
    temperature and a seeded draw."""

    def __init__(self, s: Sampling, n_vocab: int):
        import llama_cpp as L

        self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        parts = [L.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty,
                                                s.presence_penalty)]
        if s.temperature < 0:
            parts.append(L.llama_sampler_init_dist(s.seed))
        elif s.temperature == 0:
            parts.append(L.llama_sampler_init_greedy())
        else:
            parts += [L.llama_sampler_init_top_k(s.top_k), L.llama_sampler_init_top_p(s.top_p, 1),
                      L.llama_sampler_init_min_p(s.min_p, 1), L.llama_sampler_init_temp(s.temperature),
                      L.llama_sampler_init_dist(s.seed)]
        for part in parts:
            L.llama_sampler_chain_add(self._chain, part)  # the chain owns its parts

    def sample(self, ctx, index: int) -> int:
        import llama_cpp as L

        return L.llama_sampler_sample(self._chain, ctx, index)  # also accepts the token (penalty window)

    def close(self) -> None:
        import llama_cpp as L

        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None


@dataclass
class Event:
    """What a request hears from the scheduler: a text piece (with its log-probabilities when asked), or the
    end: finish reason, generated tokens, prompt tokens evaluated (not taken from the prompt cache), timings."""

    kind: str  # "piece" | "done" | "error"
    text: str = ""
    logprobs: list[dict] | None = None
    finish: str | None = None
    tokens: int = 0
    evaluated: int = 0
    prompt_ms: float = 0.0
    gen_ms: float = 0.0


@dataclass
class BatchRequest:
    tokens: list[int]
    key: Key
    sampling: Sampling
    emit: Callable[[Event], None]  # called on the scheduler thread: must not block
    cancelled: threading.Event = field(default_factory=threading.Event)


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not sent yet)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


class Sequence:
    """One request in flight: its slot (llama.cpp sequence id), prompt still to evaluate, output so far."""

    def __init__(self, req: BatchRequest, slot: int, kept: int, engine: Engine):
        self.req, self.slot, self.engine = req, slot, engine
        self.pos = self.kept = kept          # tokens of this slot's K/V that stay valid (a reused prefix)
        self.todo = list(req.tokens[kept:])  # prompt tokens still to evaluate (never empty)
        self.sampler = Sampler(req.sampling, engine.n_vocab)
        self.generated: list[int] = []
        self.next_token: int | None = None   # sampled, not yet evaluated
        self.pending = ""                    # text held back: might begin a stop string
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.t0, self.t_first = time.perf_counter(), None

    def inputs(self, budget: int) -> list[tuple[int, int, int, bool]]:
        """This step's (token, position, sequence, logits?) entries, at most `budget` of them."""
        if self.todo:
            chunk, self.todo = self.todo[:budget], self.todo[budget:]
            out = [(t, self.pos + i, self.slot, False) for i, t in enumerate(chunk)]
            if not self.todo:
                out[-1] = (*out[-1][:3], True)
        else:
            out = [(self.next_token, self.pos, self.slot, True)]
        self.pos += len(out)
        return out

    def accept(self, token: int, logits: np.ndarray | None) -> str | None:
        """A sampled token: emit its text; returns the finish reason once the answer is done."""
        s = self.req.sampling
        self.t_first = self.t_first or time.perf_counter()
        if self.engine.is_end(token):
            return "stop"
        self.generated.append(token)
        self.next_token = token
        text = self.pending + self.utf8.decode(self.engine.detokenize([token]))
        cut = min((i for i in (text.find(x) for x in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._emit(text[:cut], token, logits)
            self.pending = ""
            return "stop"
        hold = held_back(text, s.stop)
        self.pending = text[len(text) - hold:] if hold else ""
        self._emit(text[:len(text) - hold], token, logits)
        return "length" if len(self.generated) >= s.max_tokens else None

    def _emit(self, text: str, token: int, logits: np.ndarray | None) -> None:
        entry = None if logits is None else [token_logprobs(self.engine, logits, token, self.req.sampling.logprobs)]
        if text or entry:
            self.req.emit(Event("piece", text, entry))

    def finish(self, reason: str) -> None:
        if self.pending:
            self.req.emit(Event("piece", self.pending))
        end = time.perf_counter()
        first = self.t_first or end
        self.req.emit(Event("done", finish=reason, tokens=len(self.generated),
                            evaluated=len(self.req.tokens) - self.kept, prompt_ms=1000 * (first - self.t0),
                            gen_ms=1000 * (end - first)))
        self.sampler.close()

    @property
    def cached(self) -> list[int]:
        """Tokens whose K/V this slot holds once the sequence ends (a last sampled token is not evaluated)."""
        return (self.req.tokens + self.generated)[:self.pos]


def token_logprobs(engine: Engine, logits: np.ndarray, token: int, top: int) -> dict:
    """OpenAI's logprobs entry for one token: its log-probability under the model and the `top` most likely."""
    lp = log_softmax(logits)
    best = np.argpartition(-lp, top)[:top] if top else np.array([], dtype=int)
    best = best[np.argsort(-lp[best])]

    def item(t: int) -> dict:
        raw = engine.detokenize([int(t)])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(lp[t]), "bytes": list(raw)}

    return {**item(token), "top_logprobs": [item(t) for t in best]}


class Batcher:
    """The scheduler of one model: `n_seq` sequences at once, a bounded wait list, one thread."""

    quantum = 4

    def __init__(self, engine: Engine, n_seq: int = 4, max_queue: int | None = None, kv_unified: bool = False,
                 peers: list[Batcher] | None = None):
        """`peers`: the batchers (this one included) that share the engine's cores: each decodes on the
        engine's thread count divided by how many of them have work."""
        self.engine = engine
        self.n_seq = n_seq
        self.max_queue = max_queue
        self.peers = peers if peers is not None else [self]
        self._n_threads = engine.n_threads  # what the context was created with
        self.keys: dict[Key, int] = {}  # requests per coefficient set, waiting or running
        self._ctx = engine.batch_context(n_seq, unified=kv_unified)
        self._fusion = engine.fusion_cache(capacity=max(4, n_seq))
        self._waiting: deque[BatchRequest] = deque()
        self._running: list[Sequence] = []
        self._cache: dict[int, tuple[Key, list[int]]] = {}  # free slot -> (its set, tokens its K/V holds)
        self._free = list(range(n_seq))
        self._turn = 0
        self._held = 0  # steps the current set has had in a row
        self._key: Key | None = None      # the set the context's adapters are at
        self._attempt: Key | None = None  # the set of the step in progress
        self._handles: dict[Key, object] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._steps = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="avgguf-batcher")
        self._thread.start()

    # -- the request side (any thread) ----------------------------------------------------------

    def submit(self, req: BatchRequest) -> None:
        """Queue a request; AvggufError("busy") when --max-queue requests already wait for a sequence."""
        with self._wake:
            full = len(self._running) >= self.n_seq or self._waiting
            if full and self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise BusyError(len(self._waiting), self.max_queue)
            self.keys[req.key] = self.keys.get(req.key, 0) + 1
            req.emit = self._counted(req.key, req.emit)
            self._waiting.append(req)
            self._wake.notify()

    def _counted(self, key: Key, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        ended = False

        def wrapped(ev: Event) -> None:
            nonlocal ended
            if ev.kind != "piece":
                if ended:
                    return  # one end per request
                ended = True
                with self._wake:
                    self.keys[key] -= 1
                    if not self.keys[key]:
                        del self.keys[key]
            try:
                emit(ev)
            except RuntimeError:  # the listener's event loop is gone (shutdown)
                pass
        return wrapped

    @property
    def load(self) -> int:
        """Requests waiting or running."""
        return sum(self.keys.values())

    def _threads(self) -> int:
        busy = sum(1 for b in self.peers if b.load) or 1
        return max(1, self.engine.adapt_threads() // busy)

    @property
    def native_id(self) -> int | None:
        """The scheduler thread's OS id: its CPU priority is the one decoding runs at."""
        return self._thread.native_id

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._ctx.close()
        self._fusion.close()

    # -- the scheduler thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self._admit()
                self._step()
            except Exception as exc:
                log.exception("batch step failed")
                self._fail(exc)
        for seq in self._running:
            seq.finish("cancelled")
        for req in self._waiting:
            req.emit(Event("done", finish="cancelled"))

    def _admit(self) -> None:
        """Waiting requests take the free sequence slots (between steps)."""
        while self._free:
            with self._wake:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.cancelled.is_set():
                req.emit(Event("done", finish="cancelled"))
                continue
            slot, kept = self._slot_for(req)
            if not self._ctx.forget(slot, kept):  # a recurrent/hybrid model cannot cut a sequence: start afresh
                self._ctx.forget(slot)
                kept = 0
            try:
                self._running.append(Sequence(req, slot, kept, self.engine))
            except Exception as exc:  # noqa: BLE001 (this request hears why; the others go on)
                req.emit(Event("error", text=str(exc)))
                self._free.append(slot)

    def _slot_for(self, req: BatchRequest) -> tuple[int, int]:
        """The free slot whose cached K/V shares the longest prefix with this prompt under the same set (at
        least the last prompt token is evaluated again, for its logits); else the least recently used."""
        best, kept = self._free[0], 0
        for slot in self._free:
            key, tokens = self._cache.get(slot, (None, []))
            if key != req.key:
                continue
            n = common_prefix(tokens, req.tokens[:-1])
            if n > kept:
                best, kept = slot, n
        self._free.remove(best)
        self._cache.pop(best, None)
        return best, kept

    def _step(self) -> None:
        self._drop_cancelled()
        if not self._running:
            return
        key = self._attempt = self._next_key()
        self._use(key)
        group = [s for s in self._running if s.req.key == key]
        entries, owners, budget = [], [], self._ctx.capacity
        for seq in sorted(group, key=lambda s: bool(s.todo)):  # decoding sequences first, then prompt chunks
            if budget <= 0:
                break
            part = seq.inputs(budget)
            budget -= len(part)
            entries += part
            owners += [seq if want else None for *_, want in part]
        self._steps += 1
        if self._steps % ADAPT_EVERY == 0 or len(self.peers) > 1:  # peers start and stop: check every step
            n = self._threads()
            if n != self._n_threads:
                self._ctx.set_threads(n)
                self._n_threads = n
        self._ctx.decode(entries)
        for index, seq in enumerate(owners):
            if seq is not None:
                self._sample(seq, index)

    def _sample(self, seq: Sequence, index: int) -> None:
        token = seq.sampler.sample(self._ctx.ctx, index)
        logits = self._ctx.logits(index) if seq.req.sampling.logprobs is not None else None
        reason = seq.accept(token, logits)
        if reason is not None:
            self._end(seq, reason)

    def _end(self, seq: Sequence, reason: str) -> None:
        seq.finish(reason)
        self._running.remove(seq)
        self._cache[seq.slot] = (seq.req.key, seq.cached)
        self._free.append(seq.slot)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.req.cancelled.is_set()]:
            self._end(seq, "cancelled")

    def _next_key(self) -> Key:
        """Coefficient sets take turns, `quantum` decode steps each (fair between groups; a change of adapters
        makes llama.cpp rebuild its compute graph, so a set keeps the context for a few steps)."""
        keys = sorted({s.req.key for s in self._running})
        if self._key in keys and self._held < self.quantum:
            self._held += 1
            return self._key
        self._turn = (self._turn + 1) % len(keys)
        self._held = 1
        return keys[self._turn]

    def _use(self, key: Key) -> None:
        if key == self._key:
            return
        self._ctx.set_adapters(self._pairs(key))
        self._key = key

    def _pairs(self, key: Key) -> list[tuple[object, float]]:
        """One fused adapter at scale 1 for two or more AVs (built once per set, exact), else the AV itself."""
        if len(key) < 2:
            return [(self.engine.adapters[n].handle, v) for n, v in key]
        active = {s.req.key for s in self._running}
        keep = tuple(h for k, h in self._handles.items() if k in active)
        handle = self._fusion.ready(key, keep=keep) or self._fusion.build_now(key, keep=keep)
        self._handles = {k: h for k, h in self._handles.items() if k in active}
        self._handles[key] = handle
        return [(handle, 1.0)]

    def _fail(self, exc: Exception) -> None:
        """A step that failed ends the sequences of its set with an error; their slots start afresh."""
        for seq in [s for s in self._running if s.req.key == self._attempt]:
            seq.req.emit(Event("error", text=str(exc)))
            seq.sampler.close()
            self._running.remove(seq)
            self._ctx.forget(seq.slot)
            self._free.append(seq.slot)
        self._key = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class BusyError(AvggufError):
    def __init__(self, waiting: int, limit: int):
        super().__init__(f"server busy: {waiting} requests queued (--max-queue {limit}); retry later")
