"""Every architecture of avgguf's rule table (avgguf/gguf/arches.py) against llama.cpp's own converter.

Tiny random models are built by transformers from a config (no download); both sides of each pair go to
GGUF through llama.cpp's convert_hf_to_gguf.py (tests/llama_converter.py; AVGGUF_HF_CONVERTER names the
script: .ci/run takes it from the llama-cpp-python sdist). For each architecture and route (HF pair, GGUF
pair, mixed pair, PEFT LoRA), a full-rank adapter on the base must reproduce the aligned GGUF in real
llama.cpp: KL(aligned || base+AV) / KL(aligned || base) <= 0.01 over every position of a fixed sequence.
A wrong layout (Llama without the Q/K permutation, experts stacked out of order) fails the same check; MoE
expert deltas are written as 3-D per-expert pairs and reproduce an aligned model whose experts moved.
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
from avgguf.testing.synthetic import TINY_HF_CONFIG  # noqa: E402

CONVERTER = os.environ.get("AVGGUF_HF_CONVERTER", "")
pytestmark = pytest.mark.skipif(
    not Path(CONVERTER).is_file(),
    reason="llama.cpp's convert_hf_to_gguf.py not found: set AVGGUF_HF_CONVERTER (.ci/run takes it from the "
    "llama-cpp-python sdist)",
)
TOKENS = [1, 5, 9, 20, 33, 50, 77, 100, 150, 200, 250, 299, 7, 64]
COMMON = dict(TINY_HF_CONFIG)
MOE_LAYERS = COMMON["num_hidden_layers"]
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


def applicable(name: str, param, tied: bool) -> bool:
    """Weights llama.cpp applies a LoRA to (what a full-rank adapter must reproduce)."""
    if param.ndim != 2 or "norm" in name or name.endswith(".bias"):
        return False
    if "embed_tokens" in name or "lm_head" in name:
        return not tied
    return ".experts." not in name


def perturbed(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if applicable(name, param, tied):
                param.add_(0.05 * param.std() * torch.randn(param.shape, generator=gen))
    return model


def experts_moved(model, seed: int):
    """Only the experts move, by half their spread: the whole difference is theirs (attention deltas would
    drown it: at 0.05 std an expert delta is 0.03 % of a perturbed tiny model's KL)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts" in name:
                param.add_(0.5 * param.std() * torch.randn(param.shape, generator=gen))
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
    # MoE: PEFT 0.21 adds the router and transformers 5's fused 3-D experts (ParamWrapper, target_parameters)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    if arch in MOE:
        assert {"gate_up_proj", "down_proj"} <= set(lora.peft_config["default"].target_parameters)
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


@pytest.fixture(scope="module")
def expert_kits(kits, tmp_path_factory):
    """Per MoE architecture: the base and an aligned side whose expert weights alone moved."""
    made: dict[str, tuple[Path, Path]] = {}

    def kit(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            root = kits(arch)
            model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
            aligned = tmp_path_factory.mktemp(arch + "-experts") / "aligned"
            save(experts_moved(model, 3), aligned)
            made[arch] = (root / "base", aligned)
        return made[arch]

    return kit


@pytest.mark.parametrize("arch", sorted(MOE))
def test_moe_expert_deltas_reproduce_the_aligned_model(arch, expert_kits, tmp_path, capsys):
    """Per-expert 3-D pairs (build_lora_mm_id) on every route: nothing of the experts' delta is booked as
    skipped and llama.cpp's base + AV reproduces the aligned model whose experts moved."""
    base, aligned = expert_kits(arch)
    base_gguf, aligned_gguf = to_gguf(base), to_gguf(aligned)
    for route, (b, a) in {"hf": (base, aligned), "gguf": (base_gguf, aligned_gguf), "mixed": (base, aligned_gguf)}.items():
        out = tmp_path / f"{route}.gguf"
        convert(out, "--base", str(b), "--aligned", str(a), "--json")
        report = json.loads(capsys.readouterr().out)
        exps = [t for t in report["tensors"] if "_exps." in t["name"]]
        assert len(exps) == 3 * MOE_LAYERS and all(len(t["shape"]) == 3 for t in exps), (route, exps)
        assert not [s for s in report["skipped"] if "_exps." in s["name"]], route
        got = ratio(base_gguf, aligned_gguf, out)
        assert got <= 0.01, f"{arch} {route} pair with expert deltas: KL ratio {got:.4f}"


@pytest.mark.parametrize("route", ["hf", "gguf"])
def test_moe_expert_stacks_streamed_by_experts_give_the_same_adapter(expert_kits, tmp_path, monkeypatch, capsys, route):
    """Expert stacks above converters.deltas.STREAM_ELEMENTS are factored a few experts at a time (a
    Qwen3-30B-A3B stack is 128 x 768 x 2048): the same pairs as whole, never loaded whole."""
    from avgguf.converters import deltas
    from avgguf.converters.sources import GGUFModel, HFCheckpoint

    base, aligned = expert_kits("qwen3moe")
    if route == "gguf":
        base, aligned = to_gguf(base), to_gguf(aligned)
    convert(tmp_path / "whole.gguf", "--base", str(base), "--aligned", str(aligned))
    monkeypatch.setattr(deltas, "STREAM_ELEMENTS", 1000)
    monkeypatch.setattr(deltas, "CHUNK_ELEMENTS", 4000)  # about two experts per chunk
    cls = GGUFModel if route == "gguf" else HFCheckpoint
    whole = cls.load

    def load(self, name):
        assert "_exps." not in name, f"{name} was loaded whole"
        return whole(self, name)

    monkeypatch.setattr(cls, "load", load)
    convert(tmp_path / "streamed.gguf", "--base", str(base), "--aligned", str(aligned))
    capsys.readouterr()
    a, b = adapter_deltas(tmp_path / "whole.gguf"), adapter_deltas(tmp_path / "streamed.gguf")
    assert a.keys() == b.keys() and any("_exps." in n for n in a)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-3 * np.abs(a[name]).max(), err_msg=name)


def test_misordered_experts_are_caught(expert_kits, tmp_path, monkeypatch, capsys):
    """The same check fails when the per-expert slices are stacked in the wrong order."""
    from avgguf.converters.sources import HFCheckpoint

    base, aligned = expert_kits("qwen3moe")
    right = HFCheckpoint._stack_experts

    def reversed_stack(self):
        right(self)
        for name, (f, parts, shape) in list(self._where.items()):
            if f is None:
                self._where[name] = (f, parts[::-1], shape)

    monkeypatch.setattr(HFCheckpoint, "_stack_experts", reversed_stack)
    out = tmp_path / "misordered.gguf"
    convert(out, "--base", str(base), "--aligned", str(aligned))
    capsys.readouterr()
    assert ratio(to_gguf(base), to_gguf(aligned), out) > 0.05


def test_moe_max_size_keeps_expert_pairs_within_budget(expert_kits, tmp_path, capsys):
    base, aligned = expert_kits("mixtral")
    out = tmp_path / "small.gguf"
    args = ["convert", "--base", str(base), "--aligned", str(aligned), "--out", str(out), "--max-size", "60KB", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.stat().st_size <= 60_000
    assert [t for t in report["tensors"] if "_exps." in t["name"]]
    assert ratio(to_gguf(base), to_gguf(aligned), out) < 1.0


@pytest.mark.parametrize("case", ["unknown expert projection", "wrapper of no expert parameter", "rank mismatch"])
def test_a_peft_lora_on_moe_experts_names_the_limit(kits, tmp_path, capsys, case):
    """Expert LoRAs of a layout avgguf does not read are one clear error, with no output file."""
    from safetensors.torch import load_file, save_file

    peft = pytest.importorskip("peft")
    root = kits("qwen3moe")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    st = tmp_path / "lora" / "adapter_model.safetensors"
    tensors = load_file(st)
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"  # the outer wrapper: down_proj
    if case == "unknown expert projection":
        tensors["base_model.model.model.layers.0.mlp.experts.0.foo_proj.lora_A.weight"] = torch.zeros(4, 64)
        tensors["base_model.model.model.layers.0.mlp.experts.0.foo_proj.lora_B.weight"] = torch.zeros(64, 4)
        words = "foo_proj"
    elif case == "wrapper of no expert parameter":
        tensors[key] = tensors[key][:, :32].contiguous()  # in 32: neither gate_up_proj nor down_proj
        words = "neither gate_up_proj"
    else:
        tensors[key] = tensors[key][:8].contiguous()
        tensors[key.replace("lora_A", "lora_B")] = tensors[key.replace("lora_A", "lora_B")][:, :8].contiguous()
        words = "rank 2 in its tensors but 4"
    save_file(tensors, st)
    out = tmp_path / "x.gguf"
    assert main(["convert", "--base", str(root / "base"), "--peft", str(tmp_path / "lora"), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and not out.exists(), err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_an_unknown_architecture_names_the_gguf_route(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    assert (
        main(["convert", "--base", str(tmp_path / "m"), "--aligned", str(tmp_path / "m"), "--out", str(tmp_path / "x.gguf")]) != 0
    )
    err = capsys.readouterr().err
    assert "FalconForCausalLM" in err and "two GGUFs" in err and "Traceback" not in err


def moe_logits(base: Path, adapters: dict[str, tuple[Path, float]], fuse: str = "off", merged: bool = False) -> np.ndarray:
    from avgguf.runtime.engine import Engine

    eng = Engine(base, n_ctx=64, logits_all=True, type_k=0, type_v=0, fuse=fuse, merge="on" if merged else "off")
    try:
        for name, (path, _) in adapters.items():
            eng.load_adapter(name, path)
        coefs = {name: c for name, (_, c) in adapters.items()}
        eng.set_coefficients(coefs)
        if merged:
            eng.settle()  # an answer is done: the set is baked in the background
            eng.wait_merged(timeout=300)
            assert eng.set_coefficients(coefs) and eng.merged
        return eng.all_logits(TOKENS)
    finally:
        eng.close()


def test_moe_adapters_fuse_merge_and_bake(kits, expert_kits, tmp_path, capsys):
    """Two AVs with 3-D expert pairs at their coefficients: live, fused into one adapter, merged into the base's
    weights and baked (GGUF, adapter, adapter re-compressed per expert) all give the same logits."""
    import yaml

    base, aligned = expert_kits("qwen3moe")
    base_gguf = to_gguf(base)
    convert(tmp_path / "experts.gguf", "--base", str(base), "--aligned", str(aligned))
    convert(tmp_path / "attn.gguf", "--base", str(base), "--aligned", str(kits("qwen3moe") / "aligned"))
    capsys.readouterr()
    avs = {"experts": (tmp_path / "experts.gguf", 0.7), "attn": (tmp_path / "attn.gguf", -0.4)}
    live = moe_logits(base_gguf, avs)
    close = dict(rtol=0, atol=2e-3 * float(np.abs(live).max()))
    without_experts = moe_logits(base_gguf, {"attn": avs["attn"]})
    assert np.abs(live - without_experts).max() > 10 * close["atol"]  # the expert pairs move the model
    np.testing.assert_allclose(moe_logits(base_gguf, avs, fuse="sync"), live, **close)
    np.testing.assert_allclose(moe_logits(base_gguf, avs, merged=True), live, **close)
    mf = {
        "base": str(base_gguf),
        "avs": {n: str(p) for n, (p, _) in avs.items()},
        "profiles": {"set": {n: c for n, (_, c) in avs.items()}},
    }
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(mf))
    target = str(tmp_path / "moe.yaml") + ":set"
    for fmt_ in ("gguf", "adapter"):
        out = tmp_path / f"baked.{fmt_}.gguf"
        assert main(["bake", target, "--out", str(out), "--format", fmt_]) == 0, capsys.readouterr().err
        np.testing.assert_allclose(logits(out) if fmt_ == "gguf" else logits(base_gguf, out), live, **close)
    small = tmp_path / "baked-r8.gguf"
    assert main(["bake", target, "--out", str(small), "--format", "adapter", "--rank", "8"]) == 0
    from avgguf.gguf import adapter_format as fmt

    experts = {n: p for n, p in fmt.read_adapter(small).pairs.items() if fmt.is_expert(n)}
    assert experts and {(p.rank, p.a_shape[:2]) for p in experts.values()} == {(8, (4, 8))}  # per expert, one rank
    exact, cut = (adapter_deltas(p) for p in (tmp_path / "baked.adapter.gguf", small))
    for name in experts:  # each expert's best rank-8 approximation (Eckart-Young, per expert)
        u, sv, vt = np.linalg.svd(exact[name].astype(np.float64))
        best = (u[..., :8] * sv[:, None, :8]) @ vt[:, :8]
        assert np.linalg.norm(cut[name] - best) <= 1e-3 * np.linalg.norm(best), name


def adapter_deltas(path: Path) -> dict[str, np.ndarray]:
    import gguf

    from avgguf.gguf import adapter_format as fmt

    tensors = {t.name: fmt.tensor_floats(t) for t in gguf.GGUFReader(path).tensors}
    return {n: fmt.delta_from_pair(n, tensors[n + fmt.LORA_A], tensors[n + fmt.LORA_B]) for n in fmt.read_adapter(path).pairs}


# --- PEFT LoRAs on MoE experts (issue #22) and the PEFT export per architecture ---

HUB_EXPERTS = {
    "qwen3moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
}


def per_expert_lora(arch: str, base: Path, out: Path, ranks=None, skip=(), r: int = 4, seed: int = 5) -> Path:
    """A PEFT LoRA on the hub checkpoint's per-expert nn.Linear names (as PEFT saves it for transformers 4):
    `ranks` (expert -> rank, in rank_pattern) and `skip` (experts without a LoRA) vary it per expert."""
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    n_expert = cfg.get("num_experts") or cfg["num_local_experts"]
    ff, embd = cfg.get("moe_intermediate_size") or cfg["intermediate_size"], cfg["hidden_size"]
    stack, (gate, up, down) = HUB_EXPERTS[arch]
    gen = torch.Generator().manual_seed(seed)
    tensors, rank_pattern = {}, {}
    for layer in range(cfg["num_hidden_layers"]):
        for e in range(n_expert):
            if e in skip:
                continue
            re_ = (ranks or {}).get(e, r)
            for proj, (rows, cols) in ((gate, (ff, embd)), (up, (ff, embd)), (down, (embd, ff))):
                key = f"model.layers.{layer}.{stack}.{e}.{proj}"
                tensors[f"base_model.model.{key}.lora_A.weight"] = torch.randn(re_, cols, generator=gen) / cols**0.5
                tensors[f"base_model.model.{key}.lora_B.weight"] = 0.05 * torch.randn(rows, re_, generator=gen)
                if re_ != r:
                    rank_pattern[key.replace(".", r"\.")] = re_
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "rank_pattern": rank_pattern}
    config.update(target_modules=[gate, up, down], lora_dropout=0.0, bias="none", base_model_name_or_path=None)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("arch", sorted(MOE))
def test_per_expert_peft_loras_reproduce_the_merged_model(arch, kits, tmp_path, capsys):
    """Hub-layout per-expert LoRAs, stacked into 3-D pairs, reproduce the model PEFT 0.21 itself merges (it
    converts them onto transformers 5's fused experts) in real llama.cpp."""
    peft = pytest.importorskip("peft")
    root = kits(arch)
    lora = per_expert_lora(arch, root / "base", tmp_path / "lora")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    save(peft.PeftModel.from_pretrained(base, lora).merge_and_unload(), tmp_path / "merged")
    out = tmp_path / "peft.gguf"
    args = ["convert", "--base", str(root / "base"), "--peft", str(lora), "--out", str(out), "--dtype", "f32", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(t["name"] for t in report["tensors"]) == sorted(
        f"blk.{i}.ffn_{k}_exps.weight" for i in range(MOE_LAYERS) for k in ("gate", "up", "down")
    )
    got = ratio(to_gguf(root / "base"), to_gguf(tmp_path / "merged"), out)
    assert got <= 0.01, f"{arch} per-expert PEFT LoRA: KL ratio {got:.4f}"
    on_gguf = tmp_path / "peft-on-gguf.gguf"  # a GGUF base (Mixtral's architecture reads as plain llama) agrees
    args = ["convert", "--base", str(to_gguf(root / "base")), "--peft", str(lora), "--out", str(on_gguf), "--dtype", "f32"]
    assert main(args) == 0
    capsys.readouterr()
    assert adapter_deltas(on_gguf).keys() == adapter_deltas(out).keys()
    for name, delta in adapter_deltas(on_gguf).items():
        np.testing.assert_array_equal(delta, adapter_deltas(out)[name], err_msg=name)


def test_per_expert_ranks_are_padded_and_missing_experts_are_zero(kits, tmp_path, capsys):
    """Experts of different ranks share the largest (zero-padded) and an expert without a LoRA gets zero
    factors: each expert's delta is exactly its own scaling * B @ A."""
    import gguf
    from safetensors.torch import load_file

    from avgguf.gguf import adapter_format as fmt

    root = kits("qwen3moe")
    lora = per_expert_lora("qwen3moe", root / "base", tmp_path / "lora", ranks={1: 2, 2: 6}, skip=(3,))
    out = tmp_path / "peft.gguf"
    assert main(["convert", "--base", str(root / "base"), "--peft", str(lora), "--out", str(out), "--dtype", "f32"]) == 0
    capsys.readouterr()
    tensors = {t.name: fmt.tensor_floats(t) for t in gguf.GGUFReader(out).tensors}
    factors = {k: v.numpy() for k, v in load_file(lora / "adapter_model.safetensors").items()}
    for name, pair in fmt.read_adapter(out).pairs.items():
        assert pair.rank == 6 and pair.a_shape[0] == 4, name
        layer, kind = name.split(".")[1], name.split(".")[2].split("_")[1]
        delta = fmt.delta_from_pair(name, tensors[name + fmt.LORA_A], tensors[name + fmt.LORA_B])
        for e in range(4):
            key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{kind}_proj"
            if e == 3:
                assert not delta[e].any(), name
                continue
            a, b = factors[key + ".lora_A.weight"], factors[key + ".lora_B.weight"]
            want = (8 / a.shape[0]) * b @ a  # lora_alpha 8 over the expert's own rank
            np.testing.assert_allclose(delta[e], want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=f"{name} {e}")


VLLM_RANKS = {8, 16, 32, 64, 128, 256, 320, 512}


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float().numpy()


def assert_vllm_ready(directory: Path, arch: str) -> None:
    """What vLLM (and LoRAX/SGLang, which read save_pretrained's directory) accept: one rank from vLLM's list,
    lora_alpha = r, no bias, no DoRA, no modules_to_save, only LoRA factors under PEFT's key names."""
    import re

    from safetensors import safe_open

    cfg = json.loads((directory / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] in VLLM_RANKS and cfg["lora_alpha"] == cfg["r"], cfg
    assert cfg["bias"] == "none" and not cfg.get("use_dora") and not cfg.get("modules_to_save"), cfg
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and not cfg.get("use_rslora"), cfg
    key_re = re.compile(r"^base_model\.model\.(?P<module>.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            m = key_re.match(key)
            assert m, key
            assert m["module"].rsplit(".", 1)[-1] in cfg["target_modules"], (key, cfg["target_modules"])
            shape = tuple(f.get_slice(key).get_shape())
            assert cfg["r"] in (shape[0] if key.endswith(("lora_A.weight", "lora_embedding_A")) else shape[1],), (key, shape)
            if arch in MOE and ".experts." in key:
                assert re.search(r"\.experts\.\d+\.", key), key  # per expert, the hub checkpoint's names


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_export_loads_in_transformers(arch, kits, expert_kits, tmp_path, capsys):
    """bake --format peft of a converted adapter, per architecture: PEFT 0.21 loads the directory on the tiny
    HF base (transformers 5), and base + LoRA (live and merged) gives the aligned HF model's logits; the
    directory meets vLLM's restrictions. MoE: once for attention + router, once for the experts alone."""
    import yaml

    peft = pytest.importorskip("peft")
    root = kits(arch)
    base_gguf = to_gguf(root / "base")
    aligned_sides = {"dense": root / "aligned"}
    if arch in MOE:
        aligned_sides["experts"] = expert_kits(arch)[1]
    for side, aligned in aligned_sides.items():
        av = tmp_path / f"{side}.gguf"
        convert(av, "--base", str(root / "base"), "--aligned", str(aligned))
        mf = tmp_path / f"{side}.yaml"
        mf.write_text(yaml.safe_dump({"base": str(base_gguf), "avs": {"av": str(av)}, "profiles": {"all": {"av": 1.0}}}))
        out = tmp_path / f"{side}-peft"
        assert main(["bake", f"{mf}:all", "--out", str(out), "--format", "peft"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert_vllm_ready(out, arch)
        want = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(aligned))
        base = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(root / "base"))
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(root / "base"), out)
        live = hf_logits(model)
        merged = hf_logits(model.merge_and_unload())
        moved = float(np.abs(want - base).max())
        tol = 1e-3 * moved
        assert moved > 0.01, (arch, side, moved)  # the aligned side moved the logits
        for what, got in (("live", live), ("merged", merged)):
            err = float(np.abs(got - want).max())
            assert err <= tol, f"{arch} {side} PEFT export ({what}): max |logit error| {err:.3g} > {tol:.3g}"


# Gemma3: llama.cpp's converter trims token_embd to the tokenizer's vocabulary (Gemma3Model.modify_tensors:
# without tokenizer.model, len(tokenizer.json's model.vocab) + len(added_tokens)) and writes every norm as 1 + w.
# The tiny model's tokenizer is smaller than its config's vocab_size, so the trim is live (320 -> 300 rows).
GEMMA3_TOKENS = 300  # of COMMON's vocab_size 320; TOKENS stay below it
VOCAB_CONVERTER = """
import sys
import convert_hf_to_gguf as C
from avgguf.testing.synthetic import add_vocab
n_vocab = int(sys.argv.pop(1))
orig = C.get_model_class
def patched(name, mmproj=False):
    cls = orig(name, mmproj=mmproj)
    cls.set_vocab = lambda self: add_vocab(self.gguf_writer, n_vocab)
    return cls
C.get_model_class = patched
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
C.main()
"""


def gemma3_tokenizer(directory: Path, n_tokens: int = GEMMA3_TOKENS, n_added: int = 4) -> Path:
    """A tokenizer.json of n_tokens (the last n_added as added_tokens), as the converter counts them."""
    first = n_tokens - n_added
    vocab = {f"t{i}": i for i in range(first)}
    added = [{"id": i, "content": f"<extra_{i}>", "special": True} for i in range(first, n_tokens)]
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added}))
    return directory


def to_gguf_vocab(hf_dir: Path, n_vocab: int) -> Path:
    """to_gguf with a token list of n_vocab (the trimmed token_embd's rows, which llama.cpp checks on load);
    every tensor still goes through llama.cpp's own converter code."""
    out = hf_dir.with_suffix(".gguf")
    if not out.exists():
        script = hf_dir.parent / "vocab_converter.py"
        script.write_text(VOCAB_CONVERTER)
        here = Path(CONVERTER).parent
        env = {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{here / 'gguf-py'}"}
        cmd = [sys.executable, str(script), str(n_vocab), str(hf_dir), "--outfile", str(out), "--outtype", "f32"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def gguf_rows(path: Path, name: str) -> int:
    import gguf

    return next(int(t.shape[-1]) for t in gguf.GGUFReader(path).tensors if t.name == name)


@pytest.fixture(scope="module")
def gemma3_trim(tmp_path_factory):
    """base; aligned (applicable weights moved); booked (norms, embeddings and one o_proj moved): HF dirs and
    GGUFs."""
    root = tmp_path_factory.mktemp("gemma3-trim")
    torch.manual_seed(0)
    base = sharpened(transformers.AutoModelForCausalLM.from_config(config("gemma3")))
    assert base.config.vocab_size > GEMMA3_TOKENS and base.config.tie_word_embeddings
    gemma3_tokenizer(save(base, root / "base"))
    booked = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    gemma3_tokenizer(save(perturbed(base, 1), root / "aligned"))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in booked.named_parameters():
            if "norm" in name or "embed_tokens" in name or "layers.0.self_attn.o_proj" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))  # o_proj: one pair to write
    gemma3_tokenizer(save(booked, root / "booked"))
    return {side: (root / side, to_gguf_vocab(root / side, GEMMA3_TOKENS)) for side in ("base", "aligned", "booked")}


def test_gemma3_vocab_trim_pairs_reproduce_the_aligned_model(gemma3_trim, tmp_path, capsys):
    """HF, GGUF and both mixed pairs of a Gemma3 whose converter trimmed token_embd (320 -> 300 rows) all
    reproduce the aligned GGUF; the HF side presents token_embd with the GGUF's rows."""
    from avgguf.converters.sources import HFCheckpoint

    (base, base_gguf), (aligned, aligned_gguf) = gemma3_trim["base"], gemma3_trim["aligned"]
    assert gguf_rows(base_gguf, "token_embd.weight") == GEMMA3_TOKENS  # the converter did trim
    assert HFCheckpoint(base, "--base").shape("token_embd.weight") == (GEMMA3_TOKENS, COMMON["hidden_size"])
    routes = {
        "hf": (base, aligned),
        "gguf": (base_gguf, aligned_gguf),
        "mixed": (base, aligned_gguf),
        "mixed-reversed": (base_gguf, aligned),
    }
    for route, (b, a) in routes.items():
        out = tmp_path / f"{route}.gguf"
        convert(out, "--base", str(b), "--aligned", str(a))
        capsys.readouterr()
        got = ratio(base_gguf, aligned_gguf, out)
        assert got <= 0.01, f"gemma3 (trimmed vocab) {route} pair: KL ratio {got:.4f}"


def test_gemma3_mixed_pair_without_the_vocab_trim_is_refused(gemma3_trim, tmp_path, monkeypatch, capsys):
    """What the trim rule is for in a tied model: without it the two sides' token_embd differ in shape."""
    import dataclasses

    spec = arches.HF_ARCHITECTURES["Gemma3ForCausalLM"]
    monkeypatch.setitem(arches.HF_ARCHITECTURES, "Gemma3ForCausalLM", dataclasses.replace(spec, vocab_trim=()))
    base, aligned_gguf = gemma3_trim["base"][0], gemma3_trim["aligned"][1]
    args = ["convert", "--base", str(base), "--aligned", str(aligned_gguf), "--out", str(tmp_path / "x.gguf")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "token_embd.weight" in err and "shape" in err and "Traceback" not in err


def booked_energies(capsys, tmp_path, route: str, base: Path, aligned: Path) -> dict[str, tuple[float, str]]:
    convert(tmp_path / f"{route}.gguf", "--base", str(base), "--aligned", str(aligned), "--json")
    report = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in report["tensors"]] == ["blk.0.attn_output.weight"], route
    return {s["name"]: (s["energy"], s["reason"]) for s in report["skipped"]}


def test_gemma3_norms_and_tied_embeddings_are_booked_alike_on_every_route(gemma3_trim, tmp_path, capsys):
    """Norms (1 + w in the GGUF) and the tied token_embd are booked, never applied, with the same energy
    on every route: no spurious delta of 1 per norm element in a mixed pair; the HF pair also books the
    embedding rows past the tokenizer that the converter drops."""
    from safetensors.torch import load_file

    (base, base_gguf), (booked, booked_gguf) = gemma3_trim["base"], gemma3_trim["booked"]
    routes = {
        "hf": (base, booked),
        "gguf": (base_gguf, booked_gguf),
        "mixed": (base, booked_gguf),
        "mixed-reversed": (base_gguf, booked),
    }
    got = {route: booked_energies(capsys, tmp_path, route, b, a) for route, (b, a) in routes.items()}
    want = got["gguf"]  # both sides written by llama.cpp's converter: the reference
    norms = sorted(n for n in want if "_norm" in n)
    assert len(norms) == 6 * COMMON["num_hidden_layers"] + 1, norms
    hf_b, hf_a = load_file(base / "model.safetensors"), load_file(booked / "model.safetensors")
    hf_norm_energy = sum(float(((hf_a[k] - hf_b[k]).double() ** 2).sum()) for k in hf_b if "norm" in k)
    assert sum(want[n][0] for n in norms) == pytest.approx(hf_norm_energy, rel=1e-4)
    n_norm_elements = sum(hf_b[k].numel() for k in hf_b if "norm" in k)
    assert hf_norm_energy < 0.05 * n_norm_elements  # what a spurious +1 per element would swamp
    embd = hf_a["model.embed_tokens.weight"] - hf_b["model.embed_tokens.weight"]
    kept, dropped = (float((embd[s].double() ** 2).sum()) for s in (slice(0, GEMMA3_TOKENS), slice(GEMMA3_TOKENS, None)))
    assert want["token_embd.weight"][0] == pytest.approx(kept, rel=1e-4) and "tied" in want["token_embd.weight"][1]
    oov = f"model.embed_tokens.weight[{GEMMA3_TOKENS}:{COMMON['vocab_size']}]"
    for route, energies in got.items():
        for name in [*norms, "token_embd.weight"]:
            assert energies[name][0] == pytest.approx(want[name][0], rel=1e-4), (route, name)
            assert energies[name][1] == want[name][1], (route, name)
        extra = set(energies) - set(want)
        assert extra == ({oov} if route == "hf" else set()), (route, extra)
    assert got["hf"][oov][0] == pytest.approx(dropped, rel=1e-4) and "tokenizer" in got["hf"][oov][1]


def test_gemma3_mixed_pair_without_the_norm_shift_books_a_spurious_delta(gemma3_trim, tmp_path, monkeypatch, capsys):
    """The check above catches a missing +1: each norm then books about 1 per element."""
    import dataclasses

    spec = arches.HF_ARCHITECTURES["Gemma3ForCausalLM"]
    monkeypatch.setitem(arches.HF_ARCHITECTURES, "Gemma3ForCausalLM", dataclasses.replace(spec, norm_shift=0.0))
    base, booked_gguf = gemma3_trim["base"][0], gemma3_trim["booked"][1]
    energies = booked_energies(capsys, tmp_path, "unshifted", base, booked_gguf)
    assert energies["output_norm.weight"][0] > 0.5 * COMMON["hidden_size"]


# gpt-oss: fused 3-D experts (gate_up_proj (E, embd, 2 n_ff) transposed, gate = even rows, up = odd rows;
# down_proj (E, n_ff, embd) transposed), biases and attention sinks everywhere; official weights MXFP4.
GPT_OSS = dict(
    COMMON,
    intermediate_size=96,  # != hidden_size (a transpose shows), a multiple of 32 (MXFP4 blocks)
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=32,
    tie_word_embeddings=False,
)
GPT_OSS_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # not their biases


def fused_experts_moved(model, seed: int):
    """The fused expert weights alone move (their biases are not LoRA targets)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(GPT_OSS_WEIGHTS):
                param.add_(0.5 * param.std() * torch.randn(param.shape, generator=gen))
    return model


def mxfp4_quantized(directory: Path) -> Path:
    """The checkpoint re-saved as OpenAI ships gpt-oss: expert weights as MXFP4 `*_blocks` (E, out, in/32, 16)
    + `*_scales` (E, out, in/32) (two e2m1 codes a byte, low nibble first; E8M0 scales), the rest as is."""
    from safetensors.torch import load_file, save_file

    values = torch.tensor(arches.MXFP4_VALUES.tolist())
    tensors = load_file(directory / "model.safetensors")
    for name in [n for n in tensors if n.endswith(GPT_OSS_WEIGHTS)]:
        w = tensors.pop(name).transpose(-1, -2)  # (E, out, in)
        blocks = w.reshape(*w.shape[:-1], -1, 32)
        amax = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        e = (torch.floor(torch.log2(amax)) - 2 + 127).clamp(0, 254)
        codes = ((blocks / torch.exp2(e - 127)).unsqueeze(-1) - values).abs().argmin(-1).to(torch.uint8)
        tensors[name + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
        tensors[name + "_scales"] = e.squeeze(-1).to(torch.uint8).contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """HF dirs: base; aligned (attention, router, LM head moved); experts (fused expert weights moved);
    booked (biases and sinks moved, plus one o_proj); their MXFP4 copies (base, experts)."""
    root = tmp_path_factory.mktemp("gpt-oss")
    torch.manual_seed(0)
    base = sharpened(transformers.AutoModelForCausalLM.from_config(transformers.GptOssConfig(**GPT_OSS)))
    save(base, root / "base")
    fresh = lambda: transformers.AutoModelForCausalLM.from_pretrained(root / "base")  # noqa: E731
    save(perturbed(fresh(), 1), root / "aligned")
    save(fused_experts_moved(fresh(), 3), root / "experts")
    booked, gen = fresh(), torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in booked.named_parameters():
            if name.endswith(("bias", "sinks")) or "layers.0.self_attn.o_proj.weight" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    save(booked, root / "booked")
    import shutil

    for side in ("base", "experts"):
        shutil.copytree(root / side, root / f"{side}-mxfp4")
        mxfp4_quantized(root / f"{side}-mxfp4")
    return root


def expert_report(report: dict, route: str) -> None:
    exps = [t for t in report["tensors"] if "_exps.weight" in t["name"]]
    assert len(exps) == 3 * MOE_LAYERS and all(len(t["shape"]) == 3 for t in exps), (route, exps)
    assert not [s for s in report["skipped"] if "_exps.weight" in s["name"]], route


def test_gpt_oss_pairs_reproduce_the_aligned_model(gpt_oss, tmp_path, capsys):
    """Attention, router and LM head deltas; then the fused experts' (3-D per-expert pairs), on every route."""
    for kit in ("aligned", "experts"):
        base, aligned = gpt_oss / "base", gpt_oss / kit
        base_gguf, aligned_gguf = to_gguf(base), to_gguf(aligned)
        for route, (b, a) in {"hf": (base, aligned), "gguf": (base_gguf, aligned_gguf), "mixed": (base, aligned_gguf)}.items():
            out = tmp_path / f"{kit}-{route}.gguf"
            convert(out, "--base", str(b), "--aligned", str(a), "--json")
            report = json.loads(capsys.readouterr().out)
            if kit == "experts":
                expert_report(report, route)
            got = ratio(base_gguf, aligned_gguf, out)
            assert got <= 0.01, f"gpt-oss {kit} {route} pair: KL ratio {got:.4f}"


def test_gpt_oss_gate_and_up_split_in_halves_is_caught(gpt_oss, tmp_path, monkeypatch, capsys):
    """The same check fails with gate/up cut as two halves (Qwen-MoE's split) instead of interleaved rows."""
    import dataclasses

    spec = arches.HF_ARCHITECTURES["GptOssForCausalLM"]
    n_ff = GPT_OSS["intermediate_size"]
    halves = (
        arches.FusedPart("mlp.experts.gate_proj.weight", 0, 1, True, stop=n_ff),
        arches.FusedPart("mlp.experts.up_proj.weight", n_ff, 1, True),
    )
    rules = tuple((k, halves if k == "mlp.experts.gate_up_proj" else v) for k, v in spec.fused_experts)
    monkeypatch.setitem(arches.HF_ARCHITECTURES, "GptOssForCausalLM", dataclasses.replace(spec, fused_experts=rules))
    base, aligned = gpt_oss / "base", gpt_oss / "experts"
    out = tmp_path / "halves.gguf"
    convert(out, "--base", str(base), "--aligned", str(aligned))
    capsys.readouterr()
    assert ratio(to_gguf(base), to_gguf(aligned), out) > 0.05


def test_gpt_oss_biases_and_sinks_are_booked_alike_on_every_route(gpt_oss, tmp_path, capsys):
    base, booked = gpt_oss / "base", gpt_oss / "booked"
    routes = {"hf": (base, booked), "gguf": (to_gguf(base), to_gguf(booked)), "mixed": (base, to_gguf(booked))}
    got = {}
    for route, (b, a) in routes.items():
        convert(tmp_path / f"{route}.gguf", "--base", str(b), "--aligned", str(a), "--json")
        report = json.loads(capsys.readouterr().out)
        assert [t["name"] for t in report["tensors"]] == ["blk.0.attn_output.weight"], route
        got[route] = {s["name"]: (s["energy"], s["reason"]) for s in report["skipped"]}
    want = got["gguf"]
    kinds = {n.split(".", 2)[-1] for n in want if n.startswith("blk.0.")}
    assert {
        "attn_sinks.weight",
        "ffn_gate_exps.bias",
        "ffn_up_exps.bias",
        "ffn_down_exps.bias",
        "ffn_gate_inp.bias",
        "attn_q.bias",
    } <= kinds
    for route, energies in got.items():
        assert set(energies) == set(want), route
        for name, (energy, reason) in want.items():
            assert energies[name][0] == pytest.approx(energy, rel=1e-4) and energies[name][1] == reason, (route, name)


def test_gpt_oss_mxfp4_experts_are_dequantized_as_llama_cpp_repacks_them(gpt_oss):
    """HFCheckpoint's MXFP4 dequant and gate/up split give, bit for bit, what gguf-py dequantizes from the
    MXFP4 tensors llama.cpp's converter repacked from the same checkpoint."""
    from avgguf.converters.sources import GGUFModel, HFCheckpoint

    hf_dir = gpt_oss / "experts-mxfp4"
    hf, gg = HFCheckpoint(hf_dir, "--base"), GGUFModel(to_gguf(hf_dir), "--aligned")
    assert hf.quantized and gg.quantized and sorted(hf.names()) == sorted(gg.names())
    types = {t.name: t.tensor_type.name for t in gg.reader.tensors}
    exps = [n for n in hf.names() if "_exps.weight" in n]
    assert len(exps) == 3 * MOE_LAYERS and {types[n] for n in exps} == {"MXFP4"}
    for name in hf.names():
        assert hf.shape(name) == gg.shape(name), name
        np.testing.assert_array_equal(hf.load(name), gg.load(name), err_msg=name)
    np.testing.assert_array_equal(hf.load_rows(exps[0], 1, 3), gg.load_rows(exps[0], 1, 3))


def test_gpt_oss_mxfp4_pairs_reproduce_the_aligned_model(gpt_oss, tmp_path, capsys):
    base, aligned = gpt_oss / "base-mxfp4", gpt_oss / "experts-mxfp4"
    base_gguf, aligned_gguf = to_gguf(base), to_gguf(aligned)
    for route, (b, a) in {"hf": (base, aligned), "gguf": (base_gguf, aligned_gguf), "mixed": (base, aligned_gguf)}.items():
        out = tmp_path / f"{route}.gguf"
        convert(out, "--base", str(b), "--aligned", str(a), "--json")
        report = json.loads(capsys.readouterr().out)
        expert_report(report, route)
        got = ratio(base_gguf, aligned_gguf, out)
        assert got <= 0.01, f"gpt-oss MXFP4 {route} pair: KL ratio {got:.4f}"


def test_a_quantized_hf_checkpoint_names_the_gguf_route(gpt_oss, tmp_path, capsys):
    import shutil

    shutil.copytree(gpt_oss / "base", tmp_path / "fp8")
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    args = ["convert", "--base", str(tmp_path / "fp8"), "--aligned", str(gpt_oss / "aligned"), "--out", str(tmp_path / "x.gguf")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "fp8" in err and "two GGUFs" in err and "Traceback" not in err


def gpt_oss_peft(gpt_oss, tmp_path: Path, lora_config: dict) -> tuple[Path, Path]:
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(gpt_oss / "base")
    torch.manual_seed(2)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, **lora_config))
    lora.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora", save(lora.merge_and_unload(), tmp_path / "merged")


def test_gpt_oss_peft_lora_reproduces_the_merged_model(gpt_oss, tmp_path, capsys):
    lora, merged = gpt_oss_peft(gpt_oss, tmp_path, dict(target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj)$"))
    out = tmp_path / "peft.gguf"
    assert main(["convert", "--base", str(gpt_oss / "base"), "--peft", str(lora), "--out", str(out), "--dtype", "f32"]) == 0
    capsys.readouterr()
    got = ratio(to_gguf(gpt_oss / "base"), to_gguf(merged), out)
    assert got <= 0.01, f"gpt-oss PEFT LoRA: KL ratio {got:.4f}"


def test_a_peft_lora_on_gpt_oss_fused_experts_reproduces_the_merged_model(gpt_oss, tmp_path, capsys):
    """PEFT's ParamWrappers on gpt-oss's fused experts (E, embd, 2 n_ff): transposed and interleaved as the
    converter does (arches._GPT_OSS_EXPERTS), 3-D per-expert pairs that reproduce the merged model."""
    lora, merged = gpt_oss_peft(gpt_oss, tmp_path, dict(target_modules=[], target_parameters=list(GPT_OSS_WEIGHTS)))
    out = tmp_path / "x.gguf"
    args = ["convert", "--base", str(gpt_oss / "base"), "--peft", str(lora), "--out", str(out), "--dtype", "f32", "--json"]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    expert_report(report, "peft")
    got = ratio(to_gguf(gpt_oss / "base"), to_gguf(merged), out)
    assert got <= 0.01, f"gpt-oss PEFT LoRA on experts: KL ratio {got:.4f}"


# DeepSeek-V2/V3 (deepseek2): MLA attention (kv_b_proj split into attn_k_b / attn_v_b by the converter, KV heads
# written as 1), one leading dense layer, then routed + shared experts. llama.cpp's graph multiplies the MLA
# projections (and, in the version read, the LM head) without its LoRA path: arches.NOT_APPLIED.
DEEPSEEK = dict(
    COMMON,
    num_key_value_heads=4,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    rope_scaling=None,
    tie_word_embeddings=False,
)
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
APPLIED = ("o_proj", "mlp.gate.weight", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "shared_experts", "mlp.experts")


def moved(model, seed: int, parts: tuple[str, ...], scale: float = 0.05):
    """The named weights move by `scale` of their spread (the routed experts by half, as experts_moved)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and any(p in name for p in parts):
                param.add_((0.5 if "mlp.experts" in name else scale) * param.std() * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """base; applied (wo, dense FFN, shared and routed experts, router moved); mla (the MLA projections and
    one o_proj); head (the LM head alone)."""
    root = tmp_path_factory.mktemp("deepseek2")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**DEEPSEEK))
    save(base, root / "base")
    fresh = lambda: transformers.AutoModelForCausalLM.from_pretrained(root / "base")  # noqa: E731
    save(moved(fresh(), 1, APPLIED), root / "applied")
    save(moved(fresh(), 2, (*MLA, "layers.0.self_attn.o_proj"), 0.3), root / "mla")
    save(moved(fresh(), 3, ("lm_head",), 0.3), root / "head")
    return root


def routes_of(root: Path, kit: str) -> dict[str, tuple[Path, Path]]:
    base, aligned = root / "base", root / kit
    return {"hf": (base, aligned), "gguf": (to_gguf(base), to_gguf(aligned)), "mixed": (base, to_gguf(aligned))}


def test_deepseek2_applied_deltas_reproduce_the_aligned_model(deepseek, tmp_path, capsys):
    """wo, the dense FFN, shared and routed experts (3-D per-expert pairs) and the router, on every route."""
    for route, (b, a) in routes_of(deepseek, "applied").items():
        out = tmp_path / f"{route}.gguf"
        convert(out, "--base", str(b), "--aligned", str(a), "--json")
        report = json.loads(capsys.readouterr().out)
        exps = [t["name"] for t in report["tensors"] if "_exps." in t["name"]]
        assert sorted(exps) == [f"blk.1.ffn_{k}_exps.weight" for k in ("down", "gate", "up")], route
        assert {"blk.0.ffn_gate.weight", "blk.1.ffn_gate_shexp.weight", "blk.1.ffn_gate_inp.weight"} <= {
            t["name"] for t in report["tensors"]
        }
        assert not report["skipped"], (route, report["skipped"])
        got = ratio(to_gguf(deepseek / "base"), to_gguf(deepseek / "applied"), out)
        assert got <= 0.01, f"deepseek2 {route} pair: KL ratio {got:.4f}"


def test_deepseek2_mla_deltas_are_booked_as_not_applied(deepseek, tmp_path, capsys):
    """The MLA projections' deltas (kv_b_proj as the converter's attn_k_b + attn_v_b) are booked with their
    reason, the same on every route."""
    from safetensors.torch import load_file

    got = {}
    for route, (b, a) in routes_of(deepseek, "mla").items():
        convert(tmp_path / f"{route}.gguf", "--base", str(b), "--aligned", str(a), "--json")
        report = json.loads(capsys.readouterr().out)
        assert [t["name"] for t in report["tensors"]] == ["blk.0.attn_output.weight"], route
        got[route] = {s["name"]: (s["energy"], s["reason"]) for s in report["skipped"]}
    want = got["gguf"]
    kinds = ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b")
    assert set(want) == {f"blk.{i}.{k}.weight" for i in range(COMMON["num_hidden_layers"]) for k in kinds}
    for name, (_, reason) in want.items():
        assert "deepseek2" in reason and "LoRA path" in reason, (name, reason)
    for route, energies in got.items():
        assert set(energies) == set(want), route
        for name, (energy, reason) in want.items():
            assert energies[name][0] == pytest.approx(energy, rel=1e-4) and energies[name][1] == reason, (route, name)
    b, a = load_file(deepseek / "base" / "model.safetensors"), load_file(deepseek / "mla" / "model.safetensors")
    kv_b = "model.layers.1.self_attn.kv_b_proj.weight"
    split = want["blk.1.attn_k_b.weight"][0] + want["blk.1.attn_v_b.weight"][0]
    assert split == pytest.approx(float(((a[kv_b] - b[kv_b]).double() ** 2).sum()), rel=1e-4)


def without_not_applied(monkeypatch):
    import dataclasses

    for table in (arches.HF_ARCHITECTURES, arches.GGUF_ARCHITECTURES):
        for key, spec in list(table.items()):
            if spec.gguf_name == "deepseek2":
                monkeypatch.setitem(table, key, dataclasses.replace(spec, not_applied=()))


def test_deepseek2_not_applied_rows_are_what_llama_cpp_ignores(deepseek, tmp_path, monkeypatch, capsys):
    """The NOT_APPLIED row against llama.cpp itself: adapters on the 2-D MLA projections and on the LM head,
    written anyway, load and change nothing, while the aligned models differ from the base."""
    base = to_gguf(deepseek / "base")
    plain = logits(base)
    head = to_gguf(deepseek / "head")
    args = ["convert", "--base", str(base), "--aligned", str(head), "--out", str(tmp_path / "x.gguf")]
    assert main(args) != 0  # the LM head is all that moved: nothing llama.cpp applies
    err = capsys.readouterr().err
    assert "output.weight: deepseek2: llama.cpp's graph multiplies output without its LoRA path" in err
    wo_only = tmp_path / "wo-only.gguf"
    convert(wo_only, "--base", str(base), "--aligned", str(to_gguf(deepseek / "mla")))
    capsys.readouterr()
    without_not_applied(monkeypatch)
    for kit, kinds in {"mla": {"attn_q_a", "attn_q_b", "attn_kv_a_mqa"}, "head": {"output"}}.items():
        aligned = to_gguf(deepseek / kit)
        out = tmp_path / f"{kit}.gguf"
        convert(out, "--base", str(base), "--aligned", str(aligned), "--json")
        names = {
            t["name"].split(".")[2] if t["name"].startswith("blk.") else t["name"][:-7]
            for t in json.loads(capsys.readouterr().out)["tensors"]
        }
        assert kinds <= names, (kit, names)
        want = logits(base, wo_only) if kit == "mla" else plain  # what llama.cpp applies of the aligned's delta
        assert np.abs(logits(aligned) - want).max() > 0.01, kit  # the ignored deltas do move the model
        np.testing.assert_allclose(logits(base, out), want, rtol=0, atol=1e-4, err_msg=kit)


def test_deepseek2_lite_q_proj_is_booked_and_ignored_by_llama_cpp(tmp_path, monkeypatch, capsys):
    """DeepSeek-V2-Lite's layout (q_proj, no q_lora_rank; llama.cpp reads it as Lite at 26 or 27 layers):
    its attn_q delta is booked with the deepseek2 reason on both routes, and an adapter on it, written
    anyway, changes nothing in llama.cpp."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.DeepseekV2Config(**dict(DEEPSEEK, num_hidden_layers=26, q_lora_rank=None))
    )
    save(model, tmp_path / "base")
    save(moved(model, 5, ("self_attn.q_proj", "layers.0.self_attn.o_proj"), 1.0), tmp_path / "aligned")
    base, aligned = to_gguf(tmp_path / "base"), to_gguf(tmp_path / "aligned")
    for route, (b, a) in {"hf": (tmp_path / "base", tmp_path / "aligned"), "gguf": (base, aligned)}.items():
        convert(tmp_path / f"{route}.gguf", "--base", str(b), "--aligned", str(a), "--json")
        report = json.loads(capsys.readouterr().out)
        assert [t["name"] for t in report["tensors"]] == ["blk.0.attn_output.weight"], route
        reasons = {s["name"]: s["reason"] for s in report["skipped"]}
        assert set(reasons) == {f"blk.{i}.attn_q.weight" for i in range(26)}, route
        assert all("deepseek2" in r and "LoRA path" in r for r in reasons.values()), route
    without_not_applied(monkeypatch)
    convert(tmp_path / "q.gguf", "--base", str(base), "--aligned", str(aligned), "--json")
    assert len(json.loads(capsys.readouterr().out)["tensors"]) == 27  # attn_q of every layer, and wo
    applied = logits(base, tmp_path / "gguf.gguf")  # wo alone
    assert np.abs(logits(aligned) - applied).max() > 1e-3  # the q_proj deltas do move the model
    np.testing.assert_allclose(logits(base, tmp_path / "q.gguf"), applied, rtol=0, atol=1e-5)
