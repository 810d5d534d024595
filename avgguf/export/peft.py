"""A profile as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for transformers+peft,
vLLM and LoRAX: Hugging Face module names, llama.cpp's Q/K row permutation undone, every module at one rank
(smaller ranks zero-padded, which changes nothing) with lora_alpha = r, so PEFT's scale alpha/r is 1 and
B @ A is the fused delta itself. The directory is published by avgguf.atomic.output_dir (an existing one is
replaced only if it is an earlier avgguf PEFT export, or with --force, which keeps the other files)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from avgguf.gguf import adapter_format as fmt
from avgguf import atomic
from avgguf.errors import AvggufError
from avgguf.gguf.fuse import write_fused

# GGUF block tensor -> Hugging Face module (llama, mistral and qwen2 share these names)
BLOCK_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_MODULES = {fmt.OUTPUT: "lm_head", fmt.TOKEN_EMBD: "model.embed_tokens"}
PERMUTED = {"attn_q", "attn_k"}  # llama-family rows llama.cpp's converter permutes


def hf_module(gguf_name: str) -> str:
    if gguf_name in TOP_MODULES:
        return TOP_MODULES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK_MODULES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{BLOCK_MODULES[parts[2]]}"
    raise AvggufError(f"tensor {gguf_name!r} has no Hugging Face module name known to the PEFT export")


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
    from avgguf.gguf.arches import qk_heads, spec_for_gguf, unpermute_rows

    spec = spec_for_gguf(arch, "base model")
    info = fmt.read_adapter(fused)
    tensors = {t.name: t for t in gguf.GGUFReader(fused).tensors}
    rank = max(p.rank for p in info.pairs.values())
    out, modules = {}, []
    for base, _ in sorted(info.pairs.items()):
        a, b = fmt.tensor_floats(tensors[base + fmt.LORA_A]), fmt.tensor_floats(tensors[base + fmt.LORA_B])
        module = hf_module(base)
        prefix = f"base_model.model.{module}"
        if base == fmt.TOKEN_EMBD:  # delta (vocab, embd) = lora_a @ lora_b.T; PEFT: (B @ A).T
            out[f"{prefix}.lora_embedding_A"] = np.ascontiguousarray(_padded(a, rank, 1).T)
            out[f"{prefix}.lora_embedding_B"] = _padded(b, rank, 1)
        else:
            heads = qk_heads(spec, base, n_head, n_head_kv)
            if heads is not None:
                b = unpermute_rows(b, *heads)
            out[f"{prefix}.lora_A.weight"] = _padded(a, rank, 0)
            out[f"{prefix}.lora_B.weight"] = _padded(b, rank, 1)
        modules.append(module.rsplit(".", 1)[-1])
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
            "inference_mode": True,
            "base_model_name_or_path": None,
        }  # the base is a GGUF; avgguf.json names it
        if "embed_tokens" in modules:
            config["target_modules"] = (config["target_modules"] or []) + ["embed_tokens"]
        (d.path / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        d.meta.update({**meta, "base_gguf": str(bake.modelfile.base_path)})
    return {"format": "peft", "rank": rank, "modules": modules, "tensors": len(weights)}
