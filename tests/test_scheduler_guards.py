"""Issue 20 (audit findings 6, 7, 8, 11, 13, 14, 23), the scheduler's side: one client's stop strings or new
coefficient set never stalls the others, a cancelled request ends within one decode step wherever it is, the
wait list is finite, a fused build that fails (a full /dev/shm) falls back to the separate adapters with the
same answers, scratch carries the pid and a dead process's is removed at start, a merge is refused where
disk or memory is short, and shutdown neither blocks without bound nor frees what a thread still uses.

Real llama.cpp on the tiny synthetic model (tests/conftest.py tiny_kit). Timing is never measured: the
scheduler's steps are counted by a spy on its context, and slow work is a build or bake hook that blocks
until the test releases it."""

from __future__ import annotations

import errno
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from avgguf.runtime import fused as fusion, merged as hot, scratch
import avgguf.export.bake
from avgguf.runtime.batching import DEFAULT_MAX_QUEUE, BatchRequest, Batcher, BusyError, Sampling, StopMatcher, default_max_queue
from avgguf.config.modelfile import load_modelfile
from avgguf.runtime.session import GenerationRequest, Runtime

MIXED = "mixed"  # the tiny modelfile's profile with two AVs (medical 0.5, legal -1.0): fused when built


@pytest.fixture(autouse=True)
def private_scratch(tmp_path, monkeypatch):
    """Scratch of these tests in their own directories (never the machine's /dev/shm or ~/.cache)."""
    shm, cache = tmp_path / "shm", tmp_path / "cache"
    shm.mkdir()
    monkeypatch.setattr(fusion, "SHM_DIR", shm)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return shm, cache / "avgguf"


def tokens_of(rt, text: str) -> list[int]:
    return rt.engine.tokenize(rt.engine.format_chat(rt.with_system([{"role": "user", "content": text}])))


def key_of(rt, profile: str | None) -> tuple:
    return rt.engine.coefficient_key(rt.modelfile.resolver.resolve(profile))


class Spy:
    """Wraps a batcher's context: numbers its decode steps, records which sequences each step evaluated and
    under how many adapters (1: the fused one; 2: the separate AVs), and runs `at[step]` on the scheduler
    thread just before that step decodes (deterministic: no clock involved)."""

    def __init__(self, batcher: Batcher):
        self.steps, self.pairs, self.log, self.at = 0, 0, [], {}
        ctx = batcher._ctx
        self._decode, self._set = ctx.decode, ctx.set_adapters
        ctx.decode, ctx.set_adapters = self.decode, self.set_adapters

    def set_adapters(self, pairs):
        self.pairs = len(pairs)
        self._set(pairs)

    def decode(self, entries):
        self.steps += 1
        self.log.append((self.steps, self.pairs, {seq for _, _, seq, _ in entries}))
        hook = self.at.pop(self.steps, None)
        if hook is not None:
            hook()
        self._decode(entries)

    def pairs_of(self, slot: int) -> set[int]:
        """The adapter counts of every step that evaluated `slot`."""
        return {pairs for _, pairs, slots in self.log if slot in slots}


class Answer:
    """One request's events, each stamped with the step count when the scheduler emitted it."""

    def __init__(self, spy: Spy | None, rt, text: str, profile: str | None, max_tokens: int = 12, **kw):
        self.spy, self.events, self.stamped = spy, queue.Queue(), []
        self.batcher, self.seq_slot = None, None
        kw.setdefault("temperature", 0.0)
        self.req = BatchRequest(
            tokens_of(rt, text), key_of(rt, profile), Sampling(max_tokens=max_tokens, repeat_penalty=1.1, **kw), self._emit
        )

    def _emit(self, ev):  # the scheduler thread
        if self.seq_slot is None and self.batcher is not None:
            self.seq_slot = next((s.slot for s in self.batcher._running if s.req is self.req), None)
        self.stamped.append((self.spy.steps if self.spy else 0, ev))
        self.events.put(ev)

    def submit(self, batcher: Batcher) -> Answer:
        self.batcher = batcher
        batcher.submit(self.req)
        return self

    @property
    def pieces(self) -> int:
        return sum(1 for _, ev in self.stamped if ev.kind == "piece")

    def result(self, timeout: float = 60):
        parts = []
        while (ev := self.events.get(timeout=timeout)).kind == "piece":
            parts.append(ev.text)
        return "".join(parts), ev

    @property
    def end_step(self) -> int:
        return next(step for step, ev in self.stamped if ev.kind != "piece")


def runtime_answer(tiny_kit, text: str, profile: str | None, max_tokens: int, fuse: str) -> str:
    """The one-request path's answer (llama-cpp-python's own loop): the separate adapters with fuse="off"."""
    root, *_ = tiny_kit
    mf = load_modelfile(root / "tiny.yaml")
    runtime = Runtime(mf, fuse=fuse)
    try:
        req = GenerationRequest(
            messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.1
        )
        return runtime.chat(req, mf.resolver.resolve(profile), reuse_prefix=False)["choices"][0]["message"]["content"]
    finally:
        runtime.close()


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- stop strings (finding 6) ------------------------------------------------------------------------------


def reference_stop(pending: str, piece: str, stops: list[str]) -> tuple[int, int]:
    """The scan the scheduler used to run per token: every stop searched in the held-back text plus the new
    piece, then every prefix of every stop tried at its end."""
    text = pending + piece
    cut = min((i for i in (text.find(x) for x in stops if x) if i >= 0), default=-1)
    hold = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
    return cut, hold


STOP_CASES = [
    (["world"], ["hello wor", "ld!"]),  # a stop split over two pieces
    (["abcd", "bc"], ["ab", "cd"]),  # a longer stop that starts earlier wins
    (["abcd", "bc"], ["abcd"]),  # both in one piece: the earliest start
    (["ab", "b!"], ["a", "b", "!"]),  # overlapping prefixes held back, then released
    (["aaa"], ["aa", "aa"]),  # self-overlapping stop
    (["<|im_end|>"], ["<|im", "_", "end|>x"]),  # special-token text
    (["\u00e9t\u00e9"], ["\u00e9", "t\u00e9"]),  # non-ASCII characters
    (["xyz"], ["no", " stop", " here"]),  # never found: nothing held
    (["", "b"], ["ab"]),  # an empty stop string is ignored
]


@pytest.mark.parametrize("stops,pieces", STOP_CASES)
def test_stop_matcher_agrees_with_the_full_scan(stops, pieces):
    matcher, pending = StopMatcher(stops), ""
    for piece in pieces:
        want_cut, want_hold = reference_stop(pending, piece, stops)
        cut = matcher.feed(piece, len(pending))
        assert cut == want_cut
        if cut >= 0:
            return
        assert matcher.held == want_hold
        text = pending + piece
        pending = text[len(text) - want_hold :] if want_hold else ""


def test_stop_matcher_agrees_with_the_full_scan_on_random_text():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 5))]
        matcher, pending = StopMatcher(stops), ""
        for _ in range(12):
            piece = "".join(rng.choices("abcd", k=rng.randint(0, 4)))
            want_cut, want_hold = reference_stop(pending, piece, stops)
            cut = matcher.feed(piece, len(pending))
            assert cut == want_cut, (stops, pending, piece)
            if cut >= 0:
                break
            assert matcher.held == want_hold, (stops, pending, piece)
            text = pending + piece
            pending = text[len(text) - want_hold :] if want_hold else ""


def test_stop_work_per_character_does_not_grow_with_the_stop_strings():
    """Transitions are counted, not time: 16 stops of 64 characters and 2000 cost the same per character."""
    counts = {}
    for n in (16, 2000):
        rng = random.Random(n)
        matcher = StopMatcher(["".join(rng.choices("abcdefgh ", k=63)) + "z" for _ in range(n)])
        calls = 0
        step = matcher._step

        def counted(state, code):
            nonlocal calls
            calls += 1
            return step(state, code)

        matcher._step = counted
        text = "".join(rng.choices("abcdefgh ", k=4000))
        for i in range(0, len(text), 4):
            assert matcher.feed(text[i : i + 4], 0) == -1
        counts[n] = calls / len(text)
    assert counts[16] == counts[2000] == 1.0  # one transition per character


# --- cancel, queue (finding 7) -----------------------------------------------------------------------------


def test_a_cancelled_request_leaves_the_wait_list_within_one_step(rt):
    batcher = Batcher(rt.engine, n_seq=1)
    spy = Spy(batcher)
    try:
        running = Answer(spy, rt, "another answer", None, max_tokens=40)  # greedy: 40 tokens, no EOS
        batcher.submit(running.req)
        waiting = Answer(spy, rt, "queued behind it", None)
        spy.at[4] = waiting.req.cancelled.set  # the cancel lands during step 4
        batcher.submit(waiting.req)
        text, done = waiting.result()
        assert done.finish == "cancelled" and text == ""
        assert waiting.end_step <= 5  # before: only once the running answer had ended (step 40)
        assert all(ev.kind == "piece" for _, ev in running.stamped) and batcher.waiting == 0  # still running
        _, end = running.result()
        assert end.finish == "length" and end.tokens == 40
    finally:
        batcher.close()


def test_a_cancelled_prompt_stops_between_prefill_chunks(rt):
    batcher = Batcher(rt.engine, n_seq=2, chunk=4)
    spy = Spy(batcher)
    try:
        long = Answer(spy, rt, "a prompt long enough for many prefill chunks of four tokens each", None)
        n = len(long.req.tokens)
        assert n > 20
        spy.at[2] = long.req.cancelled.set  # set while the second chunk evaluates
        batcher.submit(long.req)
        _, done = long.result()
        assert done.finish == "cancelled" and done.tokens == 0
        assert spy.steps <= 3 and long.end_step <= 3  # ceil(n / 4) steps to go otherwise
        assert all(len(slots) == 1 for _, _, slots in spy.log)
    finally:
        batcher.close()


def test_a_cancelled_answer_stops_within_one_step(rt):
    batcher = Batcher(rt.engine, n_seq=2)
    spy = Spy(batcher)
    try:
        other = Answer(spy, rt, "another answer", MIXED, max_tokens=30)
        victim = Answer(spy, rt, "an answer to cut", None, max_tokens=30)
        batcher.submit(other.req)
        batcher.submit(victim.req)
        wait_until(lambda: victim.pieces >= 5, "five pieces")
        victim.req.cancelled.set()
        at = spy.steps
        _, done = victim.result()
        assert done.finish == "cancelled" and victim.end_step <= at + 1
        assert other.result()[1].finish == "length"  # the other request goes on
    finally:
        batcher.close()


def test_cancel_all_ends_every_request_within_one_step(rt):
    batcher = Batcher(rt.engine, n_seq=2)
    spy = Spy(batcher)
    try:
        answers = [Answer(spy, rt, f"question {i}", MIXED if i % 2 else None, max_tokens=60) for i in range(5)]
        for a in answers:
            batcher.submit(a.req)
        wait_until(lambda: spy.steps >= 3, "three steps")
        at = spy.steps
        assert batcher.cancel_all() == 5
        for a in answers:
            assert a.result()[1].finish == "cancelled"
        assert max(a.end_step for a in answers) <= at + 1 and batcher.load == 0
        later = Answer(spy, rt, "after", None, max_tokens=3)  # and the batcher still serves
        batcher.submit(later.req)
        assert later.result()[1].kind == "done"
    finally:
        batcher.close()


def test_the_wait_list_is_finite_by_default_and_refuses_before_any_event(rt):
    inside, release = threading.Event(), threading.Event()
    batcher = Batcher(rt.engine, n_seq=1)
    spy = Spy(batcher)
    spy.at[1] = lambda: (inside.set(), release.wait(60))  # the first step holds: the wait list only grows
    try:
        answers = [Answer(spy, rt, "hold", None, max_tokens=2) for _ in range(1 + default_max_queue(1))]
        batcher.submit(answers[0].req)
        assert inside.wait(60)
        for a in answers[1:]:
            batcher.submit(a.req)
        refused = Answer(spy, rt, "one too many", None)
        with pytest.raises(BusyError, match="--max-queue 4"):
            batcher.submit(refused.req)
        assert refused.stamped == []
        release.set()
        assert all(a.result()[1].kind == "done" for a in answers)
    finally:
        release.set()
        batcher.close()
    with pytest.raises(BusyError, match="shutting down"):
        batcher.submit(Answer(None, rt, "late", None).req)
    assert default_max_queue(4) == DEFAULT_MAX_QUEUE == 16  # the server's default (--parallel 4)


# --- fused builds off the scheduler thread (findings 6, 14) ------------------------------------------------


class SlowBuild:
    """avgguf.gguf.fuse.write_fused, held until released: how a multi-second build looks to the scheduler."""

    def __init__(self, monkeypatch, fail: OSError | None = None):
        self.entered, self.release, self.fail, self.calls = threading.Event(), threading.Event(), fail, 0
        self._real = fusion.write_fused
        monkeypatch.setattr(fusion, "write_fused", self)

    def __call__(self, *args, **kw):
        self.calls += 1
        self.entered.set()
        self.release.wait(60)
        if self.fail is not None:
            raise self.fail
        return self._real(*args, **kw)


def test_a_new_fused_set_does_not_stall_another_sets_decoding(rt, tiny_kit, monkeypatch):
    build = SlowBuild(monkeypatch)
    batcher = Batcher(rt.engine, n_seq=2)
    spy = Spy(batcher)
    try:
        other = Answer(spy, rt, "a long answer please", "expert-medical", max_tokens=40).submit(batcher)
        new = Answer(spy, rt, "a new set", MIXED, max_tokens=12).submit(batcher)
        assert build.entered.wait(60)
        # the build is held: both sequences still decode (before: the scheduler waited inside the build)
        wait_until(lambda: other.pieces >= 10 and new.pieces >= 5, "tokens while the fused build is held")
        text, done = new.result()
        assert not build.release.is_set() and done.finish == "length"  # the whole answer during the build
        assert spy.pairs_of(new.seq_slot) == {2}  # on the separate adapters
        build.release.set()
        assert other.result()[1].finish == "length"
    finally:
        build.release.set()
        batcher.close()
    assert text == runtime_answer(tiny_kit, "a new set", MIXED, 12, fuse="off")[: len(text)]


def test_a_set_switches_to_its_fused_adapter_only_at_a_request_boundary(rt, monkeypatch):
    """A sequence that began on the separate adapters ends on them; one admitted after the build runs on the
    fused adapter from its first token; both give the same tokens and log-probabilities (the same sum), and
    the prompt cache is reused only under the same variant."""
    build = SlowBuild(monkeypatch)
    batcher = Batcher(rt.engine, n_seq=2)
    spy = Spy(batcher)
    held, gate = threading.Event(), threading.Event()
    spy.at[5] = lambda: (held.set(), gate.wait(60))  # the first answer pauses at step 5 (mid-answer)
    question = "the same question"
    try:
        first = Answer(spy, rt, question, MIXED, max_tokens=30, logprobs=3).submit(batcher)
        assert build.entered.wait(60) and held.wait(60)
        build.release.set()
        assert batcher.wait_fused(60)  # built while the first answer is under way
        second = Answer(spy, rt, question, MIXED, max_tokens=30, logprobs=3).submit(batcher)
        gate.set()
        a, done_a = first.result()
        b, done_b = second.result()
        third = Answer(spy, rt, question, MIXED, max_tokens=30, logprobs=3).submit(batcher)
        c, done_c = third.result()
    finally:
        build.release.set()
        gate.set()
        batcher.close()
    assert first.seq_slot != second.seq_slot

    def adapters_during(ans: Answer) -> list[int]:  # adapters set at each step that evaluated this answer
        return [pairs for step, pairs, slots in spy.log if ans.seq_slot in slots and step <= ans.end_step]

    assert set(adapters_during(first)) == {2}  # the separate adapters throughout, even once fused was ready
    assert set(adapters_during(second)) == {1}  # the fused adapter from the first prompt token on
    assert done_a.evaluated == done_b.evaluated == len(second.req.tokens)
    assert third.seq_slot == second.seq_slot and done_c.evaluated == 1  # the fused K/V, not the separate one
    assert a == b == c and done_a.finish == done_b.finish

    def lps(ans):
        return [e["logprob"] for _, ev in ans.stamped if ev.logprobs for e in ev.logprobs]

    assert len(lps(first)) == done_a.tokens
    assert max(abs(x - y) for x, y in zip(lps(first), lps(second))) < 1e-3  # the f16 K/V cache's rounding


def test_a_failed_fused_build_serves_the_separate_adapters_with_the_same_tokens(rt, tiny_kit, monkeypatch, caplog):
    build = SlowBuild(monkeypatch, fail=OSError(errno.ENOSPC, "No space left on device"))
    build.release.set()
    batcher = Batcher(rt.engine, n_seq=2)
    try:
        answers = [Answer(None, rt, t, MIXED, max_tokens=12) for t in ("first words", "second words")]
        batcher.submit(answers[0].req)
        got0 = answers[0].result()
        assert got0[1].kind == "done"  # before: "error" ([Errno 28] No space left on device)
        batcher.wait_fused(60)
        batcher.submit(answers[1].req)  # after the failure: straight to the separate adapters, no retry
        got1 = answers[1].result()
    finally:
        batcher.close()
    assert [ev.kind for _, ev in (got0, got1)] == ["done", "done"]  # before: "error" ([Errno 28] ...)
    for (text, _), question in zip((got0, got1), ("first words", "second words")):
        assert text == runtime_answer(tiny_kit, question, MIXED, 12, fuse="off")[: len(text)] and text
    assert "separate adapters serve it" in caplog.text
    assert build.calls == 2  # /dev/shm, then the user cache dir; then no retry for RETRY_AFTER seconds


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real, nearly full directory: a 64 KiB tmpfs (needs root and mount; else the test is skipped, the
    ENOSPC case above covers the fallback)."""
    mounted = []

    def make(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        try:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], check=True, capture_output=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            pytest.skip("cannot mount a tmpfs here (not root?)")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


def test_a_full_dev_shm_builds_in_the_user_cache_dir(rt, tiny_kit, tiny_tmpfs, private_scratch, monkeypatch):
    shm = tiny_tmpfs("shm-full")
    monkeypatch.setattr(fusion, "SHM_DIR", shm)
    batcher = Batcher(rt.engine, n_seq=2)
    spy = Spy(batcher)
    try:
        warm = Answer(spy, rt, "warm up", MIXED)
        batcher.submit(warm.req)
        warm.result()
        assert batcher.wait_fused(60)
        ans = Answer(spy, rt, "after the build", MIXED)
        batcher.submit(ans.req)
        text, done = ans.result()
        dirs = batcher._fusion.directories
    finally:
        batcher.close()
    assert [d.parent for d in dirs] == [private_scratch[1]] and not list(shm.iterdir())
    assert spy.pairs == 1 and done.finish in ("length", "stop")  # served fused, from the cache dir
    assert text == runtime_answer(tiny_kit, "after the build", MIXED, 12, fuse="off")[: len(text)]


def test_real_enospc_everywhere_falls_back_to_the_separate_adapters(rt, tiny_kit, tiny_tmpfs, monkeypatch):
    """Both places full for real (the free-space probe fooled, so the writer itself hits ENOSPC)."""
    shm = tiny_tmpfs("shm-tiny")
    cache = tiny_tmpfs("cache-tiny")
    monkeypatch.setattr(fusion, "SHM_DIR", shm)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(fusion, "free_bytes", lambda path: 1 << 40)
    batcher = Batcher(rt.engine, n_seq=2)
    spy = Spy(batcher)
    try:
        first = Answer(spy, rt, "full disks", MIXED)
        batcher.submit(first.req)
        first.result()
        assert batcher.wait_fused(60)
        second = Answer(spy, rt, "full disks", MIXED)
        batcher.submit(second.req)
        text, done = second.result()
        failure = batcher._fusion.failed(second.req.key)
    finally:
        batcher.close()
    assert isinstance(failure, Exception) and str(shm) in str(failure) and str(cache) in str(failure)
    assert done.kind == "done" and spy.pairs == 2  # the separate adapters
    assert text == runtime_answer(tiny_kit, "full disks", MIXED, 12, fuse="off")[: len(text)]


# --- scratch: pid in the name, stale removed at start (findings 8, 23) -------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_scratch_names_carry_the_pid_and_dead_processes_scratch_is_removed_at_start(rt, tiny_kit, private_scratch, monkeypatch):
    shm, cache = private_scratch
    monkeypatch.setattr(scratch, "_cleaned", set())  # "at start": as in a fresh process
    root, p, _ = tiny_kit
    cache.mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = dead_pid()
    try:
        stale = [
            shm / f"avgguf-fused-{dead}-abcd1234",
            cache / f"avgguf-merged-{dead}-abcd_123",
            p.base_gguf.parent / f".avgguf-merged-{dead}-zz9_zz9z",
        ]
        kept = [
            shm / f"avgguf-fused-{alive.pid}-abcd1234",
            shm / "avgguf-fused-oldname1",
            p.base_gguf.parent / f"avgguf-merged-{dead}-notours1",
        ]  # no dot beside a model: not ours
        for d in stale + kept:
            d.mkdir()
            (d / "merged-f32.gguf").write_bytes(b"x" * 100)
        batcher = Batcher(rt.engine, n_seq=1)
        sets = hot.MergedSets(p.base_gguf, {"medical": root / "medical.gguf"}, lambda path: None)
        try:
            assert not any(d.exists() for d in stale) and all(d.exists() for d in kept)
            ans = Answer(None, rt, "build one", MIXED)
            batcher.submit(ans.req)
            ans.result()
            assert batcher.wait_fused(60)
            names = [d.name for d in batcher._fusion.directories]
        finally:
            batcher.close()
            sets.close()
        assert names and all(n.startswith(f"avgguf-fused-{os.getpid()}-") for n in names)
        assert not any(shm.glob(f"avgguf-fused-{os.getpid()}-*"))  # and close removed it
    finally:
        alive.kill()
        alive.wait()
        for d in kept:
            subprocess.run(["rm", "-rf", str(d)], check=False)


# --- merges only where disk and memory allow (finding 13) --------------------------------------------------


class Item:
    def __init__(self, path: Path):
        self.path = path

    def close(self):
        pass


def test_a_merge_is_refused_when_memory_or_disk_is_short(tiny_kit, monkeypatch, caplog):
    root, p, _ = tiny_kit
    key = (("medical", 1.0),)
    monkeypatch.setattr(hot, "available_ram", lambda: 10 << 20)  # 10 MB free
    sets = hot.MergedSets(p.base_gguf, {"medical": root / "medical.gguf"}, Item)
    try:
        sets.request(key)
        sets.wait(60)
        assert sets.take(key) is None  # before: merged anyway
        assert "memory" in (sets.refusal or "") and "stays on adapters" in caplog.text
        monkeypatch.setattr(hot, "available_ram", lambda: 1 << 40)
        monkeypatch.setattr(hot, "free_disk", lambda path: 1000)
        monkeypatch.setattr(hot.MergedSets, "RETRY_AFTER", 0.0)
        sets.request(key)
        sets.wait(60)
        assert sets.take(key) is None and "disk" in sets.refusal
        monkeypatch.setattr(hot, "free_disk", fusion.free_bytes)
        sets.request(key)  # room again: it merges
        sets.wait(120)
        assert isinstance(sets.take(key), Item)
    finally:
        sets.close()


def test_merge_scratch_is_never_on_a_ram_file_system(tiny_kit, tiny_tmpfs, monkeypatch):
    root, p, _ = tiny_kit
    monkeypatch.setenv("XDG_CACHE_HOME", str(tiny_tmpfs("cache-in-ram")))
    made = []
    real = hot.make_scratch
    monkeypatch.setattr(
        hot, "make_scratch", lambda kind, parent, hidden=False: made.append((parent, hidden)) or real(kind, parent, hidden)
    )
    sets = hot.MergedSets(p.base_gguf, {"medical": root / "medical.gguf"}, Item)
    try:
        sets.request((("medical", 1.0),))
        sets.wait(120)
        assert isinstance(sets.take((("medical", 1.0),)), Item)
    finally:
        sets.close()
    assert made == [(p.base_gguf.parent, True)]  # beside the model, hidden; not the tmpfs cache dir
    assert not list(p.base_gguf.parent.glob(".avgguf-merged-*"))  # removed after the bake


# --- shutdown and eviction never block without bound (findings 11, 23) ------------------------------------


def test_close_is_bounded_and_never_frees_a_context_in_use(rt):
    batcher = Batcher(rt.engine, n_seq=1)
    spy = Spy(batcher)
    inside, release = threading.Event(), threading.Event()
    spy.at[2] = lambda: (inside.set(), release.wait(60))  # a step that takes "forever" (a huge prefill)
    ans = Answer(spy, rt, "stuck", None, max_tokens=8)
    batcher.submit(ans.req)
    assert inside.wait(60)
    ctx = batcher._ctx
    try:
        assert batcher.close(timeout=0.2) is False  # before: joined 30 s, then freed the context under it
        assert ctx._ctx is not None  # leaked, not freed
    finally:
        release.set()
    batcher._thread.join(60)
    assert ans.result()[1].finish == "cancelled"
    ctx.close()  # the test's own cleanup, now that no thread uses it


def test_closing_merged_sets_leaves_a_running_quantize_its_directory(tiny_kit, monkeypatch):

    root, p, _ = tiny_kit
    inside, release, dirs = threading.Event(), threading.Event(), []

    def quantizing(bake, out, **kw):  # an uninterruptible llama_model_quantize writing into the scratch dir
        dirs.append(out.parent)
        (out.parent / "merged-f32.gguf").write_bytes(b"partial")
        inside.set()
        release.wait(60)
        raise RuntimeError("quantizer stopped")

    monkeypatch.setattr(avgguf.export.bake, "baked_gguf", quantizing)
    sets = hot.MergedSets(p.base_gguf, {"medical": root / "medical.gguf"}, Item)
    sets.request((("medical", 1.0),))
    assert inside.wait(60)
    assert sets.close(timeout=0.2) is False  # before: waited 120 s, then rmtree under the quantizer
    assert (dirs[0] / "merged-f32.gguf").exists()  # still there for the quantizer
    release.set()
    assert sets.wait(60)
    assert not dirs[0].exists()  # the worker removed it once the quantizer returned


def test_evicting_a_merged_set_does_not_wait_for_its_close(tiny_kit):
    root, p, _ = tiny_kit
    release = threading.Event()

    class Slow(Item):
        closed = threading.Event()

        def close(self):
            release.wait(60)  # a batcher join, an engine free
            Slow.closed.set()

    sets = hot.MergedSets(p.base_gguf, {"medical": root / "medical.gguf", "legal": root / "legal.gguf"}, Slow)
    one, two = (("medical", 1.0),), (("legal", 0.5),)
    try:
        sets.request(one)
        sets.wait(120)
        assert sets.take(one) is not None
        sets.request(two)
        sets.wait(120)
        result = []
        taker = threading.Thread(target=lambda: result.append(sets.take(two)))  # capacity 1: evicts `one`
        taker.start()
        taker.join(10)
        assert not taker.is_alive() and isinstance(result[0], Slow)  # before: blocked in the victim's close
        assert not Slow.closed.is_set()
    finally:
        release.set()
        sets.close()
    assert Slow.closed.is_set()
