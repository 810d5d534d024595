"""Architectures: one rule table for what llama.cpp's converter (convert_hf_to_gguf.py, conversion/*.py) does
to a Hugging Face checkpoint's tensors, and what llama.cpp's graph never routes through its LoRA path.

A GGUF pair needs none of the HF rules (the converter already wrote both sides the same way): any
architecture gguf-py names converts from two GGUFs. HF checkpoints and PEFT LoRAs need the architecture's
rules, so they are accepted only for the architectures in HF_ARCHITECTURES. Each row was read in the
converter's source of the llama.cpp that llama-cpp-python 0.3.36 vendors, and is checked against that
converter by tests/test_architectures.py where it is available.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import gguf
import numpy as np

from avgguf.errors import ConversionError

# Tensors the converter generates (not weights of the checkpoint): present only on the GGUF side of a pair.
GGUF_ONLY = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# Where llama.cpp's graph multiplies a tensor with plain ggml_mul_mat (no build_lora_mm): an adapter pair on
# it would load and do nothing. From src/models/*.cpp; keyed by GGUF architecture, tensor kind (blk.N.KIND).
NOT_APPLIED = {
    "deepseek2": ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_kv_b", "output"),
}
# MoE expert weights: per-expert in HF checkpoints, stacked 3-D (ffn_*_exps) in GGUF.
HF_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass(frozen=True)
class ArchSpec:
    gguf_name: str  # general.architecture
    permute_qk: bool = False  # llama.cpp's LlamaModel.permute on q_proj/k_proj rows
    norm_shift: float = 0.0  # added to every norm weight by the converter (Gemma: +1)
    strip_prefixes: tuple[str, ...] = ()  # multimodal: the language model's prefix, dropped before name mapping
    drop_prefixes: tuple[str, ...] = ()  # multimodal: towers that are not the language model
    moe: bool = False  # per-expert weights (stacked into 3-D tensors by the converter)
    hf_layout: bool = True  # the HF rules are known (False: a GGUF-only architecture)
    not_applied: tuple[str, ...] = field(default=())

    @property
    def model_arch(self) -> gguf.MODEL_ARCH:
        return model_arch(self.gguf_name)


def model_arch(name: str) -> gguf.MODEL_ARCH:
    """gguf-py's MODEL_ARCH for a GGUF architecture name; a clear error where the installed gguf lacks it."""
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ConversionError(
        f"architecture {name!r} is unknown to the installed gguf {getattr(gguf, '__version__', '')} "
        f"(gguf-py names {len(gguf.MODEL_ARCH_NAMES)} architectures): upgrade it with `pip install -U gguf`"
    )


def _spec(gguf_name: str, **rules) -> ArchSpec:
    return ArchSpec(gguf_name, not_applied=NOT_APPLIED.get(gguf_name, ()), **rules)


_GEMMA3_VL = dict(
    norm_shift=1.0,
    strip_prefixes=("model.language_model.", "language_model.model.", "language_model."),
    drop_prefixes=("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector."),
)
# Hugging Face `architectures[0]` -> how llama.cpp's converter writes it.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": _spec("llama", permute_qk=True),
    "MistralForCausalLM": _spec("llama", permute_qk=True),
    "MixtralForCausalLM": _spec("llama", permute_qk=True, moe=True),
    "Qwen2ForCausalLM": _spec("qwen2"),
    "Qwen3ForCausalLM": _spec("qwen3"),
    "Qwen3MoeForCausalLM": _spec("qwen3moe", moe=True),
    "Gemma2ForCausalLM": _spec("gemma2", norm_shift=1.0),
    "Gemma3ForCausalLM": _spec("gemma3", norm_shift=1.0),
    "Gemma3ForConditionalGeneration": _spec("gemma3", **_GEMMA3_VL),
    "Phi3ForCausalLM": _spec("phi3"),  # fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up: kept fused
    "GraniteForCausalLM": _spec("granite", permute_qk=True),
    "Olmo2ForCausalLM": _spec("olmo2"),
    "SmolLM3ForCausalLM": _spec("smollm3", permute_qk=True),
}
# config.json `model_type` -> architecture, for configs whose `architectures` is missing or null (what
# transformers writes for a model loaded with `gguf_file=`).
HF_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
# GGUF architecture -> the HF rules that produced it (one HF row per GGUF name; llama: Llama/Mistral's)
GGUF_ARCHITECTURES = {}
for _spec_row in HF_ARCHITECTURES.values():
    GGUF_ARCHITECTURES.setdefault(_spec_row.gguf_name, _spec_row)


def supported_list() -> str:
    return f"{', '.join(sorted(HF_ARCHITECTURES))} (a GGUF pair: any architecture gguf-py knows)"


def spec_for_hf(architecture: str | None, where: str) -> ArchSpec:
    spec = HF_ARCHITECTURES.get(architecture or "")
    if spec is None:
        raise ConversionError(
            f"{where}: architecture {architecture!r} is not supported for Hugging Face checkpoints and PEFT "
            f"LoRAs; supported: {supported_list()}. Any architecture converts from two GGUFs (convert both "
            f"checkpoints with llama.cpp's convert_hf_to_gguf.py, then `avgguf convert --base base.gguf "
            f"--aligned aligned.gguf`)"
        )
    model_arch(spec.gguf_name)
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
    """Any architecture gguf-py names; `hf_layout` tells whether its HF rules are known (PEFT export)."""
    spec = GGUF_ARCHITECTURES.get(arch)
    if spec is not None:
        return spec
    try:
        model_arch(arch)
    except ConversionError as exc:
        raise ConversionError(f"{where}: {exc}") from None
    return _spec(arch, hf_layout=False)


def unapplied_reason(spec: ArchSpec, gguf_name: str) -> str | None:
    """Why llama.cpp's graph for this architecture never applies a LoRA on this tensor, or None."""
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else gguf_name.rsplit(".", 1)[0]
    if kind in spec.not_applied:
        return f"{spec.gguf_name}: llama.cpp's graph multiplies {kind} without its LoRA path (src/models)"
    return None


def hf_language_name(spec: ArchSpec, hf_name: str) -> str | None:
    """A checkpoint tensor's name as the text model's (multimodal prefixes stripped); None for a tower that
    is not the language model."""
    if any(hf_name.startswith(p) for p in spec.drop_prefixes):
        return None
    for prefix in spec.strip_prefixes:
        if hf_name.startswith(prefix):
            rest = hf_name[len(prefix) :]
            return rest if rest.startswith(("model.", "lm_head")) else "model." + rest
    return hf_name


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
