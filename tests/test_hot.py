"""Issue #10, full speed for a live set: a coefficient set in use is baked into merged weights in the
background and served from them (avgguf.runtime.merged) by the engine and by the server's batching; real llama.cpp on the
tiny synthetic model (an f32 base, so merged weights stay f32 and match the merged-weights reference)."""

from __future__ import annotations

import logging
import os
import queue
from pathlib import Path
from typing import ClassVar

import pytest
from avgguf.testing.logits import F32, TOKENS, assert_logits_close, merged_logits

from avgguf.runtime.batching import BatchRequest, Sampling
from avgguf.runtime.engine import Engine
from avgguf.errors import AvggufError
from avgguf.runtime.merged import MergedSets, check_mode, merge_pays
from avgguf.config.modelfile import load_modelfile
from avgguf.runtime.session import GenerationRequest, Runtime
from avgguf.server.app import Served

MIXED = {"medical": 0.5, "legal": -1.0}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Merge scratch in the test's own user cache dir (avgguf.runtime.merged puts it there or beside the model)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def engine(root, p, merge: str) -> Engine:
    eng = Engine(p.base_gguf, n_ctx=64, logits_all=True, type_k=F32, type_v=F32, merge=merge)
    eng.load_adapter("medical", root / "medical.gguf")
    eng.load_adapter("legal", root / "legal.gguf")
    return eng


def test_a_settled_set_runs_on_merged_weights(tiny_kit):
    root, p, q = tiny_kit
    eng = engine(root, p, "on")
    try:
        assert eng.set_coefficients(MIXED) and not eng.merged  # adapters serve at once
        before = eng.all_logits(TOKENS)
        eng.settle()  # an answer is done: bake in the background
        eng.wait_merged(timeout=120)
        assert eng.set_coefficients(MIXED) and eng.merged  # the next request runs on merged weights
        assert not eng.set_coefficients(MIXED)  # and stays there, no reset
        merged = eng.all_logits(TOKENS)
        assert_logits_close(merged, merged_logits(p, q, 0.5, -1.0))
        assert_logits_close(merged, before)
        assert eng.set_coefficients({"medical": 1.0}) and not eng.merged  # another set: adapters at once
        assert_logits_close(eng.all_logits(TOKENS), merged_logits(p, q, 1.0, 0.0))
        assert eng.set_coefficients(MIXED) and eng.merged  # the hot set's model was kept
        assert eng.set_coefficients({}) and not eng.merged
        eng.settle()
        eng.wait_merged(timeout=120)
        assert not eng.set_coefficients({}) and not eng.merged  # the base itself is never "merged"
    finally:
        eng.close()


def test_merge_off_never_merges_and_generation_is_unchanged(tiny_kit):
    root, _, _ = tiny_kit
    mf = load_modelfile(root / "tiny.yaml")
    answers = {}
    for merge in ("off", "on"):
        rt = Runtime(mf, merge=merge)
        try:
            req = GenerationRequest(messages=[{"role": "user", "content": "hello there"}], max_tokens=12)
            texts = []
            for _ in range(3):  # the first answer settles the set; the ones after run merged (when on)
                texts.append("".join(rt.stream_chat_text(req, MIXED)))
                rt.engine.wait_merged(timeout=120)
                rt.set_coefficients(MIXED)
            assert rt.engine.merged == (merge == "on")
            answers[merge] = texts
        finally:
            rt.close()
    assert len(set(answers["off"])) == 1 and answers["on"] == answers["off"]


class Item:
    """What `load` makes of a merged file in these tests: records that it was made and closed."""

    closed: ClassVar[list] = []

    def __init__(self, path: Path):
        self.magic = path.read_bytes()[:4]

    def close(self):
        Item.closed.append(self)


def test_merged_sets_keep_capacity_and_spare_what_is_in_use(tiny_kit):
    root, p, _ = tiny_kit
    Item.closed = []
    sets = MergedSets(p.base_gguf, {"medical": root / "medical.gguf", "legal": root / "legal.gguf"}, Item)
    one, two = (("medical", 1.0),), (("legal", 0.5), ("medical", -1.0))
    try:
        assert sets.take(one) is None  # nothing baked yet
        sets.request(one)
        sets.wait(timeout=120)
        a = sets.take(one)
        assert a.magic == b"GGUF" and sets.take(one) is a
        sets.request(two)
        sets.wait(timeout=120)
        b = sets.take(two, in_use=lambda item: item is a)  # capacity 1, but `a` still serves requests
        assert b is not a and Item.closed == []
        assert sets.take(one) is a and Item.closed == [b]  # `b` was idle: freed
    finally:
        sets.close()
    assert Item.closed == [b, a]


def test_a_failing_bake_leaves_the_set_on_adapters(tiny_kit, tmp_path, caplog):
    _, p, _ = tiny_kit
    sets = MergedSets(p.base_gguf, {"medical": tmp_path / "missing.gguf"}, Item)
    try:
        with caplog.at_level(logging.WARNING, logger="avgguf.runtime.merged"):
            sets.request((("medical", 1.0),))
            sets.wait(timeout=60)
            assert sets.take((("medical", 1.0),)) is None
            sets.request((("medical", 1.0),))  # not retried
            sets.wait(timeout=60)
        assert "stays on adapters" in caplog.text and caplog.text.count("could not merge") == 1
    finally:
        sets.close()


def test_auto_merges_where_it_measured_faster(tiny_kit, tmp_path):
    import llama_cpp

    _, p, _ = tiny_kit
    assert merge_pays(p.base_gguf, 10**12, -1)  # an f32 base merges in f32: base speed anywhere
    q4 = tmp_path / "q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(p.base_gguf).encode(), str(q4).encode(), params) == 0
    assert merge_pays(q4, 135_000_000, 0)  # small and on the CPU: q8_0 merged outruns adapters
    assert not merge_pays(q4, 1_200_000_000, 0)  # memory-bound: 8-bit weights cost more than adapters
    assert not merge_pays(q4, 135_000_000, -1)  # offloaded to a GPU: memory-bound too
    with pytest.raises(AvggufError, match="merge must be one of auto, on, off, got 'fast'"):
        check_mode("fast")


def test_bad_merge_setting_is_one_clear_error(tiny_kit, tmp_path, capsys):
    import yaml

    from avgguf.cli import main

    root, _, _ = tiny_kit
    spec = yaml.safe_load((root / "tiny.yaml").read_text())
    spec["defaults"]["merge"] = "always"
    bad = root / "bad-merge.yaml"
    bad.write_text(yaml.safe_dump(spec))
    assert main(["run", str(bad), "hi"]) != 0
    err = capsys.readouterr().err
    assert "defaults.merge" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["chat", str(root / "tiny.yaml"), "--merge", "always"])
    assert "invalid choice: 'always'" in capsys.readouterr().err


def ask(batcher, rt, key, text="a question about law"):
    tokens = rt.engine.tokenize(rt.engine.format_chat(rt.with_system([{"role": "user", "content": text}])))
    events: queue.Queue = queue.Queue()
    batcher.submit(BatchRequest(tokens, key, Sampling(max_tokens=10, temperature=0.0), events.put))
    parts = []
    while (ev := events.get(timeout=60)).kind == "piece":
        parts.append(ev.text)
    return "".join(parts)


def test_server_routes_a_hot_set_to_its_merged_model(tiny_kit):
    root, _, _ = tiny_kit
    mf = load_modelfile(root / "tiny.yaml")
    rt = Runtime(mf, fuse="sync", merge="off")
    served = Served(mf, rt, merge=True, parallel=2)
    try:
        key, other = (rt.engine.coefficient_key(c) for c in (MIXED, {"medical": 1.0}))
        want = ask(served.route(key)[0], rt, key)
        for i in range(9):  # 8 of the last 32 requests (a quarter): hot
            asked = other if i == 4 else key
            assert served.route(asked)[1] == asked
        served.hot.wait(timeout=120)
        batcher, asked = served.route(key)
        assert asked == () and batcher not in served.batchers and batcher in served.peers
        # the bake ran niced, the merged model's decoding thread did not inherit that
        assert os.getpriority(os.PRIO_PROCESS, batcher.native_id) == os.getpriority(os.PRIO_PROCESS, 0)
        assert ask(batcher, rt, asked) == want  # the merged model answers as the adapters did
        assert served.route(other)[1] == other  # a set asked for less stays on adapters
        assert served.route(())[1] == ()  # and the base is the base
    finally:
        served.close()
        rt.close()
    assert served.peers == served.batchers  # the merged context was freed


def test_openmp_defaults_are_set_before_llama_cpp_loads_and_yield_to_the_user(monkeypatch):
    """Several decoding threads need libgomp's unthrottled active wait (avgguf.runtime.threads explains the measurement);
    libgomp reads it when llama.cpp's library loads, so importing avgguf sets it, unless the user chose."""
    import subprocess
    import sys

    from avgguf.runtime.threads import OPENMP_DEFAULTS, openmp_defaults

    code = "import os, avgguf, llama_cpp; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_DEFAULTS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["active", "300000"]
    for key in OPENMP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    openmp_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "passive" and "GOMP_SPINCOUNT" not in os.environ


def test_a_server_wish_does_not_cancel_a_bake_under_way(tiny_kit):
    root, p, _ = tiny_kit
    sets = MergedSets(p.base_gguf, {"medical": root / "medical.gguf", "legal": root / "legal.gguf"}, Item, capacity=2)
    one, two = (("medical", 1.0),), (("legal", 0.5),)
    try:
        sets.request(one, replace=False)
        sets.request(two, replace=False)  # another hot set while `one` is wanted: ignored, not a cancel
        sets.wait(timeout=120)
        assert sets.ready() == [one]
        sets.request(two, replace=False)  # now nothing else is wanted
        sets.wait(timeout=120)
        assert sets.ready() == [one, two]
    finally:
        sets.close()
