"""Issue #9: a bare GGUF with --lora, the chat's comforts, clear errors for every reported case, one resolver,
a runtime without torch, and the Q/K permutation pinned to llama.cpp's own code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from avgguf.gguf.arches import permute_rows, unpermute_rows

from avgguf.config.coefficients import CoefficientError, Resolver, parse_assignments
from avgguf.runtime.threads import CpuMeter, ThreadPolicy

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def avgguf(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avgguf.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV, check=False
    )


# --- bare GGUF --------------------------------------------------------------------------------------------


def test_bare_gguf_with_lora_equals_the_modelfile(tiny_kit):
    root, p, _ = tiny_kit
    via_modelfile = avgguf("run", str(root / "tiny.yaml") + ":mixed", "hello", "--max-tokens", "8", "--temperature", "0")
    bare = avgguf(
        "run",
        str(p.base_gguf),
        "hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--lora",
        f"{root / 'medical.gguf'}=0.5",
        "--lora-scaled",
        str(root / "legal.gguf"),
        "-1",
    )
    assert via_modelfile.returncode == 0 and bare.returncode == 0, bare.stderr
    assert bare.stdout == via_modelfile.stdout
    plain = avgguf("run", str(p.base_gguf), "hello", "--max-tokens", "8", "--temperature", "0")
    assert plain.returncode == 0 and plain.stdout != bare.stdout
    # --set on top of --lora scales, names from the adapters' avgguf.av.name
    overridden = avgguf(
        "run",
        str(p.base_gguf),
        "hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--lora",
        str(root / "medical.gguf"),
        "--lora",
        str(root / "legal.gguf"),
        "--set",
        "medical=0.5 legal=-1",
    )
    assert overridden.stdout == via_modelfile.stdout, overridden.stderr
    listed = avgguf("profiles", str(p.base_gguf), "--lora", f"{root / 'medical.gguf'}=0.5")
    assert "medical" in listed.stdout and "lora" in listed.stdout and "medical=0.5" in listed.stdout


def test_builtin_bases_listed_and_runnable():
    r = avgguf("profiles", "--builtins")
    assert r.returncode == 0 and "builtin:smollm2-135m-instruct" in r.stdout
    r = avgguf("run", "builtin:smollm2-135m-instruct", "Say hi.", "--max-tokens", "4", "--stats")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stats: prompt_tokens=") and " prompt_tps=" in last and " gen_tps=" in last
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert int(fields["prompt_tokens"]) > 5 and 1 <= int(fields["gen_tokens"]) <= 4
    assert float(fields["gen_tps"]) > 0


# --- clear errors -----------------------------------------------------------------------------------------


def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def error_cases(root, p):
    mf = str(root / "tiny.yaml")
    adapter = str(root / "medical.gguf")
    typo = root / "typo.yaml"
    typo.write_text(yaml.safe_dump({"base": "med/base.gguf", "defaults": {"max_token": 5}}))
    junk = root / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    return [
        ("n-ctx too small", ("run", mf, "hi", "--n-ctx", "16"), "expected a context length >= 32"),
        ("prompt over the context", ("run", mf, "hi " * 60, "--n-ctx", "32"), "but the context holds 32"),
        ("port out of range", ("serve", mf, "--port", "80800"), "expected a TCP port 1-65535, got 80800"),
        ("max-tokens 0", ("run", mf, "hi", "--max-tokens", "0"), "expected a positive integer, got 0"),
        ("temperature -1", ("run", mf, "hi", "--temperature", "-1"), "expected a temperature in [0, 5]"),
        (
            "typo in defaults",
            ("run", str(typo), "hi"),
            "unknown key 'defaults.max_token' (did you mean 'max_tokens'?); allowed defaults keys: max_tokens, temp",
        ),
        ("adapter as the model", ("run", adapter, "hi"), "is a LoRA adapter, not a base model"),
        ("adapter to serve", ("serve", adapter), "is a LoRA adapter, not a base model"),
        ("binary file", ("run", str(junk), "hi"), "is not a text file"),
        ("gguf as modelfile to eval", ("eval", adapter, "--data", "x.jsonl"), "is a LoRA adapter"),
        ("lora on a modelfile", ("run", mf, "hi", "--lora", adapter), "--lora applies to a bare base GGUF"),
        ("lora scale not a number", ("run", str(p.base_gguf), "hi", "--lora", f"{adapter}=abc"), "expected PATH[=SCALE]"),
        ("lora scale out of range", ("run", str(p.base_gguf), "hi", "--lora", f"{adapter}=5"), "outside [-2, 2]"),
        ("bad set in one string", ("run", mf, "hi", "--set", "medical=0.8 legal"), "expected NAME=VALUE"),
        # a real data file: the message must be about the range (it used to stop at a missing file)
        (
            "lambdas out of range",
            (
                "eval",
                mf,
                "--data",
                str(Path(__file__).parent.parent / "data" / "preferences" / "eval.jsonl"),
                "--lambdas",
                "-3:1:1",
            ),
            "-3 is outside [-2, 2]",
        ),
    ]


def test_every_reported_error_is_clear(tiny_kit):
    root, p, _ = tiny_kit
    for case, args, words in error_cases(root, p):
        r = avgguf(*args)
        assert r.returncode == 2, (case, r.stdout, r.stderr)
        assert words in r.stderr, (case, r.stderr)
        assert "Traceback" not in r.stderr, (case, r.stderr)


def test_port_in_use_fails_before_the_model_loads(tiny_kit):
    root, *_ = tiny_kit
    sock, port = _busy_port()
    try:
        t0 = time.perf_counter()
        r = avgguf("serve", str(root / "tiny.yaml"), "--port", str(port))
        assert r.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in r.stderr, r.stderr
        assert "avgguf serve: http" not in r.stdout  # no banner: nothing was loaded
    finally:
        sock.close()
    assert time.perf_counter() - t0 < 60


def test_forms_that_used_to_fail_now_work(tiny_kit):
    root, *_ = tiny_kit
    mf = str(root / "tiny.yaml")
    r = avgguf("run", "-v", mf, "hi", "--max-tokens", "2")  # -v after the command
    assert r.returncode == 0, r.stderr
    one = avgguf("run", mf, "hi", "--max-tokens", "6", "--set", "medical=0.5 legal=-1")
    two = avgguf("run", mf, "hi", "--max-tokens", "6", "--set", "medical=0.5", "--set", "legal=-1")
    assert one.returncode == 0 and one.stdout == two.stdout, one.stderr
    data = root / "eval.jsonl"
    data.write_text(
        '{"domain": "medical", "query": "q", "responses": {"avoidance": "no", "generic": "maybe", "expert": "yes"}}\n'
    )
    r = avgguf("eval", mf, "--data", str(data), "--lambdas", "-1:1:1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sweeps"][0]["lambdas"] == [-1.0, 0.0, 1.0]


def test_convert_without_torch_names_the_fix(tiny_kit, tmp_path):
    _, p, _ = tiny_kit
    code = (
        "import sys; sys.modules['torch'] = None; from avgguf.cli import main; "
        f"sys.exit(main(['convert', '--base', {str(p.base_hf)!r}, '--aligned', {str(p.aligned_hf)!r}, "
        f"'--out', {str(tmp_path / 'x.gguf')!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "download.pytorch.org/whl/cpu" in r.stderr and "Traceback" not in r.stderr
    missing = avgguf(
        "convert", "--base", str(tmp_path / "nope"), "--aligned", str(p.aligned_hf), "--out", str(tmp_path / "x.gguf")
    )
    assert missing.returncode == 2 and "--base" in missing.stderr and "not found" in missing.stderr
    assert not (tmp_path / "x.gguf").exists()


# --- chat -------------------------------------------------------------------------------------------------


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_chat(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "avgguf.cli", "chat", "builtin:smollm2-135m-instruct", "--max-tokens", "1500", "--temperature", "0"],
        encoding="utf-8",
        timeout=90,
        env={**ENV, "HOME": str(tmp_path)},
    )
    try:
        child.expect("> ")
        child.sendline("/help")
        child.expect("/system TEXT")
        child.sendline("/system You are a historian who writes long, detailed essays.")
        child.expect(r"\[system: You are a historian")
        child.sendline('"""')
        child.sendline("Write a long essay about the history of Rome,")
        child.sendline('from its founding to the fall of the empire."""')
        child.expect(r'empire\."""\r\n')  # our own input echoed; the answer follows
        child.expect(r"\S+ \S+ \S+ \S+ \S+")  # the answer is streaming (it runs for hundreds of tokens)
        child.sendintr()  # Ctrl-C mid-answer
        child.expect(r"\[stopped\]")
        child.expect("> ")
        child.sendline("/show")
        child.expect("system: You are a historian")
        child.expect("turns: 1")  # the interrupted turn is kept
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# --- one owner per rule -----------------------------------------------------------------------------------

RESOLVER = Resolver(
    ("medical", "legal", "financial"), {"expert": {"medical": 1.0}, "mix": {"medical": 0.5, "legal": -1.0}}, default_profile="mix"
)


@pytest.mark.parametrize(
    "kwargs,want",
    [
        ({}, {"medical": 0.5, "legal": -1.0, "financial": 0.0}),  # default profile
        ({"profile": "expert"}, {"medical": 1.0, "legal": 0.0, "financial": 0.0}),  # named profile
        ({"global_scales": {"financial": 0.3}}, {"medical": 0.5, "legal": -1.0, "financial": 0.3}),  # server scales
        ({"profile": "expert", "global_scales": {"financial": 0.3}}, {"medical": 1.0, "legal": 0.0, "financial": 0.0}),
        ({"lora": [(2, 0.7)]}, {"medical": 0.0, "legal": 0.0, "financial": 0.7}),  # lora replaces all
        ({"lora": [(2, 0.7)], "overrides": {"legal": 0.2}}, {"medical": 0.0, "legal": 0.2, "financial": 0.7}),
        ({"profile": "expert", "overrides": {"legal": -0.5}}, {"medical": 1.0, "legal": -0.5, "financial": 0.0}),
    ],
)
def test_resolver_precedence(kwargs, want):
    assert RESOLVER.resolve(**kwargs) == want


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"profile": "nope"}, "no profile 'nope'"),
        ({"overrides": {"cardio": 1.0}}, "unknown alignment vector 'cardio'"),
        ({"overrides": {"legal": 2.5}}, "outside [-2, 2]"),
        ({"overrides": {"legal": float("nan")}}, "outside [-2, 2]"),
        ({"lora": [(3, 1.0)]}, "lora id 3 does not exist"),
        ({"lora": [(0, -9.0)]}, "outside [-2, 2]"),
    ],
)
def test_resolver_errors(kwargs, words):
    with pytest.raises(CoefficientError, match=None) as exc:
        RESOLVER.resolve(**kwargs)
    assert words in str(exc.value)


def test_assignments_in_one_string_or_many():
    assert parse_assignments(["a=0.8 b=-0.2", "c=1,d=0"]) == {"a": 0.8, "b": -0.2, "c": 1.0, "d": 0.0}


def test_engine_checks_the_range_too(tiny_kit):
    from avgguf.runtime.engine import Engine

    root, p, _ = tiny_kit
    eng = Engine(p.base_gguf, n_ctx=64)
    try:
        eng.load_adapter("medical", root / "medical.gguf")
        with pytest.raises(CoefficientError, match=r"outside \[-2, 2\]"):
            eng.set_coefficients({"medical": 80.0})
    finally:
        eng.close()


def test_runtime_and_server_import_without_torch():
    """Every module outside the converters (which need the `convert` extra) imports with torch and
    transformers absent, and the app builds."""
    from test_layers import modules

    names = [n for n in modules() if not n.startswith("avgguf.converters") and not n.endswith("__main__")]
    code = (
        "import importlib, sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "from avgguf.server.app import create_app, Registry; create_app(Registry({}))\n"
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert len(names) > 40


def llama_cpp_permute(weights, n_head: int, n_head_kv: int | None):
    """A literal copy of llama.cpp's LlamaModel.permute (conversion/llama.py, llama.cpp 0c1e570, as vendored by
    llama-cpp-python 0.3.36; formerly convert_hf_to_gguf.py). Do not edit: it pins our permute_rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


@pytest.mark.parametrize("n_head,n_head_kv,rows", [(9, 3, 3 * 64), (9, 9, 9 * 64), (4, None, 4 * 16), (32, 8, 8 * 128)])
def test_permutation_pinned_to_llama_cpp(n_head, n_head_kv, rows):
    rng = np.random.default_rng(0)
    for shape in ((rows, 24), (rows,), (rows, 3)):  # weight, bias, LoRA B
        w = rng.standard_normal(shape).astype(np.float32)
        want = llama_cpp_permute(w, n_head, n_head_kv)
        np.testing.assert_array_equal(permute_rows(w, n_head, n_head_kv), want)
        np.testing.assert_array_equal(unpermute_rows(want, n_head, n_head_kv), w)


# --- thread policy ----------------------------------------------------------------------------------------


def test_thread_policy_sees_a_busy_process(monkeypatch):
    monkeypatch.delenv("AVGGUF_THREADS", raising=False)
    meter = CpuMeter()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.8)
        seen = meter.others_busy()
    finally:
        busy.kill()
        busy.wait()
    assert seen is not None and seen >= 0.6, seen  # one core's worth of someone else's work
    policy = ThreadPolicy(cores=2, meter=None)
    assert policy.threads() == 2  # no meter: all cores
    assert ThreadPolicy(fixed=3).threads() == 3
    assert ThreadPolicy.from_settings(0, default=4).fixed is None  # --threads 0 = adaptive, beats the modelfile
    assert ThreadPolicy.from_settings(None, default=4).fixed == 4  # no --threads: the modelfile's
