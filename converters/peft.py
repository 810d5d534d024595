"""PEFT LoRA directory -> GGUF LoRA adapter (the AV is the LoRA's own delta, scaled as PEFT applies it)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import gguf

from avgguf.gguf import adapter_format as fmt
from avgguf.errors import ConversionError
from avgguf.gguf.arches import hf_language_name, permute_rows, qk_heads
from .convert import AdapterBuild, ConversionReport
from .lowrank import RankPolicy, factorize_product
from .sources import TensorSource

PREFIX = "base_model.model."
KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$"
)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or its dotted suffix."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_peft_config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"--peft {str(path)!r}: adapter_config.json not found (expected a PEFT LoRA directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"--peft {str(cfg_path)!r} is not valid JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"--peft {str(cfg_path)!r}: peft_type {cfg.get('peft_type')!r}; only LORA is supported")
    if cfg.get("use_dora"):
        raise ConversionError(
            f"--peft {str(cfg_path)!r}: DoRA adapters (use_dora) are not supported; "
            f"merge the adapter and convert the merged model with --aligned"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise ConversionError(f"--peft {str(cfg_path)!r}: key {key!r} missing or not a number")
    return cfg


def _read_factors(path: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors import safe_open
    import torch

    st = path / "adapter_model.safetensors"
    if not st.is_file():
        raise ConversionError(
            f"--peft {str(path)!r}: adapter_model.safetensors not found "
            f"(adapter_model.bin is not supported: save with safe_serialization=True)"
        )
    modules: dict[str, dict[str, np.ndarray]] = {}
    try:
        handle = safe_open(str(st), framework="pt")
        keys = list(handle.keys())
    except Exception as exc:
        raise ConversionError(f"--peft {str(st)!r} is not a readable safetensors file ({exc})") from None
    for key in keys:
        m = KEY_RE.match(key[len(PREFIX) :] if key.startswith(PREFIX) else key)
        if m is None:
            raise ConversionError(
                f"--peft {str(st)!r}: tensor {key!r} is not a LoRA factor (modules_to_save and "
                f"other extras are not supported); merge the adapter and use --aligned"
            )
        modules.setdefault(m["module"], {})[m["kind"]] = handle.get_tensor(key).to(torch.float32).numpy()
    return modules


def _target(module: str, base: TensorSource, tmap) -> str:
    """The base GGUF tensor a PEFT module adapts (a clear error where there is none)."""
    if base.arch.moe and (".experts" in module or module.endswith(".experts")):
        raise ConversionError(
            f"--peft: module {module!r} is a MoE expert block: per-expert adapter pairs (3-D in llama.cpp) "
            f"are not written by avgguf yet; train the LoRA without the experts (target_modules "
            f"without 'experts'), or merge it and convert the pair (--aligned)"
        )
    text_module = hf_language_name(base.arch, module) or module
    gguf_name = tmap.get_name(text_module + ".weight", try_suffixes=(".weight",))
    if gguf_name is None or gguf_name not in base.names():
        raise ConversionError(
            f"--peft: module {module!r} has no tensor in base {base.path} "
            f"({base.arch.gguf_name}); is the adapter for another model?"
        )
    return gguf_name


def _factors(module: str, parts: dict, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) with delta = left @ right in the base's (out, in) order, PEFT's scaling applied."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    ka, kb = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if ka not in parts or kb not in parts:
        raise ConversionError(f"--peft: module {module!r} has only {sorted(parts)}; {ka} and {kb} come in pairs")
    a, b = parts[ka], parts[kb]
    r = a.shape[0]
    rank_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    if int(rank_cfg) != r:
        raise ConversionError(f"--peft: module {module!r} has rank {r} in its tensors but {rank_cfg} in adapter_config.json")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if embedding:  # PEFT: delta_E (vocab, embd) = scaling * (B @ A).T with A (r, vocab), B (embd, r)
        return a.T * scaling, b.T
    return b * scaling, a  # delta_W (out, in) = scaling * B @ A


def _pair(module: str, parts: dict, cfg: dict, base: TensorSource, gguf_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The module's factors in GGUF layout (Q/K rows permuted), checked against the base tensor."""
    left, right = _factors(module, parts, cfg)
    shape = (left.shape[0], right.shape[1])
    if tuple(base.shape(gguf_name)) != shape:
        raise ConversionError(
            f"--peft: module {module!r}: the LoRA gives a delta of shape {shape} but base "
            f"tensor {gguf_name!r} is {tuple(base.shape(gguf_name))}; the adapter was "
            f"trained on another model"
        )
    heads = qk_heads(base.arch, gguf_name, base.n_head, base.n_head_kv)
    if heads:
        left = permute_rows(left, *heads)
    if not (np.all(np.isfinite(left)) and np.all(np.isfinite(right))):
        raise ConversionError(f"--peft: module {module!r} has NaN/Inf values")
    return left, right


def convert_peft(
    peft_dir: str | Path,
    base: TensorSource,
    out: str | Path,
    *,
    name: str,
    domain: str | None = None,
    policy: RankPolicy | None = None,
    dtype: str = "f16",
    device: str = "cpu",
    progress: bool = False,
    force: bool = False,
) -> ConversionReport:
    path = Path(peft_dir)
    if not path.is_dir():
        raise ConversionError(f"--peft {str(path)!r} is not a directory")
    cfg = read_peft_config(path)
    modules = _read_factors(path)
    tmap = gguf.get_tensor_name_map(base.arch.model_arch, base.n_layer)
    tied = base.tied_embeddings
    build = AdapterBuild(out, base.arch.gguf_name, name, dtype, force=force, inputs=(base.path, path))
    try:
        for module, parts in sorted(modules.items()):
            gguf_name = _target(module, base, tmap)
            left, right = _pair(module, parts, cfg, base, gguf_name)
            reason = fmt.unapplicable_reason(gguf_name, 2, tied)
            factors = factorize_product(left, right, policy, device)
            if reason:
                build.skip(gguf_name, factors.energy, reason)
                continue
            build.add(gguf_name, (left.shape[0], right.shape[1]), factors, (left @ right) if policy is not None else None)
        meta = {
            fmt.KEY_NAME: name,
            fmt.KEY_DOMAIN: domain or name,
            fmt.KEY_SOURCE_KIND: "peft",
            fmt.KEY_SOURCE_BASE: str(base.path),
            fmt.KEY_SOURCE_ALIGNED: str(path),
            fmt.KEY_RANK_POLICY: policy.describe() if policy else "peft ranks",
            fmt.KEY_SVD: "product-svd",
            fmt.KEY_BASE_N_LAYER: base.n_layer,
            fmt.KEY_BASE_N_EMBD: base.n_embd,
        }
        return build.commit(meta)
    except BaseException:
        build.writer.abort()
        raise
