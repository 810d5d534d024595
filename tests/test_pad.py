"""Issue #11: decoding-time alignment (PAD) from the same AVs, against a numpy reference of the scoring rule
over real llama.cpp logits; the generated-answer classifier; CLI, server and eval accept the mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avgguf.runtime.engine import Engine
from avgguf.eval.judge import read_eval_data
from avgguf.config.modelfile import load_modelfile
from avgguf.runtime.pad import (
    PadDecoder,
    PadSettings,
    candidates,
    log_softmax,
    scores,
    token_logps,
)
from avgguf.runtime.session import GenerationRequest, Runtime

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [1, 270, 280, 290, 65, 100]


def engine(root, p) -> Engine:
    eng = Engine(p.base_gguf, n_ctx=128, type_k=0, type_v=0)
    eng.load_adapter("medical", root / "medical.gguf")
    eng.load_adapter("legal", root / "legal.gguf")
    return eng


def reference(root, p, weights: dict[str, float], mode: str, n: int) -> list[int]:
    """Greedy PAD from fresh full evaluations (no side contexts): base and each AV in its own engine."""
    base = Engine(p.base_gguf, n_ctx=128, type_k=0, type_v=0)
    policies = []
    for name, w in weights.items():
        e = Engine(p.base_gguf, n_ctx=128, type_k=0, type_v=0)
        e.load_adapter(name, root / f"{name}.gguf")
        e.set_coefficients({name: 1.0})
        policies.append((e, w))
    out, tokens = [], list(PROMPT)
    try:
        for _ in range(n):
            lb = log_softmax(base.next_logits(tokens))
            cand = candidates(lb, mode)
            s = scores(lb, [log_softmax(e.next_logits(tokens)) for e, _ in policies], [w for _, w in policies], cand)
            tok = int(cand[int(np.argmax(s))])
            out.append(tok)
            tokens.append(tok)
    finally:
        base.close()
        for e, _ in policies:
            e.close()
    return out


@pytest.mark.parametrize(
    "mode,weights",
    [("pad", {"medical": 1.5}), ("pad-full", {"medical": 0.8, "legal": -1.2}), ("pad", {"medical": -2.0, "legal": 1.0})],
)
def test_pad_equals_the_numpy_reference(tiny_kit, mode, weights):
    root, p, _ = tiny_kit
    eng = engine(root, p)
    dec = PadDecoder(eng, PadSettings(mode, weights))
    try:
        got = list(dec.tokens(PROMPT, 12))
    finally:
        dec.close()
        eng.close()
    assert got == reference(root, p, weights, mode, 12)


def greedy(eng: Engine, n: int) -> list[int]:
    tokens, out = list(PROMPT), []
    for _ in range(n):
        out.append(int(np.argmax(eng.next_logits(tokens))))
        tokens.append(out[-1])
    return out


def test_zero_weights_give_the_base_answer(tiny_kit):
    root, p, _ = tiny_kit
    eng = engine(root, p)
    try:
        base = greedy(eng, 12)
        for mode in ("pad", "pad-full"):
            dec = PadDecoder(eng, PadSettings(mode, {"medical": 0.0, "legal": 0.0}))
            assert list(dec.tokens(PROMPT, 12)) == base
            dec.close()
        # pad-full at w = 1 is the AV itself (logit arithmetic)
        dec = PadDecoder(eng, PadSettings("pad-full", {"medical": 1.0}))
        got = list(dec.tokens(PROMPT, 12))
        dec.close()
        eng.set_coefficients({"medical": 1.0})
        assert got == greedy(eng, 12) != base
    finally:
        eng.close()


def test_runtime_chat_pad_and_the_judge_rule(tiny_kit):
    root, *_ = tiny_kit
    mf = load_modelfile(root / "tiny.yaml")
    rt = Runtime(mf)
    req = GenerationRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0.0, repeat_penalty=1.0)
    try:
        base = "".join(rt.stream_chat_text(req, {"medical": 0.0, "legal": 0.0}))
        assert "".join(rt.stream_chat_text(req, {"medical": 0.0, "legal": 0.0}, decode="pad")) == base
        out = rt.chat_pad(req, {"medical": 1.0}, "pad")
        assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] <= 6
        chunks = list(rt.chat_pad(req, {"medical": 1.0}, "pad", stream=True))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == out["choices"][0]["message"]["content"]
    finally:
        rt.close()
    rng = np.random.default_rng(0)
    lb, la = log_softmax(rng.standard_normal((3, 50))), log_softmax(rng.standard_normal((3, 50)))
    toks = [4, 17, 33]
    full = token_logps(lb, [la], [0.7], toks, "pad-full")
    s = lb + 0.7 * (la - lb)
    np.testing.assert_allclose(full, [s[i, t] - np.logaddexp.reduce(s[i]) for i, t in enumerate(toks)])


def test_level_classifier_on_held_out_references():
    pytest.importorskip("sklearn")
    from avgguf.eval.levels import LevelClassifier

    clf = LevelClassifier.train(read_eval_data(ROOT / "data" / "preferences" / "train.jsonl"))
    accuracy = clf.accuracy(read_eval_data(ROOT / "data" / "preferences" / "eval.jsonl"))
    assert accuracy >= 0.9, accuracy


def test_cli_server_and_eval_accept_the_mode(tiny_kit, tmp_path):
    from fastapi.testclient import TestClient

    from avgguf.server.app import Registry, create_app

    root, *_ = tiny_kit
    mf = str(root / "tiny.yaml")
    run = [sys.executable, "-m", "avgguf.cli", "run", mf, "hello", "--max-tokens", "4"]
    ok = subprocess.run([*run, "--decode", "pad", "--set", "medical=1"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*run, "--decode", "padd"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "invalid choice: 'padd'" in bad.stderr
    model = load_modelfile(mf)
    rt = Runtime(model)
    try:
        client = TestClient(create_app(Registry({"tiny": (model, rt)})), base_url="http://127.0.0.1")
        body = {"model": "tiny:mixed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = client.post("/v1/chat/completions", json={**body, "avgguf": {"decode": "pad"}})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        r = client.post("/v1/chat/completions", json={**body, "avgguf": {"decode": "beam"}})
        assert r.status_code == 400 and "avgguf.decode" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "avgguf": {"decode": "pad"}})
        assert r.status_code == 400
    finally:
        rt.close()
    data = tmp_path / "eval.jsonl"
    data.write_text(
        json.dumps({"domain": "medical", "query": "q", "responses": {"avoidance": "no", "generic": "maybe", "expert": "yes"}})
        + "\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "avgguf.cli", "eval", mf, "--data", str(data), "--decode", "pad", "--lambdas", "-1,0,1", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["decode"] == "pad" and out["sweeps"][0]["lambdas"] == [-1.0, 0.0, 1.0]
    assert len(out["sweeps"][0]["shares"]) == 3
