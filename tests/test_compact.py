"""Compact AVs: accurate default SVD, --max-size (mixed rank and factor types), --fit distill, configs
without `architectures`, foreign adapters carrying norm tensors. All scored in real llama.cpp."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from avgguf.gguf import adapter_format as fmt
from avgguf.cli import main
from avgguf.gguf.inspect import describe
from avgguf.testing.logits import assert_logits_close, logits
from avgguf.converters.budget import parse_size
from avgguf.converters.lowrank import RankPolicy, factorize
from avgguf.testing.synthetic import Spec, make_pair, to_gguf_tensors, write_gguf


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def softmax_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def dense_pair(tmp_path_factory):
    """A tiny llama whose AV is dense (full-rank, on norms too): rank 2 loses most of it."""
    spec = Spec("llama", tied=False, n_embd=64, n_ff=128, seed=11)
    return make_pair(tmp_path_factory.mktemp("dense"), spec, delta_seed=12, scale=0.3)


def test_default_svd_is_exact_on_a_flat_spectrum():
    # a Gaussian matrix has the flattest spectrum there is: the hard case for a randomized SVD
    delta = np.random.default_rng(0).standard_normal((1536, 576)).astype(np.float32)
    auto = factorize(delta, RankPolicy(rank=16))
    full = factorize(delta, RankPolicy(rank=16, svd="full"))
    assert auto.method == "gram"
    assert auto.kept == pytest.approx(full.kept, rel=1e-6)
    approx, best = auto.left @ auto.right, full.left @ full.right
    assert np.linalg.norm(delta - approx) <= np.linalg.norm(delta - best) * (1 + 1e-6)
    # randomized (the default above 2048 wide): 2r columns and 10 power iterations keep within 1% of the energy
    rand = factorize(delta, RankPolicy(rank=16, svd="randomized"))
    assert rand.method == "randomized" and rand.kept >= full.kept * 0.99, (rand.kept, full.kept)


@pytest.mark.parametrize(
    "text,want", [("10MB", 10_000_000), ("2.5MB", 2_500_000), ("800KB", 800_000), ("1GiB", 2**30), ("512", 512)]
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("budget", [30_000, 60_000, 120_000])
def test_size_budget_holds_and_mixed_types_match_numpy(dense_pair, budget, tmp_path):
    p = dense_pair
    out = tmp_path / "budget.gguf"
    assert convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", out, "--max-size", budget, "--max-rank", 64) == 0
    assert out.stat().st_size <= budget
    info = fmt.read_adapter(out)
    assert info.meta[fmt.KEY_SIZE_BUDGET] == budget
    # numpy reference: base + every stored pair, dequantized exactly as llama.cpp reads it
    reader = gguf.GGUFReader(out)
    stored = {t.name: fmt.decode(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    merged = to_gguf_tensors(p.spec, p.weights)
    for name in info.pairs:
        merged[name] = merged[name] + fmt.delta_from_pair(name, stored[name + fmt.LORA_A], stored[name + fmt.LORA_B])
    ref = write_gguf(tmp_path / "ref.gguf", p.spec, merged)
    want = logits(ref)
    # llama.cpp's CPU kernels quantize the activations to 8 bits for a q4/q5/q8 matmul: that, not the
    # adapter, bounds the agreement (measured: < 1% of the AV's own effect on the logits)
    effect = np.abs(logits(p.base_gguf) - want).max()
    assert np.abs(logits(p.base_gguf, {out: 1.0}) - want).max() <= 0.02 * effect
    assert effect > 0.1


def test_size_budget_uses_low_bit_types_and_more_energy_than_uniform_rank(dense_pair, tmp_path):
    p = dense_pair
    uniform, mixed = tmp_path / "uniform.gguf", tmp_path / "mixed.gguf"
    assert convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", uniform, "--rank", 8) == 0
    size = uniform.stat().st_size
    assert convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", mixed, "--max-size", size) == 0
    types = {t for pi in fmt.read_adapter(mixed).pairs.values() for t in (pi.a_type, pi.b_type)}
    assert types & {"Q4_0", "Q5_0", "Q8_0"}, types
    kept = [fmt.read_adapter(f).meta[fmt.KEY_ENERGY_KEPT] for f in (uniform, mixed)]
    assert kept[1] > kept[0] + 0.05, kept

    # the squared error of the whole stored AV (as llama.cpp reads it) against the real delta is lower
    def error_energy(path):
        meta = fmt.read_adapter(path).meta
        return sum(e * err**2 for e, err in zip(meta[fmt.KEY_T_ENERGY], meta[fmt.KEY_T_ERROR]))

    assert error_energy(mixed) < 0.5 * error_energy(uniform)


def test_size_budget_too_small_is_a_clear_error(dense_pair, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert convert("--base", dense_pair.base_hf, "--aligned", dense_pair.aligned_hf, "--out", out, "--max-size", "2KB") != 0
    err = capsys.readouterr().err
    assert "too small" in err and "Traceback" not in err
    assert not out.exists()


def calibration_rows(spec: Spec, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [{"tokens": [1] + rng.integers(3, spec.n_vocab, 40).tolist()} for _ in range(n)]
    rows += [{"prompt_tokens": [1] + rng.integers(3, spec.n_vocab, 8).tolist()} for _ in range(n // 2)]
    return rows


def test_distill_gets_closer_to_the_aligned_model_than_svd(dense_pair, tmp_path):
    p = dense_pair
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps(r) for r in calibration_rows(p.spec, 48, seed=0)))
    svd, fit = tmp_path / "svd.gguf", tmp_path / "fit.gguf"
    assert convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", svd, "--rank", 2, "--dtype", "f32") == 0
    assert (
        convert(
            "--base",
            p.base_hf,
            "--aligned",
            p.aligned_hf,
            "--out",
            fit,
            "--rank",
            2,
            "--dtype",
            "f32",
            "--fit",
            "distill",
            "--calibration",
            cal,
            "--fit-steps",
            150,
        )
        == 0
    )
    # held-out token sequences, the aligned model with everything it trained (norms included)
    aligned = p.gguf_of(p.delta.applied_to(p.weights), "aligned-all.gguf")
    rng = np.random.default_rng(99)
    kl = {"base": [], "svd": [], "fit": []}
    for _ in range(4):
        tokens = [1] + rng.integers(3, p.spec.n_vocab, 30).tolist()
        want = logits(aligned, tokens=tokens)
        kl["base"].append(softmax_kl(want, logits(p.base_gguf, tokens=tokens)))
        kl["svd"].append(softmax_kl(want, logits(p.base_gguf, {svd: 1.0}, tokens=tokens)))
        kl["fit"].append(softmax_kl(want, logits(p.base_gguf, {fit: 1.0}, tokens=tokens)))
    mean = {k: float(np.mean(v)) for k, v in kl.items()}
    assert mean["svd"] < mean["base"]
    assert mean["fit"] < 0.92 * mean["svd"], mean  # measured: base 0.349, SVD 0.312, fit 0.281
    meta = fmt.read_adapter(fit).meta
    assert meta[fmt.KEY_FIT] == "distill"
    assert meta[fmt.KEY_FIT_KL_AFTER] < meta[fmt.KEY_FIT_KL_BEFORE] < meta[fmt.KEY_FIT_KL_BASE]
    assert meta[fmt.KEY_FIT_TOKENS] > 0
    assert json.loads(meta[fmt.KEY_FIT_SETTINGS])["steps"] == 150
    assert "avgguf.fit.kl_after" in describe(str(fit))["metadata"]


def test_distill_with_size_budget(dense_pair, tmp_path):
    p = dense_pair
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps(r) for r in calibration_rows(p.spec, 16, seed=1)))
    out = tmp_path / "both.gguf"
    assert (
        convert(
            "--base",
            p.base_hf,
            "--aligned",
            p.aligned_hf,
            "--out",
            out,
            "--max-size",
            "40KB",
            "--fit",
            "distill",
            "--calibration",
            cal,
            "--fit-steps",
            20,
        )
        == 0
    )
    assert out.stat().st_size <= 40_000
    logits(p.base_gguf, {out: 1.0})  # llama.cpp loads and runs it


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "not found"),  # missing file
        ('{"prompt": "hi"}\n{oops\n', "line 2: not valid JSON"),  # broken JSON on one line
        ("\n\n", "is empty"),  # no rows
        ('{"colour": "red"}\n', "no known key"),  # rows of an unknown shape
        ('{"tokens": [1, -5]}\n', "non-negative integers"),  # bad token ids
        ('{"prompt": "hi"}\n', "no tokenizer"),  # text, but the pair has no tokenizer
    ],
)
def test_bad_calibration_is_one_clear_error(dense_pair, tmp_path, capsys, content, message):
    cal = tmp_path / "cal.jsonl"
    if content is not None:
        cal.write_text(content)
    out = tmp_path / "out.gguf"
    rc = convert(
        "--base",
        dense_pair.base_hf,
        "--aligned",
        dense_pair.aligned_hf,
        "--out",
        out,
        "--rank",
        2,
        "--fit",
        "distill",
        "--calibration",
        cal,
        "--fit-steps",
        1,
    )
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".avgguf-*"))


def test_config_with_null_architectures_converts(llama_pair, tmp_path):
    p = llama_pair
    dirs = {}
    for role, src in (("base", p.base_hf), ("aligned", p.aligned_hf)):
        dst = tmp_path / role
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["architectures"] = None  # what transformers writes for a model loaded with gguf_file=
        (dst / "config.json").write_text(json.dumps(cfg))
        dirs[role] = dst
    a, b = tmp_path / "null.gguf", tmp_path / "ref.gguf"
    assert convert("--base", dirs["base"], "--aligned", dirs["aligned"], "--out", a, "--rank", 4, "--dtype", "f32") == 0
    assert convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", b, "--rank", 4, "--dtype", "f32") == 0
    assert_logits_close(logits(p.base_gguf, {a: 1.0}), logits(p.base_gguf, {b: 1.0}), rel=1e-6)


def test_inspect_shows_norm_tensors_as_not_applied(llama_pair, tmp_path, capsys):
    """An adapter as mergekit -> convert_lora_to_gguf.py writes it: LoRA pairs plus plain *_norm.weight tensors,
    which llama.cpp loads and skips."""
    p = llama_pair
    w = gguf.GGUFWriter(str(tmp_path / "foreign.gguf"), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    rng = np.random.default_rng(0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", (rng.standard_normal((16, 64)) * 0.01).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", (rng.standard_normal((64, 16)) * 0.01).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    d = describe(str(tmp_path / "foreign.gguf"))
    assert [t["name"] for t in d["tensors"]] == ["blk.0.attn_q.weight"]
    assert d["skipped"][0]["name"] == "blk.0.attn_norm.weight" and "not applied" in d["skipped"][0]["reason"]
    assert main(["inspect", str(tmp_path / "foreign.gguf")]) == 0
    assert "blk.0.attn_norm.weight" in capsys.readouterr().out
    logits(p.base_gguf, {tmp_path / "foreign.gguf": 1.0})  # and llama.cpp really loads it
