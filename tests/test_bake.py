"""Issue #10, `avgguf bake`: every format round-trips against the live profile / the merged weights (real
llama.cpp on tiny synthetic models; PEFT through transformers + peft), and bad input fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from avgguf.testing.logits import F32, TOKENS, assert_logits_close, logits, merged_logits
from avgguf.testing.synthetic import quantized, representable

from avgguf.gguf import adapter_format as fmt
from avgguf.runtime.engine import Engine
from avgguf.config.modelfile import load_modelfile

PROFILE = {"medical": 0.5, "legal": -1.0}  # tiny.yaml's "mixed"


def bake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avgguf.cli", "bake", *args], capture_output=True, text=True, check=False, timeout=300
    )


def live_logits(root) -> np.ndarray:
    mf = load_modelfile(root / "tiny.yaml")
    eng = Engine(mf.base_path, n_ctx=64, logits_all=True, type_k=F32, type_v=F32, fuse="off")
    try:
        for name, path in mf.av_paths.items():
            eng.load_adapter(name, path)
        eng.set_coefficients(PROFILE)
        return eng.all_logits(TOKENS)
    finally:
        eng.close()


def test_gguf_loads_in_plain_llama_cpp_and_matches(tiny_kit, tmp_path):
    root, p, q = tiny_kit
    out = tmp_path / "mixed.gguf"
    r = bake(str(root / "tiny.yaml") + ":mixed", "--out", str(out), "--format", "gguf")
    assert r.returncode == 0, r.stderr
    assert_logits_close(logits(out), merged_logits(p, q, 0.5, -1.0))  # f32 base: kept f32, float tolerance
    reader = gguf.GGUFReader(out)
    assert reader.get_field("avgguf.baked.profile").contents() == "mixed"
    assert reader.get_field("avgguf.baked.coefficients").contents() == [0.5, -1.0]
    q8 = tmp_path / "mixed-q8.gguf"
    assert bake(str(root / "tiny.yaml") + ":mixed", "--out", str(q8), "--format", "gguf", "--type", "q8_0").returncode == 0
    types = {t.tensor_type.name for t in gguf.GGUFReader(q8).tensors if t.name.endswith("attn_q.weight")}
    assert types == {"Q8_0"}
    want, plain = merged_logits(p, q, 0.5, -1.0), logits(p.base_gguf)
    got = logits(q8)
    err, effect = np.abs(got - want).mean(), np.abs(plain - want).mean()
    assert err < 0.25 * effect, (err, effect)  # within q8_0's rounding (a 64-wide model): the effect is kept
    assert np.abs(got - plain).mean() > 0.75 * effect


def test_adapter_equals_the_live_profile(tiny_kit, tmp_path):
    root, p, _ = tiny_kit
    out = tmp_path / "mixed-adapter.gguf"
    assert bake(str(root / "tiny.yaml") + ":mixed", "--out", str(out), "--format", "adapter").returncode == 0
    assert_logits_close(logits(p.base_gguf, {out: 1.0}), live_logits(root))
    info = fmt.read_adapter(out)
    assert info.meta["avgguf.baked.profile"] == "mixed"
    small = tmp_path / "mixed-r2.gguf"
    r = bake(str(root / "tiny.yaml") + ":mixed", "--out", str(small), "--format", "adapter", "--rank", "2")
    assert r.returncode == 0, r.stderr
    assert {pi.rank for pi in fmt.read_adapter(small).pairs.values()} == {2}
    assert small.stat().st_size < out.stat().st_size


def test_peft_directory_gives_the_merged_model(tiny_kit, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    root, p, q = tiny_kit
    out = tmp_path / "mixed-peft"
    r = bake(str(root / "tiny.yaml") + ":mixed", "--out", str(out), "--format", "peft")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and "q_proj" in config["target_modules"]
    model = AutoModelForCausalLM.from_pretrained(p.base_hf, torch_dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    want = dict(p.weights)
    for k, d in representable(p.spec, p.delta).tensors.items():
        want[k] = want[k] + 0.5 * d
    for k, d in representable(q.spec, q.delta).tensors.items():
        want[k] = want[k] - 1.0 * d
    for k, w in want.items():
        if k in merged:
            np.testing.assert_allclose(merged[k].numpy(), w, atol=2e-5, err_msg=k)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(p.base_hf, torch_dtype=torch.float32)
        got = peft.PeftModel.from_pretrained(got, out)(torch.tensor([TOKENS])).logits[0].numpy()
    assert_logits_close(got, merged_logits(p, q, 0.5, -1.0), rel=1e-4)  # transformers vs llama.cpp


def test_ollama_directory_names_files_that_exist(tiny_kit, tmp_path):
    root, *_ = tiny_kit
    out = tmp_path / "ollama-mixed"
    assert bake(str(root / "tiny.yaml") + ":mixed", "--out", str(out), "--format", "ollama").returncode == 0
    lines = [ln for ln in (out / "Modelfile").read_text().splitlines() if ln and not ln.startswith("#")]
    instructions = {ln.split()[0] for ln in lines}
    assert instructions <= {"FROM", "ADAPTER", "SYSTEM", "PARAMETER", "TEMPLATE"}, instructions
    named = {ln.split(maxsplit=1)[0]: ln.split(maxsplit=1)[1] for ln in lines if ln.startswith(("FROM", "ADAPTER"))}
    for path in named.values():
        assert (out / path).is_file(), path
    assert "PARAMETER temperature 0.0" in lines and "PARAMETER num_ctx 128" in lines
    adapter = out / named["ADAPTER"]
    assert_logits_close(logits(out / named["FROM"], {adapter: 1.0}), live_logits(root))


@pytest.mark.parametrize(
    "case", ["unknown profile", "out of range", "missing directory", "type for adapter", "rank for gguf", "all zero", "bad type"]
)
def test_bad_input_is_one_clear_error(tiny_kit, tmp_path, case):
    root, *_ = tiny_kit
    mf = str(root / "tiny.yaml")
    out = str(tmp_path / "x.gguf")
    args, words = {
        "unknown profile": ((mf + ":nope", "--out", out, "--format", "gguf"), "no profile 'nope'"),
        "out of range": ((mf, "--set", "medical=5", "--out", out, "--format", "adapter"), "outside [-2, 2]"),
        "missing directory": ((mf + ":mixed", "--out", str(tmp_path / "no" / "x.gguf"), "--format", "gguf"), "does not exist"),
        "type for adapter": (
            (mf + ":mixed", "--out", out, "--format", "adapter", "--type", "q8_0"),
            "--type applies to --format gguf",
        ),
        "rank for gguf": ((mf + ":mixed", "--out", out, "--format", "gguf", "--rank", "4"), "--rank applies"),
        "all zero": ((mf, "--out", out, "--format", "adapter"), "every coefficient at 0"),
        "bad type": ((mf + ":mixed", "--out", out, "--format", "gguf", "--type", "q9"), "invalid choice"),
    }[case]
    r = bake(*args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))  # no partial output


def test_modelfile_serves_a_baked_profile(tiny_kit, tmp_path):
    import yaml
    from fastapi.testclient import TestClient

    from avgguf.config.modelfile import open_target
    from avgguf.runtime.session import GenerationRequest, Runtime
    from avgguf.server.app import Registry, create_app

    root, *_ = tiny_kit
    baked = root / "mixed-baked.gguf"
    if not baked.exists():
        assert bake(str(root / "tiny.yaml") + ":mixed", "--out", str(baked), "--format", "gguf").returncode == 0
    spec = yaml.safe_load((root / "tiny.yaml").read_text())
    spec["baked"] = {"fast-mixed": baked.name}
    (root / "tiny-baked.yaml").write_text(yaml.safe_dump(spec))
    listed = subprocess.run(
        [sys.executable, "-m", "avgguf.cli", "profiles", str(root / "tiny-baked.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "fast-mixed" in listed.stdout and "baked" in listed.stdout
    fast, _ = open_target(str(root / "tiny-baked.yaml") + ":fast-mixed")
    live, profile = open_target(str(root / "tiny.yaml") + ":mixed")
    req = GenerationRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0.0)
    rt_fast, rt_live = Runtime(fast), Runtime(live)
    try:
        assert not fast.av_paths and fast.spec.defaults == live.spec.defaults
        want = rt_live.chat(req, live.coefficients(profile))["choices"][0]["message"]["content"]
        assert rt_fast.chat(req, {})["choices"][0]["message"]["content"] == want
        mf = load_modelfile(root / "tiny-baked.yaml")
        app = create_app(Registry({"tiny-baked": (mf, rt_live), "tiny-baked:fast-mixed": (fast, rt_fast)}))
        client = TestClient(app, base_url="http://127.0.0.1")  # a loopback Host (the server refuses others)
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "tiny-baked:fast-mixed" in ids and "tiny-baked:mixed" in ids
        body = {
            "model": "tiny-baked:fast-mixed",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
        r = client.post("/v1/chat/completions", json={**body, "avgguf": {"coefficients": {"medical": 1.0}}})
        assert r.status_code == 400 and "unknown alignment vector" in r.json()["error"]["message"]
    finally:
        rt_fast.close()
        rt_live.close()


def test_bake_from_the_full_sources(tiny_kit, tmp_path):
    """--source: the full fine-tune deltas instead of the adapters (here full rank anyway: same model)."""
    root, p, q = tiny_kit
    out = tmp_path / "full.gguf"
    r = bake(
        str(root / "tiny.yaml") + ":mixed",
        "--out",
        str(out),
        "--format",
        "gguf",
        "--source",
        f"medical={p.base_hf},{p.aligned_hf}",
        "--source",
        f"legal={q.base_hf},{q.aligned_hf}",
    )
    assert r.returncode == 0, r.stderr
    assert_logits_close(logits(out), merged_logits(p, q, 0.5, -1.0))
    bad = bake(
        str(root / "tiny.yaml") + ":mixed",
        "--out",
        str(out),
        "--format",
        "gguf",
        "--source",
        f"cardio={p.base_hf},{p.aligned_hf}",
    )
    assert bad.returncode == 2 and "no AV named 'cardio'" in bad.stderr


def test_a_source_of_another_model_is_refused(tiny_kit, tmp_path):
    from avgguf.testing.synthetic import Spec, make_pair

    root, *_ = tiny_kit
    wide = make_pair(tmp_path / "wide", Spec("llama", n_embd=96, n_head=4, n_head_kv=2))
    out = tmp_path / "x.gguf"
    r = bake(
        str(root / "tiny.yaml") + ":mixed",
        "--out",
        str(out),
        "--format",
        "gguf",
        "--source",
        f"medical={wide.base_hf},{wide.aligned_hf}",
    )
    assert r.returncode == 2 and "the source is another model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".avgguf-*"))


def _q4_0(src, out):
    return quantized(src, out)  # avgguf.testing.synthetic: llama.cpp's quantizer


def test_a_source_bake_starts_from_the_full_precision_base(tiny_kit, tmp_path):
    """--source with the base checkpoint: the merge starts from full precision, so a bake to the base GGUF's
    own 4-bit type equals quantizing the aligned model itself; from the adapter (on the 4-bit base) the same
    type snaps the delta back onto the base's grid. The default type stays q8_0."""
    import yaml
    from avgguf.testing.synthetic import to_gguf_tensors, write_gguf

    root, p, _ = tiny_kit
    q4_base = _q4_0(p.base_gguf, tmp_path / "base-q4_0.gguf")
    aligned = write_gguf(tmp_path / "aligned.gguf", p.spec, to_gguf_tensors(p.spec, p.delta.applied_to(p.weights)))
    want, plain = logits(_q4_0(aligned, tmp_path / "aligned-q4_0.gguf")), logits(q4_base)
    (tmp_path / "q4.yaml").write_text(
        yaml.safe_dump(
            {"base": str(q4_base), "avs": {"medical": str(root / "medical.gguf")}, "profiles": {"expert": {"medical": 1.0}}}
        )
    )
    out, snapped = tmp_path / "expert.gguf", tmp_path / "snapped.gguf"
    source = f"medical={p.base_hf},{p.aligned_hf}"
    r = bake(str(tmp_path / "q4.yaml") + ":expert", "--out", str(out), "--format", "gguf", "--source", source, "--type", "q4_0")
    assert r.returncode == 0, r.stderr
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if t.name.endswith("attn_q.weight")} == {"Q4_0"}
    assert (
        bake(str(tmp_path / "q4.yaml") + ":expert", "--out", str(snapped), "--format", "gguf", "--type", "q4_0").returncode == 0
    )
    effect = np.abs(plain - want).mean()
    assert np.abs(logits(out) - want).mean() < 0.05 * effect
    assert np.abs(logits(snapped) - want).mean() > 0.5 * effect
    default = tmp_path / "default.gguf"
    assert (
        bake(str(tmp_path / "q4.yaml") + ":expert", "--out", str(default), "--format", "gguf", "--source", source).returncode == 0
    )
    assert {t.tensor_type.name for t in gguf.GGUFReader(default).tensors if t.name.endswith("attn_q.weight")} == {"Q8_0"}


def test_a_source_base_of_another_model_is_refused(tiny_kit, tmp_path):
    from avgguf.testing.synthetic import Spec, make_pair

    root, *_ = tiny_kit
    other = make_pair(tmp_path / "other", Spec("llama", seed=7))  # same shapes, other weights
    out = tmp_path / "x.gguf"
    r = bake(
        str(root / "tiny.yaml") + ":expert-medical",
        "--out",
        str(out),
        "--format",
        "gguf",
        "--source",
        f"medical={other.base_hf},{other.aligned_hf}",
    )
    assert r.returncode == 2 and "differs from the base GGUF's" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".avgguf-*"))
