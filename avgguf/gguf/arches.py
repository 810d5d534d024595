"""Architectures avgguf converts, and the llama-family Q/K row permutation of llama.cpp's converter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import gguf

from avgguf.errors import ConversionError


@dataclass(frozen=True)
class ArchSpec:
    model_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's LlamaModel.permute on q_proj/k_proj rows

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.model_arch]


# Hugging Face `architectures[0]` -> how llama.cpp's convert_hf_to_gguf.py writes it.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, False),
}
GGUF_ARCHITECTURES = {spec.gguf_name: spec for spec in HF_ARCHITECTURES.values()}
# config.json `model_type` -> architecture, for configs whose `architectures` is missing or null (what
# transformers writes for a model loaded with `gguf_file=`).
HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def supported_list() -> str:
    hf = ", ".join(sorted(HF_ARCHITECTURES))
    return f"{hf} (GGUF: {', '.join(sorted(GGUF_ARCHITECTURES))})"


def spec_for_hf(architecture: str | None, where: str) -> ArchSpec:
    spec = HF_ARCHITECTURES.get(architecture or "")
    if spec is None:
        raise ConversionError(f"{where}: architecture {architecture!r} is not supported; supported: {supported_list()}")
    return spec


def spec_for_hf_config(config: dict, where: str) -> ArchSpec:
    """From `architectures[0]`, else from `model_type` when `architectures` is missing or null."""
    archs = config.get("architectures") or [None]
    architecture = archs[0] if isinstance(archs, list) else None
    if architecture is None:
        model_type = config.get("model_type")
        architecture = HF_MODEL_TYPES.get(model_type or "")
        if architecture is None:
            raise ConversionError(
                f"{where}: no 'architectures' and model_type {model_type!r} is not supported; "
                f"supported model types: {', '.join(sorted(HF_MODEL_TYPES))}"
            )
    return spec_for_hf(architecture, where)


def spec_for_gguf(arch: str, where: str) -> ArchSpec:
    spec = GGUF_ARCHITECTURES.get(arch)
    if spec is None:
        raise ConversionError(f"{where}: GGUF architecture {arch!r} is not supported; supported: {supported_list()}")
    return spec


def qk_heads(spec: ArchSpec, gguf_name: str, n_head: int, n_head_kv: int) -> tuple[int, int] | None:
    """(n_head, n_head_kv) for permute_rows if llama.cpp's converter permutes this tensor's rows, else None."""
    if not spec.permute_qk or not gguf_name.startswith("blk."):
        return None
    if ".attn_q." in gguf_name:
        return n_head, n_head
    if ".attn_k." in gguf_name:
        return n_head, n_head_kv
    return None


def permute_rows(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp LlamaModel.permute: HF (rotate-half) row order -> GGUF (interleaved) row order.

    Works on a weight (out, in), a bias (out,) or a LoRA B factor (out, r): rows only.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Inverse of permute_rows (GGUF row order -> HF row order)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
