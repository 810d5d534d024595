"""A profile as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for transformers+peft,
vLLM, LoRAX and SGLang: Hugging Face module names of the base's architecture (the inverse of llama.cpp's
converter, avgguf.gguf.arches), llama.cpp's Q/K row permutation undone where the architecture's rule permutes,
every module at one rank with lora_alpha = r, so PEFT's scale alpha/r is 1 and B @ A is the fused delta itself.

The rank is rounded up (zero padding, which changes nothing) to the next one vLLM accepts (VLLM_RANKS); no
modules_to_save, no bias, no DoRA, keys as save_pretrained writes them (LoRAX and SGLang read that directory).
MoE experts (3-D pairs on ffn_{gate,up,down}_exps) are written per expert under the hub checkpoint's names
(`mlp.experts.N.gate_proj` for Qwen3-MoE, `block_sparse_moe.experts.N.w1/w3/w2` for Mixtral), the layout PEFT
saves for transformers 4 and PEFT 0.21 converts on load for transformers 5's fused experts; the router is
`mlp.gate` / `block_sparse_moe.gate`. The directory is published by avgguf.atomic.output_dir (an existing one is
replaced only if it is an earlier avgguf PEFT export, or with --force, which keeps the other files)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np

from avgguf.gguf import adapter_format as fmt
from avgguf import atomic
from avgguf.errors import AvggufError
from avgguf.gguf.fuse import write_fused

log = logging.getLogger(__name__)

# ranks vLLM's LoRA manager accepts (max_lora_rank choices)
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# GGUF block tensor -> Hugging Face module (llama, mistral, qwen2/3, gemma2/3, granite, olmo2, smollm3 share these)
BLOCK_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# per GGUF architecture: what differs from BLOCK_MODULES (None: no Hugging Face module; MoE experts per expert)
ARCH_MODULES = {
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj", "ffn_gate": None},  # kept fused
    "qwen3moe": {
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
        "ffn_up_exps": "mlp.experts.{e}.up_proj",
        "ffn_down_exps": "mlp.experts.{e}.down_proj",
    },
    "llama": {  # Mixtral (GGUF architecture llama with experts)
        "ffn_gate_inp": "block_sparse_moe.gate",
        "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
        "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
        "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
    },
}
TOP_MODULES = {fmt.OUTPUT: "lm_head", fmt.TOKEN_EMBD: "model.embed_tokens"}


def hf_module(gguf_name: str, arch: str = "llama", expert: int | None = None) -> str:
    """The Hugging Face module a GGUF tensor's pair adapts (expert: the index in a 3-D expert stack)."""
    from avgguf.gguf.arches import spec_for_gguf

    if gguf_name in TOP_MODULES:
        return TOP_MODULES[gguf_name]
    spec = spec_for_gguf(arch, "base model")
    if not spec.hf_layout:
        raise AvggufError(
            f"architecture {arch!r}: its Hugging Face module names are not known to the PEFT export (known: "
            f"{', '.join(sorted(_known_arches()))}); use --format adapter (a GGUF LoRA) instead"
        )
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
        modules = {**BLOCK_MODULES, **ARCH_MODULES.get(arch, {})}
        module = modules.get(parts[2])
        if module is not None and ("{e}" in module) == (expert is not None):
            return f"model.layers.{parts[1]}.{module.format(e=expert)}"
    raise AvggufError(f"tensor {gguf_name!r} ({arch}) has no Hugging Face module name known to the PEFT export")


def _known_arches() -> set[str]:
    from avgguf.gguf.arches import GGUF_ARCHITECTURES

    return set(GGUF_ARCHITECTURES)


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank` (zero padding); `rank` itself above vLLM's largest."""
    return next((r for r in VLLM_RANKS if r >= rank), rank)


def _heads(base: Path) -> tuple[str, int, int]:
    reader = gguf.GGUFReader(base)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    n_head = int(reader.get_field(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)).contents())
    kv = reader.get_field(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch))
    return arch, n_head, int(kv.contents()) if kv else n_head


def _padded(x: np.ndarray, rank: int, axis: int) -> np.ndarray:
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, rank - x.shape[axis])
    return np.pad(x, pad)


def peft_tensors(fused: Path, arch: str, n_head: int, n_head_kv: int) -> tuple[dict[str, np.ndarray], int, list]:
    """(safetensors dict, rank, target module leaf names) of the fused adapter in PEFT's layout."""
    from avgguf.gguf.arches import qk_heads, spec_for_gguf, unpermute_rows

    spec = spec_for_gguf(arch, "base model")
    info = fmt.read_adapter(fused)
    tensors = {t.name: t for t in gguf.GGUFReader(fused).tensors}
    rank = vllm_rank(max(p.rank for p in info.pairs.values()))
    out, modules = {}, []

    def linear(module: str, a: np.ndarray, b: np.ndarray) -> None:
        out[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(_padded(a, rank, 0))
        out[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(_padded(b, rank, 1))
        modules.append(module.rsplit(".", 1)[-1])

    for base, _ in sorted(info.pairs.items()):
        a, b = fmt.tensor_floats(tensors[base + fmt.LORA_A]), fmt.tensor_floats(tensors[base + fmt.LORA_B])
        if fmt.is_expert(base) and a.ndim == 3:  # lora_a (E, r, in), lora_b (E, out, r): one LoRA per expert
            for e in range(a.shape[0]):
                linear(hf_module(base, arch, e), a[e], b[e])
            continue
        module = hf_module(base, arch)
        if base == fmt.TOKEN_EMBD:  # delta (vocab, embd) = lora_a @ lora_b.T; PEFT: (B @ A).T
            prefix = f"base_model.model.{module}"
            out[f"{prefix}.lora_embedding_A"] = np.ascontiguousarray(_padded(a, rank, 1).T)
            out[f"{prefix}.lora_embedding_B"] = np.ascontiguousarray(_padded(b, rank, 1))
            modules.append(module.rsplit(".", 1)[-1])
            continue
        heads = qk_heads(spec, base, n_head, n_head_kv)
        if heads is not None:
            b = unpermute_rows(b, *heads)
        linear(module, a, b)
    return out, rank, sorted(set(modules))


def peft_dir(bake, out: Path) -> dict:
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise AvggufError("--format peft needs safetensors: pip install safetensors") from None
    if not bake.active:
        raise AvggufError(f"profile {bake.label!r} has every coefficient at 0: nothing to export")
    arch, n_head, n_head_kv = _heads(bake.modelfile.base_path)
    with atomic.output_dir(out, "peft", force=bake.force, inputs=bake.inputs()) as d:
        fused = write_fused(bake.active, d.path / "fused.gguf", arch)
        weights, rank, modules = peft_tensors(fused, arch, n_head, n_head_kv)
        fused.unlink()
        meta = bake.metadata()
        save_file(
            weights,
            str(d.path / "adapter_model.safetensors"),
            metadata={"format": "pt", **{k: json.dumps(v) for k, v in meta.items()}},
        )
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": rank,
            "target_modules": [m for m in modules if m != "embed_tokens"] or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "inference_mode": True,
            "base_model_name_or_path": None,
        }  # the base is a GGUF; avgguf.json names it
        if "embed_tokens" in modules:
            config["target_modules"] = (config["target_modules"] or []) + ["embed_tokens"]
        (d.path / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        d.meta.update({**meta, "base_gguf": str(bake.modelfile.base_path)})
    report = {"format": "peft", "rank": rank, "modules": modules, "tensors": len(weights)}
    if rank not in VLLM_RANKS:
        report["warning"] = f"rank {rank} is above {VLLM_RANKS[-1]}, the largest vLLM accepts"
        log.warning("PEFT export: %s (bake fewer AVs, or re-compress them with --format adapter --rank)", report["warning"])
    return report
