"""Bad input to `avgguf convert` / `inspect`: one clear line, exit status 2, no output file, no temp files left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from avgguf.cli import main
from avgguf.testing.synthetic import Spec, make_pair


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    p = make_pair(root / "ok", Spec("llama"))
    q = make_pair(root / "qwen", Spec("qwen2"))
    bad = root / "cases"
    bad.mkdir()

    def variant(name: str, edit) -> Path:
        d = bad / name
        shutil.copytree(p.aligned_hf, d)
        tensors = load_file(str(d / "model.safetensors"))
        cfg = json.loads((d / "config.json").read_text())
        edit(tensors, cfg)
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    def nan(t, c):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan

    def drop(t, c):
        del t["model.layers.0.self_attn.v_proj.weight"]

    def reshape(t, c):
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)

    def gpt2(t, c):
        c["architectures"] = ["GPT2LMHeadModel"]

    def layers(t, c):
        c["num_hidden_layers"] = 3

    cases = {
        "nan": variant("nan", nan),
        "missing": variant("missing", drop),
        "shape": variant("shape", reshape),
        "gpt2": variant("gpt2", gpt2),
        "layers": variant("layers", layers),
    }
    no_cfg = bad / "no_config"
    shutil.copytree(p.aligned_hf, no_cfg)
    (no_cfg / "config.json").unlink()
    corrupt = bad / "corrupt"
    shutil.copytree(p.aligned_hf, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    (bad / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    # a PEFT adapter trained on a wider model
    peft = bad / "peft_other"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 128), np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((128, 2), np.float32),
        },
        str(peft / "adapter_model.safetensors"),
    )
    cases.update(no_cfg=no_cfg, corrupt=corrupt, corrupt_gguf=bad / "corrupt.gguf", peft_other=peft, qwen=q.aligned_hf, empty=bad)
    return p, cases


# (case id, argv after `convert --base BASE`, words the one-line error must contain)
CASES = [
    # base path that does not exist
    ("missing-base", ["--base", "{root}/nope", "--aligned", "{aligned}"], ["--base", "not found"]),
    # HF directory without config.json
    ("no-config", ["--base", "{base}", "--aligned", "{no_cfg}"], ["config.json not found"]),
    # safetensors file with a broken header
    ("corrupt-safetensors", ["--base", "{base}", "--aligned", "{corrupt}"], ["not a readable safetensors"]),
    # GGUF file that is not one
    ("corrupt-gguf", ["--base", "{corrupt_gguf}", "--aligned", "{aligned}"], ["not a readable GGUF"]),
    # llama base, qwen2 aligned
    ("arch-mismatch", ["--base", "{base}", "--aligned", "{qwen}"], ["different models", "architecture"]),
    # config says 3 layers, checkpoint has 2
    ("config-mismatch", ["--base", "{base}", "--aligned", "{layers}"], ["different models", "block count"]),
    # architecture avgguf does not convert: the error lists the supported ones
    (
        "unsupported-arch",
        ["--base", "{base}", "--aligned", "{gpt2}"],
        ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"],
    ),
    # a tensor present in the base only
    ("missing-tensor", ["--base", "{base}", "--aligned", "{missing}"], ["blk.0.attn_v.weight", "missing from"]),
    # same name, other shape
    ("shape-mismatch", ["--base", "{base}", "--aligned", "{shape}"], ["blk.0.ffn_up.weight", "shape"]),
    # NaN in the aligned weights
    ("nan-delta", ["--base", "{base}", "--aligned", "{nan}"], ["blk.1.ffn_up.weight", "NaN/Inf"]),
    # output directory that does not exist
    ("unwritable-out", ["--base", "{base}", "--aligned", "{aligned}", "--out", "{root}/no/such/dir/x.gguf"], ["does not exist"]),
    # --max-rank without --energy
    ("max-rank-alone", ["--base", "{base}", "--aligned", "{aligned}", "--max-rank", "4"], ["--max-rank", "--energy"]),
    # a PEFT adapter for a model with n_embd 128
    ("peft-other-model", ["--base", "{base}", "--peft", "{peft_other}"], ["attn_q", "another model"]),
    # a PEFT directory without adapter_config.json
    ("peft-no-config", ["--base", "{base}", "--peft", "{empty}"], ["adapter_config.json not found"]),
]


@pytest.mark.parametrize("case,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_convert_input(fx, tmp_path, capsys, case, argv, words):
    p, cases = fx
    fill = {"root": str(tmp_path), "base": str(p.base_hf), "aligned": str(p.aligned_hf), **{k: str(v) for k, v in cases.items()}}
    argv = [a.format(**fill) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.gguf")]
    code = main(["convert", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("avgguf convert: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "no output or temp file may be left behind"


def test_inspect_rejects_non_adapter(fx, capsys):
    p, _ = fx
    assert main(["inspect", str(p.base_gguf)]) == 2
    assert "not a GGUF LoRA adapter" in capsys.readouterr().err


def test_argparse_rejects_bad_energy(fx, capsys):
    p, _ = fx
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--base", str(p.base_hf), "--aligned", str(p.aligned_hf), "--out", "x.gguf", "--energy", "1.5"])
    assert exc.value.code == 2
    assert "expected a number in (0, 1]" in capsys.readouterr().err


def test_untouched_pair_converts(fx):
    """Guard for the table: the unedited pair converts cleanly, so the failures above come from the edits."""
    p, _ = fx
    out = p.root / "fine.gguf"
    assert main(["convert", "--base", str(p.base_hf), "--aligned", str(p.aligned_hf), "--out", str(out)]) == 0
    assert out.is_file()
