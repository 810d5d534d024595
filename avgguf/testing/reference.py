"""Full-precision references for the benchmarks and training recipes: a Hugging Face checkpoint of the
embedded SmolLM2's shape (a DPO or SFT run of recipes/) as an f32 GGUF laid out like the embedded one (same
metadata and tokenizer; avgguf's name map and Q/K permutation). Needs the convert extra (safetensors)."""

from __future__ import annotations

from pathlib import Path


def f32_gguf(hf_dir: Path, out: Path) -> Path:
    """`hf_dir`'s weights in float32 under the embedded SmolLM2 GGUF's metadata, written to `out`; ValueError
    naming the first tensor the checkpoint lacks."""
    import gguf

    from avgguf.config.builtin import builtin_path
    from avgguf.converters.sources import HFCheckpoint
    from avgguf.gguf.model_copy import copy_gguf

    hf = HFCheckpoint(Path(hf_dir), "checkpoint")
    names = [t.name for t in gguf.GGUFReader(builtin_path()).tensors]
    missing = [n for n in names if n not in hf.names()]
    if missing:
        raise ValueError(f"{missing[0]} missing from {hf_dir}: not a checkpoint of the embedded SmolLM2's shape")
    return copy_gguf(builtin_path(), out, {n: hf.load(n) for n in names})
