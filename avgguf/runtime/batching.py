"""Continuous batching: the requests to one model decode together in one llama.cpp context.

Every request is a sequence of its own (own K/V cells, own llama.cpp sampler chain). A scheduler thread runs
one decode step at a time for ONE coefficient set: every sequence of that set contributes its next token (or a
chunk of its prompt), the sets with work take turns step by step, new requests join between steps and finished
or abandoned ones leave. A sequence's K/V is always computed under its own set, so no answer depends on
another request's coefficients. A finished sequence's K/V stays as a prompt cache: the next request with the
same set evaluates only what follows the longest common prefix (chat templates repeat the system prompt).

One client cannot stall the others (audit findings 6, 7, 14, 23):
- Stop strings are matched as the answer streams (StopMatcher): each new character costs one automaton step,
  whatever the number and length of the stop strings.
- A set of two or more AVs runs on one fused adapter (avgguf.gguf.fuse), built on a worker thread: until it is
  ready, and for good if it cannot be built (a full /dev/shm...), the separate adapters serve the set (the same
  sum, the same answers). A sequence keeps the variant it started with: its K/V is never part separate, part
  fused (the switch happens at a request boundary), and the prompt cache is keyed on the variant too.
- A request whose `cancelled` flag is set ends within one decode step ("cancelled"), whether it waits for a
  sequence, is evaluating its prompt (in chunks of at most `chunk` tokens per step) or is decoding.
- The wait list is finite by default (QUEUE_PER_SEQUENCE x n_seq): a full one raises BusyError at submit,
  before anything is sent to the client.
- close() waits a bounded time and never frees the llama.cpp context under a decoding thread.
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

from avgguf.runtime.engine import Engine, log_softmax
from avgguf.errors import AvggufError
from avgguf.runtime.fused import Key
from avgguf.runtime.sampling import Sampler, Sampling  # noqa: F401 (Sampling: part of a BatchRequest)
from avgguf.runtime.stops import StopMatcher, held_back  # noqa: F401 (held_back: the rule StopMatcher keeps)

log = logging.getLogger(__name__)
ADAPT_EVERY = 16  # steps between thread-policy checks
# The wait list: requests beyond the running sequences that may queue, per sequence. Four answers' time is
# what a waiting client may expect; beyond that a quick 503 serves it better than a long silence.
QUEUE_PER_SEQUENCE = 4
DEFAULT_MAX_QUEUE = QUEUE_PER_SEQUENCE * 4  # the server's --max-queue default: its default --parallel 4
CLOSE_TIMEOUT = 10.0  # seconds close() waits for the scheduler thread


def default_max_queue(n_seq: int) -> int:
    """The wait list of a batcher of `n_seq` sequences when none is given."""
    return QUEUE_PER_SEQUENCE * max(1, n_seq)


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
    cancelled: threading.Event = field(default_factory=threading.Event)  # set: ends within one step
    stops: StopMatcher | None = field(default=None, repr=False)  # built by submit() (the caller's thread)
    sampler: Sampler | None = field(default=None, repr=False)  # built by the caller (a grammar is parsed there)


class Sequence:
    """One request in flight: its slot (llama.cpp sequence id), prompt still to evaluate, output so far."""

    def __init__(self, req: BatchRequest, slot: int, kept: int, engine: Engine, fused: object | None = None):
        self.req, self.slot, self.engine = req, slot, engine
        self.fused = fused  # the fused adapter this sequence's K/V is computed with, or None
        self.group = (req.key, fused is not None)  # what decodes together: same set, same variant
        self.pos = self.kept = kept  # tokens of this slot's K/V that stay valid (a reused prefix)
        self.todo = list(req.tokens[kept:])  # prompt tokens still to evaluate (never empty)
        self.stops = req.stops if req.stops is not None else StopMatcher(req.sampling.stop)
        self.sampler: Sampler = req.sampler or engine.sampler(req.sampling)
        self.generated: list[int] = []
        self.next_token: int | None = None  # sampled, not yet evaluated
        self.pending = ""  # text held back: might begin a stop string
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
        piece = self.utf8.decode(self.engine.detokenize([token]))
        text = self.pending + piece
        if self.stops.active:
            cut = self.stops.feed(piece, len(self.pending))  # only the new characters are looked at
            if cut >= 0:
                self._emit(text[:cut], token, logits)
                self.pending = ""
                return "stop"
            hold = self.stops.held
            self.pending = text[len(text) - hold :] if hold else ""
            text = text[: len(text) - hold]
        self._emit(text, token, logits)
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
        self.req.emit(
            Event(
                "done",
                finish=reason,
                tokens=len(self.generated),
                evaluated=len(self.req.tokens) - self.kept,
                prompt_ms=1000 * (first - self.t0),
                gen_ms=1000 * (end - first),
            )
        )
        self.sampler.close()

    @property
    def cached(self) -> list[int]:
        """Tokens whose K/V this slot holds once the sequence ends (a last sampled token is not evaluated)."""
        return (self.req.tokens + self.generated)[: self.pos]


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

    def __init__(
        self,
        engine: Engine,
        n_seq: int = 4,
        max_queue: int | None = None,
        kv_unified: bool = False,
        peers: list[Batcher] | None = None,
        fuse: bool = True,
        chunk: int | None = None,
    ):
        """`peers`: the batchers (this one included) that share the engine's cores: each decodes on the
        engine's thread count divided by how many of them have work. `max_queue`: requests that may wait for
        a sequence (default: default_max_queue(n_seq)). `fuse`: serve sets of two or more AVs on one fused
        adapter once built (else always on the separate adapters). `chunk`: prompt tokens one sequence
        evaluates per step at most (default: the context's batch size); a cancel is seen between chunks."""
        self.engine = engine
        self.n_seq = n_seq
        self.max_queue = default_max_queue(n_seq) if max_queue is None else max_queue
        self.peers = peers if peers is not None else [self]
        self.fuse = fuse
        self._n_threads = engine.n_threads  # what the context was created with
        self.keys: dict[Key, int] = {}  # requests per coefficient set, waiting or running
        self._ctx = engine.batch_context(n_seq, unified=kv_unified)
        self.chunk = max(1, min(chunk or self._ctx.capacity, self._ctx.capacity))
        self._fusion = engine.fusion_cache(capacity=max(4, n_seq))
        self._waiting: deque[BatchRequest] = deque()
        self._running: list[Sequence] = []
        self._cache: dict[int, tuple[tuple, list[int]]] = {}  # free slot -> (its group, tokens its K/V holds)
        self._free = list(range(n_seq))
        self._turn = 0
        self._held = 0  # steps the current group has had in a row
        self._group: tuple | None = None  # the (set, fused?) the context's adapters are at
        self._applied_fused: object | None = None  # the fused adapter set on the context (never freed while so)
        self._attempt: tuple | None = None  # the group of the step in progress
        self._wake = threading.Condition()
        self._closed = False
        self._steps = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="avgguf-batcher")
        self._thread.start()

    # -- the request side (any thread) ----------------------------------------------------------

    def submit(self, req: BatchRequest) -> None:
        """Queue a request; BusyError when `max_queue` requests already wait for a sequence, or after close
        (nothing has been emitted then). The stop strings are compiled here, on the caller's thread."""
        if req.stops is None:
            req.stops = StopMatcher(req.sampling.stop)
        with self._wake:
            if self._closed:
                raise BusyError(len(self._waiting), self.max_queue, "server shutting down: retry later")
            full = len(self._running) >= self.n_seq or self._waiting
            if full and len(self._waiting) >= self.max_queue:
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

    def cancel_all(self) -> int:
        """Shutdown: every request waiting or running ends with finish "cancelled" within one decode step
        (returns at once; later requests are served as usual). How many were asked to stop."""
        with self._wake:
            reqs = [*self._waiting, *(s.req for s in self._running)]
            for req in reqs:
                req.cancelled.set()
            self._wake.notify()
        return len(reqs)

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

    @property
    def steps(self) -> int:
        """Decode steps run so far."""
        return self._steps

    def wait_fused(self, timeout: float | None = None) -> bool:
        """Block until background fused-adapter builds finish (benchmarks, tests); whether they did."""
        return self._fusion.wait(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Stop: requests still waiting or running end "cancelled" (at the next step). Waits at most `timeout`
        s in all (the scheduler thread, then a fused build); a thread still inside llama.cpp keeps its context
        (leaked: the process is exiting; freeing it under the thread would be a use-after-free). Whether the
        thread stopped: only then may the caller free the model."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            self._ctx.close()
        else:
            log.warning(
                "a batching thread is still inside llama.cpp after %.0f s; its context is left to the process exit", timeout
            )
        self._fusion.close(timeout=max(0.0, deadline - time.monotonic()))  # a build stops at its next tensor
        return stopped

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
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
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
            fused = self._fused_for(req.key)
            slot, kept = self._slot_for(req, (req.key, fused is not None))
            if not self._ctx.forget(slot, kept):  # a recurrent/hybrid model cannot cut a sequence: start afresh
                self._ctx.forget(slot)
                kept = 0
            try:
                self._running.append(Sequence(req, slot, kept, self.engine, fused))
            except Exception as exc:  # noqa: BLE001 (this request hears why; the others go on)
                req.emit(Event("error", text=str(exc)))
                self._free.append(slot)

    def _fused_for(self, key: Key) -> object | None:
        """The fused adapter a new sequence of this set starts with: the loaded one if it is ready, else None
        (the separate adapters: same answers) and a background build is asked for."""
        if not self.fuse or len(key) < 2 or self._fusion.failed(key) is not None:
            return None
        in_use = (self._applied_fused, *(s.fused for s in self._running if s.fused is not None))
        try:
            handle = self._fusion.ready(key, keep=in_use)
        except AvggufError as exc:  # llama.cpp refused the file: recorded, the separate adapters serve
            log.warning("%s; the separate adapters serve %s", exc, dict(key))
            return None
        if handle is None:
            self._fusion.request(key, replace=False)  # concurrent sets queue up, none cancels another
        return handle

    def _slot_for(self, req: BatchRequest, group: tuple) -> tuple[int, int]:
        """The free slot whose cached K/V shares the longest prefix with this prompt under the same set and
        variant (at least the last prompt token is evaluated again, for its logits); else the least recently
        used."""
        best, kept = self._free[0], 0
        for slot in self._free:
            cached, tokens = self._cache.get(slot, (None, []))
            if cached != group:
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
        group = self._attempt = self._next_group()
        members = [s for s in self._running if s.group == group]
        self._use(group, members)
        entries, owners, budget = [], [], self._ctx.capacity
        for seq in sorted(members, key=lambda s: bool(s.todo)):  # decoding sequences first, then prompt chunks
            if budget <= 0:
                break
            part = seq.inputs(min(budget, self.chunk))
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
        self._cache[seq.slot] = (seq.group, seq.cached)
        self._free.append(seq.slot)

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave before every step: running ones free their sequence, waiting ones the
        wait list (they would otherwise count against max_queue until a sequence frees up)."""
        for seq in [s for s in self._running if s.req.cancelled.is_set()]:
            self._end(seq, "cancelled")
        with self._wake:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            if gone:
                self._waiting = deque(r for r in self._waiting if not r.cancelled.is_set())
        for req in gone:
            req.emit(Event("done", finish="cancelled"))

    def _next_group(self) -> tuple:
        """Groups (a coefficient set and its variant) take turns, `quantum` decode steps each (fair between
        groups; a change of adapters makes llama.cpp rebuild its compute graph, so a group keeps the context
        for a few steps)."""
        groups = sorted({s.group for s in self._running})
        if self._group in groups and self._held < self.quantum:
            self._held += 1
            return self._group
        self._turn = (self._turn + 1) % len(groups)
        self._held = 1
        return groups[self._turn]

    def _use(self, group: tuple, members: list[Sequence]) -> None:
        key, fused = group
        handle = members[0].fused  # every member of a fused group has the set's one loaded adapter
        if group == self._group and handle is self._applied_fused:
            return
        if fused:  # one fused adapter at scale 1 (exact: avgguf.gguf.fuse)
            pairs = [(handle, 1.0)]
        else:
            pairs = [(self.engine.adapters[n].handle, v) for n, v in key]
        self._ctx.set_adapters(pairs)
        self._group, self._applied_fused = group, handle

    def _fail(self, exc: Exception) -> None:
        """A step that failed ends the sequences of its group with an error; their slots start afresh."""
        for seq in [s for s in self._running if s.group == self._attempt]:
            seq.req.emit(Event("error", text=str(exc)))
            seq.sampler.close()
            self._running.remove(seq)
            self._ctx.forget(seq.slot)
            self._free.append(seq.slot)
        self._group = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class BusyError(AvggufError):
    """The wait list is full (or the batcher is closing): raised by submit() before anything is emitted."""

    def __init__(self, waiting: int, limit: int, message: str | None = None):
        super().__init__(message or f"server busy: {waiting} requests queued (--max-queue {limit}); retry later")
