"""Every architecture of avgguf's rule table (avgguf/gguf/arches.py) against llama.cpp's own converter.

Tiny random models are built by transformers from a config (no download); both sides of each pair go to
GGUF through llama.cpp's convert_hf_to_gguf.py (tests/llama_converter.py; AVGGUF_HF_CONVERTER names the
script: .ci/run takes it from the llama-cpp-python sdist). For each architecture and route (HF pair, GGUF
pair, mixed pair, PEFT LoRA), a full-rank adapter on the base must reproduce the aligned GGUF in real
llama.cpp: KL(aligned || base+AV) / KL(aligned || base) <= 0.01 over every position of a fixed sequence.
A wrong layout (Llama without the Q/K permutation) fails the same check; MoE expert deltas, which avgguf
does not write yet, are booked with that reason, never dropped silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avgguf.cli import main  # noqa: E402
from avgguf.gguf import arches  # noqa: E402

CONVERTER = os.environ.get("AVGGUF_HF_CONVERTER", "")
pytestmark = pytest.mark.skipif(
    not Path(CONVERTER).is_file(),
    reason="llama.cpp's convert_hf_to_gguf.py not found: set AVGGUF_HF_CONVERTER (.ci/run takes it from the "
    "llama-cpp-python sdist)",
)
TOKENS = [1, 5, 9, 20, 33, 50, 77, 100, 150, 200, 250, 299, 7, 64]
COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
}


def config(arch: str):
    T = transformers
    untied = dict(tie_word_embeddings=False)
    return {
        "llama": lambda: T.LlamaConfig(**COMMON, **untied),
        "mistral": lambda: T.MistralConfig(**COMMON, **untied),
        "qwen2": lambda: T.Qwen2Config(**COMMON, **untied),
        "qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=16, **untied),
        "gemma2": lambda: T.Gemma2Config(**COMMON, head_dim=16),
        "gemma3": lambda: T.Gemma3TextConfig(**COMMON, head_dim=16),
        "phi3": lambda: T.Phi3Config(**COMMON, **untied),
        "granite": lambda: T.GraniteConfig(**COMMON, **untied),
        "olmo2": lambda: T.Olmo2Config(**COMMON, **untied),
        "smollm3": lambda: T.SmolLM3Config(**COMMON, **untied),
        "mixtral": lambda: T.MixtralConfig(**COMMON, **MOE["mixtral"], **untied),
        "qwen3moe": lambda: T.Qwen3MoeConfig(**COMMON, **MOE["qwen3moe"], **untied),
    }[arch]()


# Not in avgguf's HF table: only their GGUF pair converts (llama.cpp's converter knows their layout).
GGUF_ONLY_ARCHS = {
    "stablelm": lambda: transformers.StableLmConfig(**COMMON, tie_word_embeddings=False),
    "starcoder2": lambda: transformers.Starcoder2Config(**COMMON, tie_word_embeddings=False),
}
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "granite", "olmo2", "smollm3", "mixtral", "qwen3moe"]


def to_gguf(hf_dir: Path) -> Path:
    out = hf_dir.with_suffix(".gguf")
    if not out.exists():
        here = Path(CONVERTER).parent
        env = {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{here / 'gguf-py'}"}
        r = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).with_name("llama_converter.py")),
                str(hf_dir),
                "--outfile",
                str(out),
                "--outtype",
                "f32",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def save(model, directory: Path) -> Path:
    """save_pretrained, plus the tokenizer.json size stub Gemma 3's converter reads to trim token_embd."""
    model.save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    return directory


def sharpened(model):
    """Random init leaves attention near uniform (q.k ~ 0), where Q/K deltas barely show: scale Q/K up."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "qkv_proj")) and param.ndim == 2:
                param.mul_(8.0)
    return model


def applicable(name: str, param, tied: bool, experts: bool) -> bool:
    """Weights llama.cpp applies a LoRA to (what a full-rank adapter must reproduce)."""
    if param.ndim != 2 or "norm" in name or name.endswith(".bias"):
        return False
    if "embed_tokens" in name or "lm_head" in name:
        return not tied
    return experts or ".experts." not in name


def perturbed(model, seed: int, experts: bool = False):
    gen = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if applicable(name, param, tied, False) or (experts and ".experts" in name):
                param.add_(0.05 * param.std() * torch.randn(param.shape, generator=gen))
    return model


def logits(model: Path, adapter: Path | None = None) -> np.ndarray:
    from avgguf.runtime.engine import Engine

    eng = Engine(model, n_ctx=64, logits_all=True, type_k=0, type_v=0)  # f32 K/V
    try:
        if adapter is not None:
            eng.load_adapter("av", adapter)
            eng.set_coefficients({"av": 1.0})
        return eng.all_logits(TOKENS)
    finally:
        eng.close()


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def ratio(base: Path, aligned: Path, adapter: Path) -> float:
    want = logits(aligned)
    return kl(want, logits(base, adapter)) / kl(want, logits(base))


def convert(out: Path, *args: str) -> None:
    """A full-rank f32 adapter (rank 256 >= every tiny tensor's smaller side: exact)."""
    assert main(["convert", *args, "--out", str(out), "--rank", "256", "--dtype", "f32"]) == 0


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    made: dict[str, Path] = {}

    def kit(arch: str) -> Path:
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            torch.manual_seed(0)
            base = sharpened(transformers.AutoModelForCausalLM.from_config(config(arch)))
            save(base, root / "base")
            save(perturbed(base, 1), root / "aligned")
            made[arch] = root
        return made[arch]

    return kit


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_gguf_and_mixed_pairs_reproduce_the_aligned_model(arch, kits, tmp_path, capsys):
    root = kits(arch)
    base_gguf, aligned_gguf = to_gguf(root / "base"), to_gguf(root / "aligned")
    routes = {
        "hf": (root / "base", root / "aligned"),
        "gguf": (base_gguf, aligned_gguf),
        "mixed": (root / "base", aligned_gguf),
    }
    for route, (base, aligned) in routes.items():
        out = tmp_path / f"{route}.gguf"
        convert(out, "--base", str(base), "--aligned", str(aligned))
        capsys.readouterr()
        got = ratio(base_gguf, aligned_gguf, out)
        assert got <= 0.01, f"{arch} {route} pair: KL ratio {got:.4f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_lora_reproduces_the_merged_model(arch, kits, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    root = kits(arch)
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    torch.manual_seed(2)
    targets = r".*\.(q_proj|k_proj|v_proj|o_proj|gate)$" if arch in MOE else "all-linear"  # experts: not written yet
    lora = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    save(lora.merge_and_unload(), tmp_path / "merged")
    out = tmp_path / "peft.gguf"
    assert (
        main(["convert", "--base", str(root / "base"), "--peft", str(tmp_path / "lora"), "--out", str(out), "--dtype", "f32"])
        == 0
    )
    capsys.readouterr()
    got = ratio(to_gguf(root / "base"), to_gguf(tmp_path / "merged"), out)
    assert got <= 0.01, f"{arch} PEFT LoRA: KL ratio {got:.4f}"


@pytest.mark.parametrize("arch", sorted(GGUF_ONLY_ARCHS))
def test_a_gguf_pair_of_any_architecture_converts(arch, tmp_path, capsys):
    torch.manual_seed(0)
    base = sharpened(transformers.AutoModelForCausalLM.from_config(GGUF_ONLY_ARCHS[arch]()))
    save(base, tmp_path / "base")
    save(perturbed(base, 1), tmp_path / "aligned")
    base_gguf, aligned_gguf = to_gguf(tmp_path / "base"), to_gguf(tmp_path / "aligned")
    out = tmp_path / "av.gguf"
    convert(out, "--base", str(base_gguf), "--aligned", str(aligned_gguf))
    capsys.readouterr()
    got = ratio(base_gguf, aligned_gguf, out)
    assert got <= 0.01, f"{arch} GGUF pair: KL ratio {got:.4f}"
    assert (
        main(
            [
                "convert",
                "--base",
                str(tmp_path / "base"),
                "--aligned",
                str(tmp_path / "aligned"),
                "--out",
                str(tmp_path / "hf.gguf"),
            ]
        )
        != 0
    )
    assert "two GGUFs" in capsys.readouterr().err  # the HF route names the way that works


def test_a_wrong_layout_is_caught(kits, tmp_path, monkeypatch, capsys):
    """The same check fails for Llama converted without llama.cpp's Q/K row permutation."""
    root = kits("llama")
    right = arches.HF_ARCHITECTURES["LlamaForCausalLM"]
    monkeypatch.setitem(arches.HF_ARCHITECTURES, "LlamaForCausalLM", arches.ArchSpec("llama", permute_qk=False))
    out = tmp_path / "unpermuted.gguf"
    convert(out, "--base", str(root / "base"), "--aligned", str(root / "aligned"))
    capsys.readouterr()
    assert right.permute_qk
    assert ratio(to_gguf(root / "base"), to_gguf(root / "aligned"), out) > 0.05


@pytest.mark.parametrize("arch", ["mixtral", "qwen3moe"])
def test_moe_expert_deltas_are_booked_with_their_reason(arch, kits, tmp_path, capsys):
    root = kits(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    save(perturbed(model, 3, experts=True), tmp_path / "experts")
    for route, (base, aligned) in {
        "hf": (root / "base", tmp_path / "experts"),
        "gguf": (to_gguf(root / "base"), to_gguf(tmp_path / "experts")),
    }.items():
        out = tmp_path / f"{route}.gguf"
        assert main(["convert", "--base", str(base), "--aligned", str(aligned), "--out", str(out), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        moe = [s for s in report["skipped"] if s["reason"].startswith("MoE expert")]
        exps = [s for s in report["skipped"] if "_exps." in s["name"]]
        assert moe and moe == exps and sum(s["energy"] for s in moe) > 0.05 * report["total_energy"], (route, exps)
        assert not [s for s in report["skipped"] if "norm" in s["reason"] and "exps" in s["name"]]


def test_a_peft_lora_on_moe_experts_names_the_limit(kits, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    root = kits("qwen3moe")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    assert (
        main(["convert", "--base", str(root / "base"), "--peft", str(tmp_path / "lora"), "--out", str(tmp_path / "x.gguf")]) != 0
    )
    err = capsys.readouterr().err
    assert "MoE expert" in err and "Traceback" not in err and not (tmp_path / "x.gguf").exists()


def test_an_unknown_architecture_names_the_gguf_route(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    assert (
        main(["convert", "--base", str(tmp_path / "m"), "--aligned", str(tmp_path / "m"), "--out", str(tmp_path / "x.gguf")]) != 0
    )
    err = capsys.readouterr().err
    assert "FalconForCausalLM" in err and "two GGUFs" in err and "Traceback" not in err
