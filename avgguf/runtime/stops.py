"""Stop strings: the one rule for where an answer ends and what of its tail is held back, as the text
streams (continuous batching and PAD alike)."""

from __future__ import annotations

from collections import deque


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not sent yet)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


class StopMatcher:
    """The stop strings of one answer as an Aho-Corasick automaton over characters, fed as the text streams:
    each character costs one transition (amortized), whatever the number and length of the stop strings.

    The state is the longest tail of the text so far that begins some stop string: its length is what must
    be held back (held_back, without rescanning). Empty stop strings are ignored."""

    def __init__(self, stops: list[str]):
        stops = [s for s in dict.fromkeys(stops) if s]
        self._goto: dict[int, int] = {}  # state << 21 | code point -> state (code points < 2**21)
        self._depth, self._out = [0], [0]  # per state: its length; the longest stop string ending there
        children: list[list[tuple[int, int]]] = [[]]
        for stop in stops:
            state = 0
            for ch in stop:
                edge = state << 21 | ord(ch)
                nxt = self._goto.get(edge)
                if nxt is None:
                    nxt = self._goto[edge] = len(self._depth)
                    self._depth.append(self._depth[state] + 1)
                    self._out.append(0)
                    children.append([])
                    children[state].append((ord(ch), nxt))
                state = nxt
            self._out[state] = len(stop)
        self._fail = [0] * len(self._depth)
        queue = deque(nxt for _, nxt in children[0])
        while queue:  # breadth first: a state's fallback is shallower, so already complete
            state = queue.popleft()
            self._out[state] = max(self._out[state], self._out[self._fail[state]])
            for code, nxt in children[state]:
                if state:
                    self._fail[nxt] = self._step(self._fail[state], code)
                queue.append(nxt)
        self.state = 0
        self.active = bool(stops)

    def _step(self, state: int, code: int) -> int:
        goto, fail = self._goto, self._fail
        while True:
            nxt = goto.get(state << 21 | code)
            if nxt is not None:
                return nxt
            if not state:
                return 0
            state = fail[state]

    def feed(self, piece: str, offset: int) -> int:
        """Advance over `piece`, the new text after `offset` held-back characters; the earliest start (in
        held-back + piece) of a stop string ending in it, or -1."""
        cut = -1
        state, out = self.state, self._out
        for i, ch in enumerate(piece):
            state = self._step(state, ord(ch))
            if out[state]:
                start = offset + i + 1 - out[state]
                cut = start if cut < 0 else min(cut, start)
        self.state = state
        return cut

    @property
    def held(self) -> int:
        """How many trailing characters may begin a stop string (not sent yet)."""
        return self._depth[self.state]
