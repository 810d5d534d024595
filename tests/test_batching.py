"""Issue #13: continuous batching (avgguf.runtime.batching) on real llama.cpp with the tiny synthetic model: concurrent
requests of mixed coefficient sets answer exactly as alone and as the one-request runtime path does, the prompt
cache is reused only under the same set, the wait list is bounded, a cancelled request frees its sequence, and
one failing request does not take the others down."""

from __future__ import annotations

import queue
import time


from avgguf.runtime.batching import BatchRequest, Batcher, BusyError, Sampling, common_prefix, held_back
from avgguf.config.modelfile import load_modelfile
from avgguf.runtime.session import GenerationRequest, Runtime


def submit(batcher, rt, text, profile, max_tokens=10, **kw):
    """Submit one chat request; returns a function that waits for (text, done event)."""
    mf = rt.modelfile
    messages = rt.with_system([{"role": "user", "content": text}])
    tokens = rt.engine.tokenize(rt.engine.format_chat(messages))
    key = rt.engine.coefficient_key(mf.resolver.resolve(profile))
    events: queue.Queue = queue.Queue()
    req = BatchRequest(tokens, key, Sampling(max_tokens=max_tokens, repeat_penalty=1.1, **kw), events.put)
    batcher.submit(req)

    def result(timeout=60):
        parts = []
        while (ev := events.get(timeout=timeout)).kind == "piece":
            parts.append(ev.text)
        return "".join(parts), ev

    result.req = req
    return result


JOBS = [
    ("hello", None),
    ("what is law", "expert-medical"),
    ("tell me", "mixed"),
    ("a question", "expert-medical"),
    ("more words here", "mixed"),
    ("hi", None),
    ("again", "mixed"),
    ("money", "expert-medical"),
]


def test_concurrent_mixed_sets_equal_solo_and_the_runtime_path(rt):
    batcher = Batcher(rt.engine, n_seq=8)
    try:
        solo = [submit(batcher, rt, t, p, temperature=0)()[0] for t, p in JOBS]
        waits = [submit(batcher, rt, t, p, temperature=0) for t, p in JOBS]  # all at once
        together = [w()[0] for w in waits]
        sampled = [submit(batcher, rt, t, p, temperature=0.9, seed=i)()[0] for i, (t, p) in enumerate(JOBS)]
        waits = [submit(batcher, rt, t, p, temperature=0.9, seed=i) for i, (t, p) in enumerate(JOBS)]
        sampled_together = [w()[0] for w in waits]
    finally:
        batcher.close()
    assert together == solo and sampled_together == sampled
    assert len(set(solo)) > 2 and sampled != solo  # the sets and the sampler really change answers
    # the one-request path (llama-cpp-python's own generation loop and sampler) gives the same answers
    mf = rt.modelfile
    for (text, profile), want, sampled_want, seed in zip(JOBS, solo, sampled, range(len(JOBS))):
        for temperature, expect in ((0.0, want), (0.9, sampled_want)):
            req = GenerationRequest(
                messages=[{"role": "user", "content": text}],
                max_tokens=10,
                temperature=temperature,
                seed=seed,
                repeat_penalty=1.1,
            )
            out = rt.chat(req, mf.resolver.resolve(profile), reuse_prefix=False)
            got = out["choices"][0]["message"]["content"]
            if out["usage"]["completion_tokens"] > 10:  # llama-cpp-python runs past max_tokens to end a character
                got = got[: len(expect)]
            assert got == expect, (text, profile, temperature)


def test_prompt_cache_only_under_the_same_set(rt):
    batcher = Batcher(rt.engine, n_seq=2)
    try:
        submit(batcher, rt, "warm up", "mixed", temperature=0)()
        assert batcher.wait_fused(60)  # from here on "mixed" runs fused (the cache is kept per variant)
        first, ev1 = submit(batcher, rt, "the same question", "mixed", temperature=0)()
        again, ev2 = submit(batcher, rt, "the same question", "mixed", temperature=0)()
        other, ev3 = submit(batcher, rt, "the same question", "expert-medical", temperature=0)()
        longer, ev4 = submit(batcher, rt, "the same question, and more", "mixed", temperature=0)()
    finally:
        batcher.close()
    n = len(rt.engine.tokenize(rt.engine.format_chat(rt.with_system([{"role": "user", "content": "x"}]))))
    assert ev1.evaluated > n // 2 and ev2.evaluated == 1 and again == first  # all but the last token reused
    assert ev3.evaluated == ev1.evaluated  # another coefficient set never reuses K/V
    assert 1 < ev4.evaluated < ev1.evaluated  # a shared prefix is reused


def test_the_wait_list_is_bounded_and_cancel_frees_the_sequence(rt):
    batcher = Batcher(rt.engine, n_seq=1, max_queue=1)
    try:
        first = submit(batcher, rt, "a long answer", "mixed", max_tokens=200, temperature=0.9)
        deadline = time.monotonic() + 30
        while batcher.steps < 2 and time.monotonic() < deadline:  # decoding: it holds the only sequence
            time.sleep(0.001)
        waiting, refused = [], 0
        for _ in range(2):
            try:
                waiting.append(submit(batcher, rt, "more", None, max_tokens=4))
            except BusyError as exc:
                refused += 1
                assert "--max-queue 1" in str(exc)
        assert len(waiting) == 1 and refused == 1  # one request may wait (--max-queue 1), the next is refused
        first.req.cancelled.set()
        _, done = first()
        # seed 0 runs this answer to its 200 tokens (no end token): only the cancel ends it early, at the next step
        assert done.finish == "cancelled" and done.tokens < 200, (done.finish, done.tokens)
        _, done = waiting[0](timeout=30)  # the sequence came back: the waiting request is answered
        assert done.kind == "done" and done.finish in ("length", "stop"), done
    finally:
        batcher.close()


def test_closing_ends_every_request(rt):
    batcher = Batcher(rt.engine, n_seq=1)
    waits = [submit(batcher, rt, "long", None, max_tokens=500, temperature=0.9) for _ in range(3)]
    batcher.close()
    assert all(w(timeout=30)[1].kind == "done" for w in waits)  # running and waiting alike, none hangs


def test_a_failing_request_does_not_take_the_others_down(rt):
    batcher = Batcher(rt.engine, n_seq=4)
    try:
        good = submit(batcher, rt, "fine", None, temperature=0)
        events: queue.Queue = queue.Queue()
        bad = BatchRequest(
            [rt.engine.n_vocab + 5],
            rt.engine.coefficient_key(rt.modelfile.resolver.resolve("mixed")),
            Sampling(max_tokens=4),
            events.put,
        )  # a token id outside the vocabulary
        batcher.submit(bad)
        assert events.get(timeout=30).kind == "error"
        assert good()[1].kind == "done"
        assert submit(batcher, rt, "still serving", "mixed", temperature=0)()[1].kind == "done"
    finally:
        batcher.close()


def test_stop_strings_are_held_back_until_decided():
    assert held_back("hello wor", ["world"]) == 3 and held_back("hello", ["xyz"]) == 0
    assert held_back("ab", ["abc", "b!"]) == 2
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


def test_stop_string_cuts_the_answer(rt):
    batcher = Batcher(rt.engine, n_seq=2)
    try:
        full, _ = submit(batcher, rt, "stop test", None, max_tokens=12, temperature=0)()
        assert len(full) > 4
        stop = full[2:4]
        text, done = submit(batcher, rt, "stop test", None, max_tokens=12, temperature=0, stop=[stop])()
    finally:
        batcher.close()
    assert text == full[: full.find(stop)] and done.finish == "stop"


def test_kv_unified_mode_serves_with_the_same_distribution(rt):
    """--kv-unified (one shared K/V buffer, flash attention): concurrent requests complete, and the
    log-probabilities are the exact mode's up to float rounding."""
    lps = {}
    for unified in (False, True):
        batcher = Batcher(rt.engine, n_seq=4, kv_unified=unified)
        try:
            waits = [submit(batcher, rt, t, p, temperature=0, logprobs=2) for t, p in JOBS[:4]]
            results = [w() for w in waits]
            events: queue.Queue = queue.Queue()
            tokens = rt.engine.tokenize(rt.engine.format_chat(rt.with_system([{"role": "user", "content": "hi"}])))
            batcher.submit(BatchRequest(tokens, (), Sampling(max_tokens=1, temperature=0, logprobs=3), events.put))
            lps[unified] = events.get(timeout=30).logprobs[0]["top_logprobs"]
        finally:
            batcher.close()
        assert all(done.kind == "done" and done.tokens > 0 for _, done in results)
    assert [t["token"] for t in lps[True]] == [t["token"] for t in lps[False]]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(lps[True], lps[False])) < 2e-2


def test_two_contexts_route_a_set_together_and_answer_as_solo(tiny_kit):
    """serve --contexts 2: a coefficient set's requests share a context while it has room; answers are the
    solo ones whichever context served them."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from avgguf.server.app import Registry, create_app

    root, *_ = tiny_kit
    mf = load_modelfile(root / "tiny.yaml")
    runtime = Runtime(mf, fuse="sync")
    registry = Registry({"tiny": (mf, runtime)}, parallel=4, contexts=2)
    served = registry.models["tiny"]
    try:
        assert len(served.batchers) == 2 and all(b.n_seq == 2 for b in served.batchers)
        client = TestClient(create_app(registry), base_url="http://127.0.0.1")  # a loopback Host

        def ask(job):
            body = {
                "model": f"tiny:{job[1]}" if job[1] else "tiny",
                "max_tokens": 10,
                "temperature": 0,
                "messages": [{"role": "user", "content": job[0]}],
            }
            return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

        solo = [ask(job) for job in JOBS]
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, JOBS)) == solo
        key = runtime.engine.coefficient_key(mf.resolver.resolve("mixed"))
        first = served.batcher(key)
        first.keys[key] = 1  # as if one request of the set ran there: the next one joins it
        assert served.batcher(key) is first
        first.keys[key] = first.n_seq  # that context is full: the set spills to the other one
        assert served.batcher(key) is not first
        del first.keys[key]
    finally:
        registry.close()
        runtime.close()


def test_kv_unified_steps_stay_under_the_flash_attention_tile_and_serve_8_at_once(rt):
    """--kv-unified (one shared buffer, flash attention): a step holds at most EXACT_ROWS tokens (llama.cpp's
    CPU flash attention goes tiled at 64 rows: a prompt chunk would otherwise change the kernel of the other
    sequences' rows), and 8 requests at once, prompts evaluated next to others' decoding, all finish. Their
    greedy answers are not asserted equal to solo ones: where a sequence's cells lie in the shared buffer
    orders its attention sums (avgguf.runtime.contexts.BatchContext; bench/server_load.py counts them)."""
    batcher = Batcher(rt.engine, n_seq=8, kv_unified=True)
    try:
        assert batcher._ctx.capacity == 63 and batcher.chunk == 63
        for _ in range(2):  # the second round reuses the prompt cache
            waits = [submit(batcher, rt, t, p, max_tokens=16, temperature=0) for t, p in JOBS]  # all at once
            results = [w() for w in waits]
            assert all(done.kind == "done" and done.tokens > 0 for _, done in results)
    finally:
        batcher.close()


def test_kv_unified_requests_near_the_context_limit_together(rt):
    """--kv-unified: every sequence of the shared buffer can reach the per-request context length at once: four
    prompts of n_ctx - 6 tokens with 6 tokens to generate all finish, together and one by one (no llama.cpp
    failure, no crash: the buffer holds n_seq x n_ctx cells)."""
    n_ctx = rt.engine.n_ctx
    base = rt.engine.tokenize(rt.engine.format_chat(rt.with_system([{"role": "user", "content": "hello there"}])))
    prompts = [(base * (n_ctx // len(base) + 1))[i : i + n_ctx - 6] for i in range(4)]
    batcher = Batcher(rt.engine, n_seq=4, kv_unified=True)

    def answer(events: queue.Queue):
        parts = []
        while (ev := events.get(timeout=120)).kind == "piece":
            parts.append(ev.text)
        return "".join(parts), ev

    try:
        queues = []
        for tokens in prompts + prompts:  # four at once, then four more that wait for free sequences
            q: queue.Queue = queue.Queue()
            batcher.submit(BatchRequest(tokens, (), Sampling(max_tokens=6, temperature=0), q.put))
            queues.append(q)
        done = [answer(q)[1] for q in queues]
    finally:
        batcher.close()
    assert all(ev.kind == "done" and ev.finish in ("length", "stop") and ev.tokens > 0 for ev in done)


def test_a_step_lists_its_sequences_in_id_order(rt, monkeypatch):
    """With a K/V stream per sequence (the default) llama.cpp splits a batch into micro-batches of consecutive
    sequence ids only (split_equal, sequential), so a step's entries go in sequence-id order: else a step of 8
    decoding sequences ran as up to 8 forward passes (issue #25 item 4). Requests of mixed lengths finish and
    are replaced in another order than they came, so the slots of the running sequences get shuffled."""
    from avgguf.runtime.contexts import BatchContext

    steps: list[list[int]] = []
    decode = BatchContext.decode

    def recording(self, tokens):
        steps.append([seq for _, _, seq, _ in tokens])
        return decode(self, tokens)

    monkeypatch.setattr(BatchContext, "decode", recording)
    batcher = Batcher(rt.engine, n_seq=4)
    try:
        for round_ in range(3):
            waits = [
                submit(batcher, rt, t, None, max_tokens=3 + (5 * i + round_) % 9, temperature=0) for i, (t, _) in enumerate(JOBS)
            ]
            assert all(w()[1].kind == "done" for w in waits)
    finally:
        batcher.close()
    multi = [s for s in steps if len(set(s)) > 1]
    assert len(multi) > 20
    assert all(s == sorted(s) for s in multi), [s for s in multi if s != sorted(s)][:3]


def test_serve_picks_8_sequences_where_their_kv_fits_1_gib(rt):
    """`serve` without --parallel: 8 sequences where 8 x n_ctx tokens of f16 K/V fit 1 GiB, else llama-server's
    4 (avgguf.runtime.contexts.auto_parallel): the shapes of the model as read from its GGUF."""
    from avgguf.gguf.adapter_format import read_base_model
    from avgguf.runtime.contexts import auto_parallel, kv_bytes_per_token
    from avgguf.config.builtin import builtin_path
    from avgguf.server.registry import Served

    smol = read_base_model(builtin_path()).shapes  # 30 layers, 3 K/V heads of 64: 23 040 bytes per token
    assert kv_bytes_per_token(smol) == 30 * 2 * 192 * 2
    assert auto_parallel(smol, 2048) == 8 and auto_parallel(smol, 8192) == 4
    llama8b = {f"blk.{i}.attn_{kv}.weight": (1024, 4096) for i in range(32) for kv in "kv"}
    assert auto_parallel(llama8b, 2048) == 4 and auto_parallel(llama8b, 1024) == 8
    served = Served(rt.modelfile, rt)
    try:
        assert served.parallel == 8 and [b.n_seq for b in served.batchers] == [8]
    finally:
        served.close()
