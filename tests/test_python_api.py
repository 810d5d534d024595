"""The public Python API (avgguf.open / Model / convert / bake), called the way a user would, checked against
the CLI doing the same job."""

from __future__ import annotations

import subprocess
import sys

import pytest

import avgguf


def cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "avgguf", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_convert_open_set_chat_equals_the_cli(tiny_kit, tmp_path):
    root, p, _ = tiny_kit
    out = tmp_path / "mine.gguf"
    report = avgguf.convert(p.base_hf, p.aligned_hf, out, name="mine", rank=4096, dtype="f32")
    assert out.is_file() and report["out"] == str(out) and report["kept_fraction"] > 0.99
    with avgguf.open(p.base_gguf, avs=[out]) as model:
        assert model.avs == ["mine"] and model.coefficients == {"mine": 0.0}
        assert model.set(mine=0.8) == {"mine": 0.8}
        got = model.chat("hello", max_tokens=8, temperature=0.0, seed=0)
        streamed = "".join(model.stream("hello", max_tokens=8, temperature=0.0, seed=0))
    want = cli("run", str(p.base_gguf), "hello", "--lora", f"{out}=0.8", "--max-tokens", "8", "--temperature", "0", "--seed", "0")
    assert got == streamed == want.rstrip("\n")


def test_profiles_bake_and_errors(tiny_kit, tmp_path):
    root, *_ = tiny_kit
    with avgguf.open(f"{root / 'tiny.yaml'}:mixed") as model:
        assert model.coefficients == {"medical": 0.5, "legal": -1.0}
        assert model.use_profile("expert-medical") == {"medical": 1.0, "legal": 0.0}
        with pytest.raises(avgguf.AvggufError, match="outside"):
            model.set(medical=5)
        assert model.complete("the", max_tokens=3, temperature=0.0)
    baked = tmp_path / "mixed.gguf"
    avgguf.bake_to(f"{root / 'tiny.yaml'}:mixed", baked, format="adapter")
    assert baked.is_file()
    with pytest.raises(avgguf.AvggufError, match="not found"):
        avgguf.open(tmp_path / "missing.yaml")
