"""One request in a batching context (avgguf.runtime.batching): what it asks for, what it hears, its sequence
while it decodes, and the sequence slots with the prompt cache they keep."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from avgguf.runtime.background import Key
from avgguf.runtime.sampling import Sampler, Sampling, log_softmax
from avgguf.runtime.stops import StopMatcher
from avgguf.runtime.vocabulary import Vocabulary


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

    def __init__(self, req: BatchRequest, slot: int, kept: int, engine: Vocabulary, fused: object | None = None):
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


def token_logprobs(engine: Vocabulary, logits: np.ndarray, token: int, top: int) -> dict:
    """OpenAI's logprobs entry for one token: its log-probability under the model and the `top` most likely."""
    lp = log_softmax(logits)
    best = np.argpartition(-lp, top)[:top] if top else np.array([], dtype=int)
    best = best[np.argsort(-lp[best])]

    def item(t: int) -> dict:
        raw = engine.detokenize([int(t)])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(lp[t]), "bytes": list(raw)}

    return {**item(token), "top_logprobs": [item(t) for t in best]}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class Slots:
    """A context's sequence ids: the free ones, each with the tokens whose K/V it holds from its last answer
    and the group (set, fused?) they were computed under: a prompt cache, reused only under the same group."""

    def __init__(self, n_seq: int):
        self._free = list(range(n_seq))
        self._cache: dict[int, tuple[tuple, list[int]]] = {}  # free slot -> (its group, tokens its K/V holds)

    def __bool__(self) -> bool:
        """Whether a slot is free."""
        return bool(self._free)

    def take(self, tokens: list[int], group: tuple) -> tuple[int, int]:
        """The free slot whose cached K/V shares the longest prefix with this prompt under the same group (at
        least the last prompt token is evaluated again, for its logits), else the least recently used; and
        how many of its tokens stay valid."""
        best, kept = self._free[0], 0
        for slot in self._free:
            cached, held = self._cache.get(slot, (None, []))
            if cached != group:
                continue
            n = common_prefix(held, tokens[:-1])
            if n > kept:
                best, kept = slot, n
        self._free.remove(best)
        self._cache.pop(best, None)
        return best, kept

    def release(self, slot: int, group: tuple | None = None, cached: list[int] | None = None) -> None:
        """A slot is free again, holding the K/V of `cached` tokens computed under `group` (none: nothing reusable)."""
        if group is not None and cached is not None:
            self._cache[slot] = (group, cached)
        self._free.append(slot)


class Turns:
    """Which group (a coefficient set and its variant) decodes next: groups take turns, `quantum` decode steps
    each (fair between groups; a change of adapters makes llama.cpp rebuild its compute graph, so a group keeps
    the context for a few steps). `current`: the group of the step in progress (None: start a new turn)."""

    def __init__(self, quantum: int):
        self.quantum = quantum
        self.current: tuple | None = None
        self._turn = 0
        self._held = 0  # steps the current group has had in a row

    def next(self, groups: set[tuple]) -> tuple:
        ordered = sorted(groups)
        if self.current in ordered and self._held < self.quantum:
            self._held += 1
            return self.current
        self._turn = (self._turn + 1) % len(ordered)
        self._held = 1
        self.current = ordered[self._turn]
        return self.current
