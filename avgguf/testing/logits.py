"""Logits from real llama.cpp (all positions, adapters at given scales, f32 KV cache) and the tolerance the
tests compare them with; merged_logits is the reference a live or baked coefficient set must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avgguf.testing.synthetic import Delta, Pair, representable, to_gguf_tensors, write_gguf

F32 = 0  # GGML_TYPE_F32
TOKENS = [1, 270, 280, 290, 65, 100, 200, 150, 33, 299]


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


def merged_logits(p: Pair, q: Pair, a: float, b: float) -> np.ndarray:
    """Logits of p's base with a·(p's representable delta) + b·(q's delta) merged into its weights (float32)."""
    d = Delta({k: a * v + b * q.delta.tensors[k] for k, v in representable(p.spec, p.delta).tensors.items()})
    path = p.root / f"merged_{a}_{b}.gguf"
    if not path.exists():
        write_gguf(path, p.spec, to_gguf_tensors(p.spec, d.applied_to(p.weights)))
    return logits(path)
