"""The suite's fixtures: tiny synthetic pairs per architecture, the tiny kit (a base, two AVs and a
modelfile naming them) and its batching Runtime. The helpers they are built from live in avgguf.testing,
shared with bench/."""

from __future__ import annotations

import pytest
import yaml

from avgguf.testing.synthetic import Pair, Spec, make_pair

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


@pytest.fixture(scope="module")
def rt(tiny_kit):
    """The tiny kit's modelfile as a Runtime with synchronous fusion (the batching tests' engine)."""
    from avgguf.config.modelfile import load_modelfile
    from avgguf.runtime.session import Runtime

    root, *_ = tiny_kit
    runtime = Runtime(load_modelfile(root / "tiny.yaml"), fuse="sync")
    yield runtime
    runtime.close()
