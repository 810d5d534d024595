"""Runtime: live coefficients in real llama.cpp against merged weights, the KV-cache trap, modelfiles, CLI, chat."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from avgguf.cli import main
from avgguf.runtime.engine import Engine
from avgguf.runtime.llama import load_llama
from avgguf.config.modelfile import ModelfileError, load_modelfile
from avgguf.runtime.session import GenerationRequest, Runtime
from avgguf.testing.logits import F32, TOKENS, assert_logits_close, logits, merged_logits
from avgguf.testing.synthetic import Spec, make_pair

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kit(tiny_kit):
    return tiny_kit


def test_live_coefficients_follow_merged_reference(kit):
    root, p, q = kit
    eng = Engine(p.base_gguf, n_ctx=64, logits_all=True, type_k=F32, type_v=F32)
    eng.load_adapter("medical", root / "medical.gguf")
    eng.load_adapter("legal", root / "legal.gguf")
    plain = logits(p.base_gguf)
    try:
        for a, b in [(1.0, 0.0), (0.5, -1.0), (-1.0, 0.8), (0.0, 0.0)]:  # one engine, knobs turned live
            assert eng.set_coefficients({"medical": a, "legal": b})
            got = eng.all_logits(TOKENS)
            if a == b == 0.0:
                np.testing.assert_array_equal(got, plain)  # λ = 0 is exactly the plain base
            else:
                assert_logits_close(got, merged_logits(p, q, a, b))
        assert not eng.set_coefficients({"medical": 0.0})  # same set again: no-op
    finally:
        eng.close()


def generate(engine: Engine, prompt: list[int], n: int = 10) -> str:
    # llama-cpp-python reuses the longest cached prefix of the prompt
    return engine.completion(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]


def test_no_stale_kv_after_a_change(kit):
    """Same prompt twice, coefficients changed in between: the second pass must equal a fresh model's."""

    root, p, _ = kit
    prompt = TOKENS[:6]
    fresh = Engine(p.base_gguf, n_ctx=64, type_k=F32, type_v=F32)
    fresh.load_adapter("medical", root / "medical.gguf")
    fresh.set_coefficients({"medical": 1.0})
    want_tokens = generate(fresh, prompt)
    want_logits = fresh.next_logits(prompt)
    fresh.close()

    eng = Engine(p.base_gguf, n_ctx=64, type_k=F32, type_v=F32)
    eng.load_adapter("medical", root / "medical.gguf")
    try:
        before = generate(eng, prompt)  # K/V of the prompt cached under medical = 0
        eng.set_coefficients({"medical": 1.0})
        assert generate(eng, prompt) == want_tokens  # would reuse that prefix without the reset
        assert before != want_tokens

        eng.set_coefficients({"medical": 0.0})
        eng.reset()
        eng.set_coefficients({"medical": 1.0})  # through the engine: reset, so no mixing
        np.testing.assert_allclose(eng.next_logits(prompt), want_logits, atol=1e-5)
    finally:
        eng.close()


def test_the_stale_kv_trap_is_real(kit):
    """What the engine's reset prevents, shown on a raw llama-cpp-python model: change the adapter scale behind
    its back and reuse the cached prefix as Llama.generate does; the last token's logits then mix both sets."""
    import llama_cpp

    root, p, _ = kit
    prompt = TOKENS[:6]
    fresh = Engine(p.base_gguf, n_ctx=64, type_k=F32, type_v=F32)
    fresh.load_adapter("medical", root / "medical.gguf")
    fresh.set_coefficients({"medical": 1.0})
    want_logits = fresh.next_logits(prompt)
    fresh.close()

    llm = load_llama(p.base_gguf, n_ctx=64, type_k=F32, type_v=F32, verbose=False)
    try:
        h = llama_cpp.llama_adapter_lora_init(llm.model, str(root / "medical.gguf").encode())
        llm.eval(prompt)  # K/V under scale 0
        llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(h), 1, (ctypes.c_float * 1)(1.0))
        llm.n_tokens = len(prompt) - 1
        llm.eval(prompt[-1:])
        stale = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        assert np.abs(stale - want_logits).max() > 1e-2
    finally:
        llm.close()


def test_runtime_generation_is_reproducible(kit):
    root, *_ = kit
    mf = load_modelfile(root / "tiny.yaml")
    rt = Runtime(mf)
    try:
        req = GenerationRequest(messages=[{"role": "user", "content": "hello"}], temperature=0.9, seed=42)
        coefs = mf.coefficients("mixed")
        a = rt.chat(req, coefs)["choices"][0]["message"]["content"]
        rt.chat(GenerationRequest(messages=[{"role": "user", "content": "other"}]), mf.coefficients("expert-medical"))
        b = rt.chat(req, coefs, reuse_prefix=False)["choices"][0]["message"]["content"]
        streamed = "".join(rt.stream_chat_text(req, coefs, reuse_prefix=False))
        assert a == b and a
        # llama-cpp-python's stream decoder may drop a multi-byte character assembled from byte tokens
        # (this tiny vocabulary has many); the ASCII text must agree exactly
        assert [ch for ch in streamed if ch.isascii()] == [ch for ch in a if ch.isascii()]
    finally:
        rt.close()


# --- modelfile validation -------------------------------------------------------------------------------

GOOD = {"base": "med/base.gguf", "avs": {"medical": "medical.gguf"}, "profiles": {"x": {"medical": 0.5}}}
BAD_MODELFILES = [
    # unknown top-level key (typo of 'profiles')
    ("unknown-key", {**GOOD, "profile": {}}, "unknown key 'profile'"),
    # unknown key inside defaults
    ("unknown-default", {**GOOD, "defaults": {"max_token": 3}}, "unknown key 'defaults.max_token'"),
    # profile names an AV that does not exist
    ("unknown-av", {**GOOD, "profiles": {"x": {"finance": 1.0}}}, "unknown alignment vector 'finance'"),
    # non-numeric coefficient
    ("non-numeric", {**GOOD, "profiles": {"x": {"medical": "high"}}}, "profiles.x.medical"),
    # coefficient outside [-2, 2]
    ("out-of-range", {**GOOD, "profiles": {"x": {"medical": 8}}}, "outside [-2, 2]"),
    # base file missing
    ("missing-base", {**GOOD, "base": "nope.gguf"}, "base 'nope.gguf' not found"),
    # AV file missing
    ("missing-av", {**GOOD, "avs": {"medical": "nope.gguf"}}, "avs.medical: adapter 'nope.gguf' not found"),
    # adapter built for another base (qwen2 AV on a llama base)
    ("other-base", {**GOOD, "avs": {"medical": "qwen.gguf"}}, "architecture 'qwen2'"),
    # unknown built-in model
    ("bad-builtin", {**GOOD, "base": "builtin:gpt5"}, "unknown built-in"),
    # default_profile that is not a profile
    ("bad-default-profile", {**GOOD, "default_profile": "y"}, "default_profile 'y'"),
    # missing base
    ("no-base", {"avs": {}}, "missing key 'base'"),
]


@pytest.mark.parametrize("case,content,words", BAD_MODELFILES, ids=[c[0] for c in BAD_MODELFILES])
def test_bad_modelfile(kit, case, content, words):
    root, *_ = kit
    if case == "other-base" and not (root / "qwen.gguf").exists():
        qp = make_pair(root / "qwen", Spec("qwen2"))
        assert (
            main(["convert", "--base", str(qp.base_hf), "--aligned", str(qp.aligned_hf), "--out", str(root / "qwen.gguf")]) == 0
        )
    path = root / f"bad-{case}.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ModelfileError) as exc:
        load_modelfile(path)
    assert words in str(exc.value)
    assert str(path) in str(exc.value)


def test_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("base: [unclosed\n")
    with pytest.raises(ModelfileError, match="not valid YAML"):
        load_modelfile(path)


@pytest.mark.parametrize("path", sorted((ROOT / "modelfiles").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_modelfiles_validate_and_load(path):
    mf = load_modelfile(path)
    rt = Runtime(mf, n_ctx=256)
    try:
        for profile in [None, *mf.spec.profiles]:
            rt.set_coefficients(mf.coefficients(profile))
        out = rt.chat(GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, seed=0), mf.coefficients())
        assert out["choices"][0]["message"]["content"] is not None
    finally:
        rt.close()


# --- CLI ------------------------------------------------------------------------------------------------


def avgguf(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avgguf.cli", *args], capture_output=True, text=True, input=stdin, timeout=120)


def test_cli_run_profiles_and_errors(kit):
    root, *_ = kit
    mf = str(root / "tiny.yaml")
    r = avgguf("run", mf + ":mixed", "hello", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr
    same = avgguf("run", mf, "hello", "--max-tokens", "5", "--set", "medical=0.5", "--set", "legal=-1")
    assert same.stdout == r.stdout  # the profile equals the same coefficients given with --set
    r = avgguf("profiles", mf)
    assert r.returncode == 0 and "expert-medical" in r.stdout and "medical=0.5 legal=-1" in r.stdout
    for args, words in [
        ((mf + ":nope", "hi"), "no profile 'nope'"),
        ((mf, "hi", "--set", "medical=9"), "outside [-2, 2]"),
        ((mf, "hi", "--set", "cardio=1"), "unknown alignment vector 'cardio'"),
        ((mf, "hi", "--set", "medical"), "expected NAME=VALUE"),
        (("missing.yaml", "hi"), "'missing.yaml' not found; expected a YAML modelfile"),
    ]:
        r = avgguf("run", *args)
        assert r.returncode == 2, (args, r.stdout)
        assert words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_chat_repl_driven_like_a_user(kit):
    pexpect = pytest.importorskip("pexpect")
    root, *_ = kit
    child = pexpect.spawn(
        sys.executable,
        ["-m", "avgguf.cli", "chat", str(root / "tiny.yaml") + ":expert-medical", "--max-tokens", "6"],
        encoding="utf-8",
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        child.expect(r"\[medical=1 legal=0\]")
        child.expect("> ")
        child.sendline("/set legal=abc")
        child.expect("error: legal: expected a number, found 'abc'")
        child.sendline("/set cardio=1")
        child.expect("error: /set: unknown alignment vector 'cardio'")
        child.sendline("/set legal=-0.5")
        child.expect(r"\[medical=1 legal=-0.5\]")
        child.sendline("hello there")
        child.expect("> ")
        child.sendline("/profile mixed")
        child.expect(r"\[mixed: medical=0.5 legal=-1\]")
        child.sendline("/show")
        child.expect(
            r"profile: mixed\r\ncoefficients: medical=0.5 legal=-1\r\ndecode: weights\r\nsystem: \(none\)\r\n"
            r"turns: 1"
        )
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
