"""Work built in the background for a coefficient set, the one way: fused adapters (avgguf.runtime.fused) and
merged sets (avgguf.runtime.merged) both use it.

- `Worker`: one thread that builds what was asked for, latest request first. A wish either replaces every
  older one (an engine's knobs: only the latest set counts, and a build under way for another set sees
  `stopped(key)` and stops at its next tensor) or queues behind them, up to a bound.
- `niced`: the heavy part of a build runs on a thread of its own at the lowest CPU priority, so it never
  competes with decoding (OpenMP's busy-waiting decode threads stall whenever another runnable thread takes
  one of their cores); what the worker does after it (loading a model) keeps the normal priority.
- `Lru`: what was built, least recently used first, with the eviction rule both caches follow.
- `Failures`: sets whose build failed, not retried for a while (or never).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
Key = tuple[tuple[str, float], ...]  # a coefficient set: (name, value) of the non-zero AVs, sorted
T = TypeVar("T")
LOWEST = 19  # the nice value of a build: only the cores decoding leaves


class Worker:
    """One background thread running `build(key)` for the wished-for sets, the oldest wish first; `done(key)`
    says a wish needs no build any more (already built). At most `limit` wishes wait: a queued wish beyond
    that drops the oldest one not being built (with limit 1: it is ignored while another set is wanted)."""

    def __init__(self, build: Callable[[Key], None], done: Callable[[Key], bool], name: str, limit: int = 1):
        self._build, self._done, self._name = build, done, name
        self.limit = limit
        self._lock = threading.Lock()
        self._wanted: dict[Key, None] = {}  # wishes, oldest first; the thread builds the first one
        self._current: Key | None = None
        self._thread: threading.Thread | None = None
        self.closed = False

    def request(self, key: Key, replace: bool = True) -> None:
        """Wish for this set: `replace` drops every older wish, else it queues behind them."""
        with self._lock:
            if self.closed:
                return
            if replace:
                self._wanted = {key: None}
            else:
                self._wanted.setdefault(key, None)
                while len(self._wanted) > max(1, self.limit):
                    del self._wanted[list(self._wanted)[1]]  # the first one may be building
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._thread.start()

    def stopped(self, key: Key) -> bool:
        """Whether a build for this set should stop now (closed, or no longer wished for)."""
        return self.closed or key not in self._wanted

    @property
    def current(self) -> Key | None:
        """The set being built now, if any."""
        with self._lock:
            return self._current

    def cancel(self) -> None:
        """Drop every wish: a build in progress stops at its next check."""
        with self._lock:
            self._wanted = {}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the thread (benchmarks, tests, shutdown); whether it is done."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def close(self, timeout: float | None = None) -> bool:
        """No more builds (one under way sees `stopped`); waits up to `timeout` s; whether the thread ended."""
        with self._lock:
            self.closed = True
            self._wanted = {}
        return self.wait(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                for done in [k for k in self._wanted if self._done(k)]:
                    del self._wanted[done]
                key = next(iter(self._wanted), None)
                if key is None or self.closed:
                    self._thread = None
                    return
                self._current = key
            try:
                self._build(key)
            except Exception:  # noqa: BLE001 (a build records its own failures; this thread must go on)
                log.exception("a background build for %s failed", dict(key))
            with self._lock:
                self._current = None
                self._wanted.pop(key, None)


def set_nice(nice: int) -> None:
    """This thread's CPU priority (the threads it starts inherit it, llama.cpp's quantizer threads too)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


def niced(work: Callable[[], T], nice: int = LOWEST, name: str = "avgguf-niced") -> T:
    """`work()` on a thread of its own at CPU priority `nice`; its result, or its exception re-raised here."""
    result: list = []
    failure: list[BaseException] = []

    def run() -> None:
        set_nice(nice)
        try:
            result.append(work())
        except BaseException as exc:  # noqa: BLE001 (re-raised on the calling thread)
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=name)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class Lru(Generic[T]):
    """Items per coefficient set, least recently used first (insertion order is recency). Every call is
    atomic (a worker adds while callers take)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._items: dict[Key, T] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._items)

    def values(self) -> list[T]:
        with self._lock:
            return list(self._items.values())

    def put(self, key: Key, item: T) -> T:
        """Store (or refresh) as the most recent."""
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = item
            return item

    def use(self, key: Key) -> T | None:
        """The item, now the most recent; None if there is none."""
        with self._lock:
            item = self._items.pop(key, None)
            return None if item is None else self.put(key, item)

    def pop(self, key: Key) -> T | None:
        with self._lock:
            return self._items.pop(key, None)

    def evict(self, keep: int, spare: Callable[[T], bool] = lambda item: False) -> list[T]:
        """Remove the least recently used items, except those `spare` keeps, until at most `keep` are left
        (or only spared ones); the removed items, for the caller to free."""
        with self._lock:
            over = len(self._items) - max(0, keep)
            victims = [k for k, item in self._items.items() if not spare(item)][: max(0, over)]
            return [self._items.pop(k) for k in victims]

    def clear(self) -> list[T]:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
            return items


class Failures:
    """Sets whose build failed and why: retried after `retry_after` s (asked at each check, so a class
    setting changed in a test applies), or never (`permanent`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._failed: dict[Key, tuple[float | None, Exception]] = {}

    def record(self, key: Key, exc: Exception, permanent: bool = False) -> None:
        with self._lock:
            self._failed[key] = (None if permanent else time.monotonic(), exc)

    def get(self, key: Key, retry_after: float) -> Exception | None:
        """Why this set's last build failed, unless that was more than `retry_after` s ago."""
        with self._lock:
            when, exc = self._failed.get(key, (None, None))
            if when is not None and time.monotonic() - when >= retry_after:
                del self._failed[key]
                return None
            return exc
