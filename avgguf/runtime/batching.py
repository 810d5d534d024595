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

A request in flight and the slots' prompt cache: avgguf.runtime.sequences; which adapters a sequence and the
context compute with: avgguf.runtime.adapter_sets.BatchAdapters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from avgguf.errors import AvggufError
from avgguf.runtime.adapter_sets import BatchAdapters
from avgguf.runtime.background import Key
from avgguf.runtime.engine import Engine
from avgguf.runtime.sampling import Sampling
from avgguf.runtime.sequences import BatchRequest, Event, Sequence, Slots, Turns, common_prefix, token_logprobs
from avgguf.runtime.stops import StopMatcher, held_back

log = logging.getLogger(__name__)
# what callers import from here (the request side of batching)
__all__ = [
    "DEFAULT_MAX_QUEUE",
    "BatchRequest",
    "Batcher",
    "BusyError",
    "Event",
    "Sampling",
    "StopMatcher",
    "common_prefix",
    "default_max_queue",
    "held_back",
    "token_logprobs",
]
ADAPT_EVERY = 16  # steps between thread-policy checks
# The wait list: requests beyond the running sequences that may queue, per sequence. Four answers' time is
# what a waiting client may expect; beyond that a quick 503 serves it better than a long silence.
QUEUE_PER_SEQUENCE = 4
DEFAULT_MAX_QUEUE = QUEUE_PER_SEQUENCE * 4  # the server's --max-queue default: its default --parallel 4
CLOSE_TIMEOUT = 10.0  # seconds close() waits for the scheduler thread


def default_max_queue(n_seq: int) -> int:
    """The wait list of a batcher of `n_seq` sequences when none is given."""
    return QUEUE_PER_SEQUENCE * max(1, n_seq)


class BusyError(AvggufError):
    """The wait list is full (or the batcher is closing): raised by submit() before anything is emitted."""

    def __init__(self, waiting: int, limit: int, message: str | None = None):
        super().__init__(message or f"server busy: {waiting} requests queued (--max-queue {limit}); retry later")


class WaitList:
    """The requests waiting for a sequence (at most `max_queue` once every sequence is taken) and how many of
    each coefficient set wait or run (`keys`); shared by the callers' threads and the scheduler's, under `wake`."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.keys: dict[Key, int] = {}
        self.wake = threading.Condition()
        self.closed = False
        self._waiting: deque[BatchRequest] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, req: BatchRequest, full: bool) -> None:
        """Queue a request (`full`: every sequence is taken); BusyError when `max_queue` already wait, or after
        close. From here on the request counts in `keys` until its end event."""
        with self.wake:
            if self.closed:
                raise BusyError(len(self._waiting), self.max_queue, "server shutting down: retry later")
            if (full or self._waiting) and len(self._waiting) >= self.max_queue:
                raise BusyError(len(self._waiting), self.max_queue)
            self.keys[req.key] = self.keys.get(req.key, 0) + 1
            req.emit = self._counted(req.key, req.emit)
            self._waiting.append(req)
            self.wake.notify()

    def _counted(self, key: Key, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        ended = False

        def wrapped(ev: Event) -> None:
            nonlocal ended
            if ev.kind != "piece":
                if ended:
                    return  # one end per request
                ended = True
                with self.wake:
                    self.keys[key] -= 1
                    if not self.keys[key]:
                        del self.keys[key]
            try:
                emit(ev)
            except RuntimeError:  # the listener's event loop is gone (shutdown)
                pass

        return wrapped

    def pop(self) -> BatchRequest | None:
        with self.wake:
            return self._waiting.popleft() if self._waiting else None

    def cancel_all(self, running: list[BatchRequest]) -> int:
        """Set the cancel flag of every waiting request and of these running ones; how many."""
        with self.wake:
            reqs = [*self._waiting, *running]
            for req in reqs:
                req.cancelled.set()
            self.wake.notify()
        return len(reqs)

    def drop_cancelled(self) -> None:
        """Cancelled requests leave the wait list (they would otherwise count against max_queue until a
        sequence frees up), each ending "cancelled"."""
        with self.wake:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            if gone:
                self._waiting = deque(r for r in self._waiting if not r.cancelled.is_set())
        for req in gone:
            req.emit(Event("done", finish="cancelled"))

    def wait_for_work(self, running: bool) -> bool:
        """Block until there is a request to serve (or `running` ones); False once closed."""
        with self.wake:
            while not self.closed and not self._waiting and not running:
                self.wake.wait()
            return not self.closed

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()

    def drain(self) -> None:
        """At shutdown: every request still waiting ends "cancelled"."""
        with self.wake:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            req.emit(Event("done", finish="cancelled"))


def step_entries(members: list[Sequence], capacity: int, chunk: int) -> tuple[list, list]:
    """One step's batch entries and, per entry, the sequence that samples from its logits (or None).
    Decoding sequences take the `capacity` first, then prompt chunks (at most `chunk` tokens each). The
    entries go in sequence-id order: with a K/V stream per sequence llama.cpp splits a batch into
    micro-batches of consecutive sequence ids only (llama_batch_allocr::split_equal, sequential), so in any
    other order one step of 8 sequences ran as up to 8 forward passes."""
    parts, budget = [], capacity
    for seq in sorted(members, key=lambda s: bool(s.todo)):
        if budget <= 0:
            break
        part = seq.inputs(min(budget, chunk))
        budget -= len(part)
        parts.append((seq, part))
    entries, owners = [], []
    for seq, part in sorted(parts, key=lambda p: p[0].slot):
        entries += part
        owners += [seq if want else None for *_, want in part]
    return entries, owners


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
        self.peers = peers if peers is not None else [self]
        self.fuse = fuse
        self._queue = WaitList(default_max_queue(n_seq) if max_queue is None else max_queue)
        self._n_threads = engine.n_threads  # what the context was created with
        self._ctx = engine.batch_context(n_seq, unified=kv_unified)
        self.chunk = max(1, min(chunk or self._ctx.capacity, self._ctx.capacity))
        self._fusion = engine.fusion_cache(capacity=max(4, n_seq))
        self._adapters = BatchAdapters(engine.adapters, self._ctx, self._fusion, fuse, engine.control_vectors)
        self._running: list[Sequence] = []
        self._slots = Slots(n_seq)
        self._turns = Turns(self.quantum)
        self._steps = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="avgguf-batcher")
        self._thread.start()

    # -- the request side (any thread) ----------------------------------------------------------

    def submit(self, req: BatchRequest) -> None:
        """Queue a request; BusyError when `max_queue` requests already wait for a sequence, or after close
        (nothing has been emitted then). The stop strings are compiled here, on the caller's thread."""
        if req.stops is None:
            req.stops = StopMatcher(req.sampling.stop)
        self._queue.add(req, full=len(self._running) >= self.n_seq)

    def cancel_all(self) -> int:
        """Shutdown: every request waiting or running ends with finish "cancelled" within one decode step
        (returns at once; later requests are served as usual). How many were asked to stop."""
        return self._queue.cancel_all([s.req for s in self._running])

    @property
    def max_queue(self) -> int:
        return self._queue.max_queue

    @property
    def keys(self) -> dict[Key, int]:
        """Requests per coefficient set, waiting or running."""
        return self._queue.keys

    @property
    def load(self) -> int:
        """Requests waiting or running."""
        return sum(self.keys.values())

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def native_id(self) -> int | None:
        """The scheduler thread's OS id: its CPU priority is the one decoding runs at."""
        return self._thread.native_id

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
        self._queue.close()
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
        while self._queue.wait_for_work(bool(self._running)):
            try:
                self._admit()
                self._step()
            except Exception as exc:
                log.exception("batch step failed")
                self._fail(exc)
        for seq in self._running:
            seq.finish("cancelled")
        self._queue.drain()

    def _admit(self) -> None:
        """Waiting requests take the free sequence slots (between steps)."""
        while self._slots and (req := self._queue.pop()) is not None:
            if req.cancelled.is_set():
                req.emit(Event("done", finish="cancelled"))
                continue
            fused = self._adapters.start(req.key, [s.fused for s in self._running if s.fused is not None])
            slot, kept = self._slots.take(req.tokens, (req.key, fused is not None))
            if not self._ctx.forget(slot, kept):  # a recurrent/hybrid model cannot cut a sequence: start afresh
                self._ctx.forget(slot)
                kept = 0
            try:
                self._running.append(Sequence(req, slot, kept, self.engine, fused))
            except Exception as exc:  # noqa: BLE001 (this request hears why; the others go on)
                req.emit(Event("error", text=str(exc)))
                self._slots.release(slot)

    def _step(self) -> None:
        self._drop_cancelled()
        if not self._running:
            return
        group = self._turns.next({s.group for s in self._running})
        members = [s for s in self._running if s.group == group]
        self._adapters.use(group, members[0].fused)  # every member of a fused group has the set's one adapter
        entries, owners = step_entries(members, self._ctx.capacity, self.chunk)
        self._steps += 1
        if self._steps % ADAPT_EVERY == 0 or len(self.peers) > 1:  # peers start and stop: check every step
            self._adapt_threads()
        self._ctx.decode(entries)
        for index, seq in enumerate(owners):
            if seq is not None:
                self._sample(seq, index)

    def _adapt_threads(self) -> None:
        """The engine's thread count, split between the peers with work."""
        busy = sum(1 for b in self.peers if b.load) or 1
        n = max(1, self.engine.adapt_threads() // busy)
        if n != self._n_threads:
            self._ctx.set_threads(n)
            self._n_threads = n

    def _sample(self, seq: Sequence, index: int) -> None:
        token = seq.sampler.sample(self._ctx.ctx, index)
        logits = self._ctx.logits(index) if seq.req.sampling.logprobs is not None else None
        reason = seq.accept(token, logits)
        if reason is not None:
            self._end(seq, reason)

    def _end(self, seq: Sequence, reason: str) -> None:
        seq.finish(reason)
        self._running.remove(seq)
        self._slots.release(seq.slot, seq.group, seq.cached)

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave before every step: running ones free their sequence, waiting ones the
        wait list."""
        for seq in [s for s in self._running if s.req.cancelled.is_set()]:
            self._end(seq, "cancelled")
        self._queue.drop_cancelled()

    def _fail(self, exc: Exception) -> None:
        """A step that failed ends the sequences of its group with an error; their slots start afresh."""
        for seq in [s for s in self._running if s.group == self._turns.current]:
            seq.req.emit(Event("error", text=str(exc)))
            seq.sampler.close()
            self._running.remove(seq)
            self._ctx.forget(seq.slot)
            self._slots.release(seq.slot)
        self._turns.current = None
        self._adapters.forget()
