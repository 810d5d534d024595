"""Architectures: one rule table for what llama.cpp's converter (convert_hf_to_gguf.py, conversion/*.py) does
to a Hugging Face checkpoint's tensors, and what llama.cpp's graph never routes through its LoRA path.

A GGUF pair needs none of the HF rules (the converter already wrote both sides the same way): any
architecture gguf-py names converts from two GGUFs. HF checkpoints and PEFT LoRAs need the architecture's
rules, so they are accepted only for the architectures in HF_ARCHITECTURES. Each row was read in the
converter's source of the llama.cpp that llama-cpp-python 0.3.36 vendors, and is checked against that
converter by tests/test_architectures.py where it is available.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from avgguf.errors import ConversionError

# Tensors the converter generates (not weights of the checkpoint): present only on the GGUF side of a pair.
GGUF_ONLY = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# Where llama.cpp's graph multiplies a tensor with plain ggml_mul_mat (no build_lora_mm): an adapter pair on
# it would load and do nothing. From src/models/*.cpp; keyed by GGUF architecture, tensor kind (blk.N.KIND).
NOT_APPLIED = {
    # attn_q: DeepSeek-V2-Lite's q_proj (no q_lora_rank); all checked in llama.cpp by tests/test_architectures.py
    "deepseek2": ("attn_q", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_kv_b", "output"),
}
# MoE expert weights: per-expert in HF checkpoints, stacked 3-D (ffn_*_exps) in GGUF.
HF_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass(frozen=True)
class FusedPart:
    """One GGUF tensor cut out of a fused HF expert parameter: rows start:stop:step of the GGUF out axis
    (axis 1 of (E, out, in) weights and of (E, out) biases), after a transpose of HF's (E, in, out) weights."""

    name: str  # as the converter maps it (gguf-py's name map then gives the GGUF name)
    start: int = 0
    step: int = 1
    transpose: bool = False
    stop: int | None = None

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop, self.step)


# gpt-oss (conversion/gpt_oss.py, GptOssModel.modify_tensors): experts.gate_up_proj (E, embd, 2 n_ff) is
# transposed, then gate = even rows, up = odd rows; down_proj (E, n_ff, embd) is transposed; their biases
# (E, out) are split the same way on their last axis. MXFP4 checkpoints store each weight as `<name>_blocks`
# (E, out, in/32, 16) + `<name>_scales` (E, out, in/32): already (E, out, in) once dequantized (the
# converter repacks them as MXFP4, split even/odd, without a transpose).
_GPT_OSS_EXPERTS = (
    (
        "mlp.experts.gate_up_proj",
        (FusedPart("mlp.experts.gate_proj.weight", 0, 2, True), FusedPart("mlp.experts.up_proj.weight", 1, 2, True)),
    ),
    ("mlp.experts.down_proj", (FusedPart("mlp.experts.down_proj.weight", transpose=True),)),
    (
        "mlp.experts.gate_up_proj_bias",
        (FusedPart("mlp.experts.gate_proj.bias", 0, 2), FusedPart("mlp.experts.up_proj.bias", 1, 2)),
    ),
    ("mlp.experts.down_proj_bias", (FusedPart("mlp.experts.down_proj.bias"),)),
)
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
# MXFP4 e2m1 code -> value (OCP Microscaling v1.0; transformers' FP4_VALUES); a block's scale is 2^(e - 127)
MXFP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF MXFP4 (`*_blocks` (..., G, 16) uint8, two e2m1 codes per byte, low nibble first; `*_scales` (..., G)
    uint8 E8M0) -> float32 (..., G * 32), as transformers' convert_moe_packed_tensors (before its transpose)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ConversionError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up")
    out = np.empty((*blocks.shape[:-1], 32), np.float32)
    out[..., 0::2] = MXFP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = MXFP4_VALUES[blocks >> 4]
    out = np.ldexp(out, scales.astype(np.int32)[..., None] - 127)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


@dataclass(frozen=True)
class ArchSpec:
    gguf_name: str  # general.architecture
    permute_qk: bool = False  # llama.cpp's LlamaModel.permute on q_proj/k_proj rows
    norm_shift: float = 0.0  # added to every norm weight by the converter (Gemma: +1)
    strip_prefixes: tuple[str, ...] = ()  # multimodal: the language model's prefix, dropped before name mapping
    drop_prefixes: tuple[str, ...] = ()  # multimodal: towers that are not the language model
    moe: bool = False  # per-expert weights (stacked into 3-D tensors by the converter)
    # GGUF tensors the converter cuts to the tokenizer's real vocabulary (Gemma3: token_embd; see real_vocab)
    vocab_trim: tuple[str, ...] = ()
    # fused 3-D expert parameters, split (and transposed) by the converter: HF name suffix -> parts
    fused_experts: tuple[tuple[str, tuple[FusedPart, ...]], ...] = ()
    renames: tuple[tuple[str, str], ...] = ()  # HF name suffix -> the one the converter maps (gpt-oss sinks)
    mla: bool = False  # DeepSeek MLA: kv_b_proj split into attn_k_b / attn_v_b, KV heads written as 1 (MQA)
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
    "Gemma3ForCausalLM": _spec("gemma3", norm_shift=1.0, vocab_trim=("token_embd.weight",)),
    "Gemma3ForConditionalGeneration": _spec("gemma3", vocab_trim=("token_embd.weight",), **_GEMMA3_VL),
    "Phi3ForCausalLM": _spec("phi3"),  # fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up: kept fused
    "GraniteForCausalLM": _spec("granite", permute_qk=True),
    "Olmo2ForCausalLM": _spec("olmo2"),
    "SmolLM3ForCausalLM": _spec("smollm3", permute_qk=True),
    # MLA (split_kv_b); experts per expert on disk, stacked; the MLA projections are NOT_APPLIED (booked)
    "DeepseekV2ForCausalLM": _spec("deepseek2", moe=True, mla=True),
    "DeepseekV3ForCausalLM": _spec("deepseek2", moe=True, mla=True),
    # fused experts (_GPT_OSS_EXPERTS; no per-expert weights to stack: moe False); biases everywhere and
    # attention sinks are added outside the LoRA path
    "GptOssForCausalLM": _spec(
        "gpt-oss", fused_experts=_GPT_OSS_EXPERTS, renames=(("self_attn.sinks", "self_attn.sinks.weight"),)
    ),
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
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
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


# ModelBase.filter_tensors, for every architecture (DeepSeek-V3's router bias -> exp_probs_b.bias)
RENAMES = (("e_score_correction_bias", "e_score_correction.bias"),)


def hf_renamed(spec: ArchSpec, text_name: str) -> str:
    """A checkpoint name as the converter's filter_tensors renames it before name mapping."""
    for old, new in (*RENAMES, *spec.renames):
        if text_name.endswith(old):
            return text_name[: -len(old)] + new
    return text_name


def fused_parts(spec: ArchSpec, text_name: str) -> tuple[str, tuple[FusedPart, ...], str] | None:
    """(layer prefix, parts, kind) for a fused expert parameter (kind: "dense", or "blocks"/"scales" for the
    two halves of an MXFP4 weight), None for any other tensor."""
    for suffix, parts in spec.fused_experts:
        for kind, tail in (("dense", ""), ("blocks", MXFP4_BLOCKS), ("scales", MXFP4_SCALES)):
            if kind != "dense" and not parts[0].name.endswith(".weight"):
                continue  # biases stay unquantized
            if text_name.endswith("." + suffix + tail):
                return text_name[: -len(suffix + tail)], parts, kind
    return None


def fused_shape(part: FusedPart, shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The GGUF shape of one part of a fused HF parameter of `shape` (kind "dense" or "blocks")."""
    if kind == "blocks":  # (E, out, G, 16) -> (E, out, 32 G)
        shape = (*shape[:-2], shape[-2] * 32)
    elif part.transpose:
        shape = (*shape[:-2], shape[-1], shape[-2])
    return (shape[0], len(range(shape[1])[part.rows]), *shape[2:])


MLA_KV_B = "self_attn.kv_b_proj.weight"
MLA_PARTS = ("self_attn.k_b_proj.weight", "self_attn.v_b_proj.weight")  # as the converter names them


def split_kv_b(kv_b: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """DeepseekV2Model.modify_tensors: kv_b_proj (n_head_kv (nope + v), kv_lora) -> attn_k_b
    (n_head_kv, kv_lora, nope) (transposed, for the absorption optimization) and attn_v_b (n_head_kv, v, kv_lora),
    with n_head_kv = config num_key_value_heads (the converter writes 1 to the GGUF only after the tensors)."""
    try:
        n_head_kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        nope, v_dim = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"MLA kv_b_proj: config lacks {exc} (qk_nope_head_dim, v_head_dim)") from None
    if kv_b.shape[0] != n_head_kv * (nope + v_dim):
        raise ConversionError(
            f"MLA kv_b_proj {kv_b.shape}: {kv_b.shape[0]} rows are not num_key_value_heads {n_head_kv} x "
            f"(qk_nope_head_dim {nope} + v_head_dim {v_dim})"
        )
    kv = kv_b.reshape(n_head_kv, nope + v_dim, kv_b.shape[-1])
    return np.ascontiguousarray(kv[:, :nope].swapaxes(1, 2)), np.ascontiguousarray(kv[:, nope:])


def real_vocab(spec: ArchSpec, directory: Path, config: dict) -> int | None:
    """How many rows llama.cpp's converter keeps of the `spec.vocab_trim` tensors (None: no trim), counted
    as Gemma3Model.modify_tensors counts them ("remove OOV rows in token_embd"):

    - with a SentencePiece tokenizer.model: the length of _create_vocab_sentencepiece's token list, which is
      the hparams' vocab_size_per_layer_input or vocab_size (text_config over the top level), padded: so no
      trim for a checkpoint whose config names its vocab_size;
    - else len(tokenizer.json's model.vocab) + len(its added_tokens) (added tokens that are also in the vocab
      count twice, as the converter counts them).

    The converter keeps `rows[:n]`, so an n at or above the row count keeps every row. Its token list
    (set_vocab) is padded to vocab_size either way: a GGUF whose token_embd it did trim loads in llama.cpp
    only where that token list has the trimmed length."""
    if not spec.vocab_trim:
        return None
    hparams = {**config, **(config.get("text_config") or {})}  # as the converter's TextModel merges them
    if (directory / "tokenizer.model").is_file():
        n = hparams.get("vocab_size_per_layer_input") or hparams.get("vocab_size")
        return int(n) if n else None  # absent: the converter takes transformers' default (the row count)
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.is_file():
        return None  # llama.cpp's converter fails on this checkpoint (it reads tokenizer.json to trim)
    try:
        data = json.loads(tokenizer.read_text(encoding="utf-8"))
        return len(data["model"]["vocab"]) + len(data.get("added_tokens") or [])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ConversionError(
            f"{str(tokenizer)!r}: llama.cpp's converter trims {spec.gguf_name}'s {', '.join(spec.vocab_trim)} "
            f"to this tokenizer's vocabulary (model.vocab + added_tokens), which it cannot read ({exc})"
        ) from None


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
