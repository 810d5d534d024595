"""PEFT LoRA conversion, `avgguf inspect` (ours and foreign adapters), and adapter validation before llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import gguf
from safetensors.numpy import save_file

from avgguf.gguf import adapter_format as fmt
from avgguf.runtime.engine import Engine
from avgguf.errors import AdapterError
from avgguf.cli import main
from avgguf.testing.logits import assert_logits_close, logits
from avgguf.testing.synthetic import Delta, Spec, make_pair, to_gguf_tensors, write_gguf

PREFIX = "base_model.model."


def write_peft(path, spec: Spec, seed: int, use_rslora: bool) -> Delta:
    """A PEFT LoRA with per-module rank/alpha patterns and an embedding LoRA; returns its delta (HF layout)."""
    rng = np.random.default_rng(seed)
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": use_rslora,
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 3},
        "alpha_pattern": {"down_proj": 2},
        "target_modules": ["q_proj", "k_proj", "down_proj", "embed_tokens"],
    }
    kv = spec.n_head_kv * spec.head_dim
    modules = {
        "model.layers.0.self_attn.q_proj": (spec.n_embd, spec.n_embd),
        "model.layers.1.self_attn.k_proj": (kv, spec.n_embd),
        "model.layers.1.mlp.down_proj": (spec.n_embd, spec.n_ff),
    }
    tensors, delta = {}, {}
    for module, (out, inp) in modules.items():
        r = 3 if module.endswith("layers.0.self_attn.q_proj") else 4
        alpha = 2 if module.endswith("down_proj") else 8
        a = (rng.standard_normal((r, inp)) * 0.1).astype(np.float32)
        b = (rng.standard_normal((out, r)) * 0.1).astype(np.float32)
        tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"] = a, b
        scaling = alpha / (np.sqrt(r) if use_rslora else r)
        delta[module + ".weight"] = (scaling * b @ a).astype(np.float32)
    a = (rng.standard_normal((4, spec.n_vocab)) * 0.1).astype(np.float32)  # lora_embedding_A (r, vocab)
    b = (rng.standard_normal((spec.n_embd, 4)) * 0.1).astype(np.float32)  # lora_embedding_B (embd, r)
    tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = a
    tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"] = b
    delta["model.embed_tokens.weight"] = ((8 / (2.0 if use_rslora else 4)) * (b @ a).T).astype(np.float32)
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return Delta(delta)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_reproduces_its_delta(llama_pair, tmp_path, use_rslora):
    p = llama_pair
    delta = write_peft(tmp_path / "peft", p.spec, seed=3, use_rslora=use_rslora)
    out = tmp_path / "peft.gguf"
    assert main(["convert", "--peft", str(tmp_path / "peft"), "--base", str(p.base_hf), "--out", str(out), "--dtype", "f32"]) == 0
    info = fmt.read_adapter(out)
    assert info.pairs["blk.0.attn_q.weight"].rank == 3 and info.pairs["token_embd.weight"].rank == 4
    merged = write_gguf(tmp_path / "merged.gguf", p.spec, to_gguf_tensors(p.spec, delta.applied_to(p.weights)))
    assert_logits_close(logits(p.base_gguf, {out: 1.0}), logits(merged))
    # the base may also be the GGUF, and a lower --rank re-factors the product exactly by SVD
    low = tmp_path / "peft-r2.gguf"
    assert main(["convert", "--peft", str(tmp_path / "peft"), "--base", str(p.base_gguf), "--out", str(low), "--rank", "2"]) == 0
    ranks = {name: pi.rank for name, pi in fmt.read_adapter(low).pairs.items()}
    assert set(ranks.values()) == {2}
    kept = fmt.read_adapter(low).meta[fmt.KEY_T_KEPT]
    assert all(0.3 < k < 1.0 for k in kept)


def test_inspect_table_and_json(llama_pair, tmp_path, capsys):
    p = llama_pair
    out = tmp_path / "medical.gguf"
    assert (
        main(
            [
                "convert",
                "--base",
                str(p.base_hf),
                "--aligned",
                str(p.aligned_hf),
                "--out",
                str(out),
                "--energy",
                "0.9",
                "--max-rank",
                "16",
                "--domain",
                "medical",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"] == "llama" and d["alpha"] == 0.0 and d["made_by_avgguf"]
    assert d["metadata"][fmt.KEY_DOMAIN] == "medical"
    assert d["metadata"][fmt.KEY_RANK_POLICY] == "energy=0.9,max_rank=16"
    assert {s["name"] for s in d["skipped"]} >= {"output_norm.weight", "blk.0.attn_norm.weight"}
    assert all(t["rank"] <= 16 and t["energy_kept"] is not None for t in d["tensors"])
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in table and "not applied by llama.cpp" in table


def write_foreign_adapter(path, spec: Spec, alpha=16.0, rank=4, seed=9, alpha_type=gguf.GGUFValueType.FLOAT32):
    """A LoRA as llama.cpp's convert_lora_to_gguf.py writes it: uniform rank, alpha > 0, f16 factors."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_key_value(gguf.Keys.Adapter.LORA_ALPHA, alpha, alpha_type)
    a = (rng.standard_normal((rank, spec.n_embd)) * 0.1).astype(np.float16)
    b = (rng.standard_normal((spec.n_embd, rank)) * 0.1).astype(np.float16)
    w.add_tensor("blk.1.attn_output.weight.lora_a", a)
    w.add_tensor("blk.1.attn_output.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return (alpha / rank) * (b.astype(np.float32) @ a.astype(np.float32))


def test_foreign_adapter_inspects_and_applies_with_alpha_rule(llama_pair, tmp_path):
    p = llama_pair
    path = tmp_path / "foreign.gguf"
    delta = write_foreign_adapter(path, p.spec)
    result = subprocess.run([sys.executable, "-m", "avgguf.cli", "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "not made by avgguf" in result.stdout and "alpha 16" in result.stdout
    gw = to_gguf_tensors(p.spec, p.weights)
    gw["blk.1.attn_output.weight"] = gw["blk.1.attn_output.weight"] + 0.5 * delta
    merged = write_gguf(tmp_path / "merged.gguf", p.spec, gw)
    assert_logits_close(logits(p.base_gguf, {path: 0.5}), logits(merged), rel=1e-4)


def test_validation_rejects_what_llama_cpp_would_abort_on(llama_pair, tmp_path):
    p = llama_pair
    eng = Engine(p.base_gguf, n_ctx=32)
    try:
        # alpha as UINT32: llama.cpp would GGML_ASSERT and kill the process
        bad_type = tmp_path / "alpha_u32.gguf"
        write_foreign_adapter(bad_type, p.spec, alpha=16, alpha_type=gguf.GGUFValueType.UINT32)
        with pytest.raises(AdapterError, match="adapter.lora.alpha.*UINT32.*FLOAT32"):
            eng.load_adapter("x", bad_type)
        # an adapter for a wider llama
        wide = make_pair(tmp_path / "wide", Spec("llama", n_embd=96, n_head=4, n_head_kv=2))
        wide_av = tmp_path / "wide.gguf"
        assert main(["convert", "--base", str(wide.base_hf), "--aligned", str(wide.aligned_hf), "--out", str(wide_av)]) == 0
        with pytest.raises(AdapterError, match="built for another model"):
            eng.load_adapter("wide", wide_av)
        # an adapter for qwen2
        qwen = make_pair(tmp_path / "qwen", Spec("qwen2"))
        qwen_av = tmp_path / "qwen.gguf"
        assert main(["convert", "--base", str(qwen.base_hf), "--aligned", str(qwen.aligned_hf), "--out", str(qwen_av)]) == 0
        with pytest.raises(AdapterError, match="architecture 'qwen2'"):
            eng.load_adapter("qwen", qwen_av)
        assert eng.adapters == {}
    finally:
        eng.close()
