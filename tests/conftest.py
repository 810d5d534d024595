from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import (
    Delta,
    Spec,
    hf_weights,
    random_delta,
    representable,
    to_gguf_tensors,  # noqa: E402
    write_gguf,
    write_hf,
)

F32 = 0  # GGML_TYPE_F32
TOKENS = [1, 270, 280, 290, 65, 100, 200, 150, 33, 299]


@dataclass
class Pair:
    """A tiny base model (HF dir + GGUF) and an aligned variant with a known delta."""

    spec: Spec
    weights: dict[str, np.ndarray]
    delta: Delta
    base_hf: Path
    aligned_hf: Path
    base_gguf: Path
    root: Path

    def gguf_of(self, weights: dict[str, np.ndarray], name: str) -> Path:
        path = self.root / name
        if not path.exists():
            write_gguf(path, self.spec, to_gguf_tensors(self.spec, weights))
        return path


def make_pair(root: Path, spec: Spec, delta_seed: int = 1, **delta_kw) -> Pair:
    root.mkdir(parents=True, exist_ok=True)
    w = hf_weights(spec)
    delta = random_delta(spec, w, seed=delta_seed, **delta_kw)
    base_hf = write_hf(root / "base", spec, w)
    aligned_hf = write_hf(root / "aligned", spec, delta.applied_to(w))
    base_gguf = write_gguf(root / "base.gguf", spec, to_gguf_tensors(spec, w))
    return Pair(spec, w, delta, base_hf, aligned_hf, base_gguf, root)


SPECS = {
    "llama-gqa-untied": Spec("llama", tied=False),
    "llama-gqa-tied": Spec("llama", tied=True),
    "qwen2-bias-untied": Spec("qwen2", tied=False, n_head_kv=4),
    "qwen2-bias-tied": Spec("qwen2", tied=True),
}


@pytest.fixture(scope="session", params=sorted(SPECS))
def pair(request, tmp_path_factory) -> Pair:
    return make_pair(tmp_path_factory.mktemp(request.param), SPECS[request.param])


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> Pair:
    return make_pair(tmp_path_factory.mktemp("llama"), SPECS["llama-gqa-untied"])


def logits(model: Path, adapters: dict[Path, float] | None = None, tokens=TOKENS) -> np.ndarray:
    """All-position logits from real llama.cpp, with adapters at the given scales."""
    from avgguf.runtime.engine import Engine

    # f32 KV cache: an f16 cache rounds K/V of both runs differently by an ulp now and then
    eng = Engine(model, n_ctx=64, logits_all=True, type_k=F32, type_v=F32)
    try:
        names = {}
        for i, path in enumerate(adapters or {}):
            names[f"av{i}"] = adapters[path]
            eng.load_adapter(f"av{i}", path)
        eng.set_coefficients(names)
        return eng.all_logits(tokens)
    finally:
        eng.close()


def assert_logits_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"max |logit diff| {err:.3g} > {rel * scale:.3g}"


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory):
    """A tiny llama base with two AVs (medical, legal) and a modelfile naming them."""
    from avgguf.cli import main

    root = tmp_path_factory.mktemp("runtime")
    p = make_pair(root / "med", Spec("llama"), delta_seed=1, include_norms=False)
    q = make_pair(root / "leg", Spec("llama"), delta_seed=2, include_norms=False)
    for pair, name in ((p, "medical"), (q, "legal")):
        assert (
            main(
                [
                    "convert",
                    "--base",
                    str(pair.base_hf),
                    "--aligned",
                    str(pair.aligned_hf),
                    "--out",
                    str(root / f"{name}.gguf"),
                    "--rank",
                    "4096",
                    "--dtype",
                    "f32",
                ]
            )
            == 0
        )
    mf = {
        "base": "med/base.gguf",
        "avs": {"medical": "medical.gguf", "legal": {"path": "legal.gguf"}},
        "profiles": {"expert-medical": {"medical": 1.0, "legal": 0.0}, "mixed": {"medical": 0.5, "legal": -1.0}},
        "defaults": {"max_tokens": 12, "temperature": 0.0, "seed": 0, "n_ctx": 128},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(mf, sort_keys=False))
    return root, p, q


def merged_logits(p, q, a: float, b: float) -> np.ndarray:
    d = Delta({k: a * v + b * q.delta.tensors[k] for k, v in representable(p.spec, p.delta).tensors.items()})
    path = p.root / f"merged_{a}_{b}.gguf"
    if not path.exists():
        write_gguf(path, p.spec, to_gguf_tensors(p.spec, d.applied_to(p.weights)))
    return logits(path)


@pytest.fixture(scope="module")
def rt(tiny_kit):
    """The tiny kit's modelfile as a Runtime with synchronous fusion (the batching tests' engine)."""
    from avgguf.config.modelfile import load_modelfile
    from avgguf.runtime.session import Runtime

    root, *_ = tiny_kit
    runtime = Runtime(load_modelfile(root / "tiny.yaml"), fuse="sync")
    yield runtime
    runtime.close()
