"""PEFT LoRA directory -> GGUF LoRA adapter (the AV is the LoRA's own delta, scaled as PEFT applies it).

MoE experts come in two layouts, both written as llama.cpp's 3-D per-expert pairs (build_lora_mm_id: lora_a
(E, r, in), lora_b (E, out, r), one rank for all experts of a tensor):
- per-expert nn.Linear LoRAs (PEFT on transformers 4 / hub layout): `...experts.3.gate_proj`, Mixtral
  `...block_sparse_moe.experts.3.w1`; stacked per GGUF tensor, smaller ranks zero-padded, experts without a
  LoRA given zero factors;
- PEFT's ParamWrapper on transformers 5's fused 3-D expert parameters (`target_parameters`, or
  target_modules="all-linear"): one wrapper per parameter, nested (`...experts.base_layer` is the inner one),
  lora_A (r*E, in) and lora_B (out, r*E) with expert e's delta scaling * B.reshape(out, r, E)[:, :, e] @
  A.reshape(E, r, in)[e] (ParamWrapper.get_delta_weight). gate_up_proj [E, 2ff, embd] is gate then up on the
  out axis (Qwen3MoeExperts/MixtralExperts: `.chunk(2, dim=-1)` -> gate, up; gpt-oss: even/odd rows of its
  transposed [E, embd, 2ff], the architecture's fused_experts rule): ffn_gate_exps, ffn_up_exps;
  down_proj -> ffn_down_exps. Which wrapper holds which parameter is read from the shapes (gate_up (2ff, embd)
  and down (embd, ff) never agree).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import gguf
import torch

from avgguf.gguf import adapter_format as fmt
from avgguf.errors import ConversionError
from avgguf.gguf.arches import hf_language_name, permute_rows, qk_heads, unapplied_reason
from .convert import AdapterBuild, ConversionReport
from .lowrank import Factors, RankPolicy, choose_rank, factorize_product
from .sources import TensorSource

PREFIX = "base_model.model."
KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$"
)
# per-expert nn.Linear: model.layers.0.mlp.experts.3.gate_proj / model.layers.0.block_sparse_moe.experts.3.w1
PER_EXPERT_RE = re.compile(r"^(?P<stack>.*\.layers\.(?P<layer>\d+)\..*experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")
# ParamWrapper on fused 3-D expert parameters: model.layers.0.mlp.experts(.base_layer)*
FUSED_RE = re.compile(r"^(?P<stack>.*\.layers\.(?P<layer>\d+)\..*experts)(?P<nest>(?:\.base_layer)*)$")
EXPERT_PROJ = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps"}
EXPERT_PROJ.update({"down_proj": "ffn_down_exps", "w2": "ffn_down_exps"})
MOE_HELP = (
    "avgguf reads MoE expert LoRAs as per-expert ones (`experts.N.gate_proj/up_proj/down_proj`, Mixtral "
    "`experts.N.w1/w3/w2`) and PEFT target_parameters on transformers 5's fused `experts.gate_up_proj` / "
    "`experts.down_proj`; for anything else merge the adapter and convert the merged model with --aligned"
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
    if ".experts" in module:
        raise ConversionError(f"--peft: module {module!r} is a MoE expert module of a layout avgguf does not read; {MOE_HELP}")
    text_module = hf_language_name(base.arch, module) or module
    gguf_name = tmap.get_name(text_module + ".weight", try_suffixes=(".weight",))
    if gguf_name is None or gguf_name not in base.names():
        raise ConversionError(
            f"--peft: module {module!r} has no tensor in base {base.path} "
            f"({base.arch.gguf_name}); is the adapter for another model?"
        )
    return gguf_name


def _scaling(cfg: dict, key: str, r: int, where: str) -> float:
    """PEFT's scale for a module (or a targeted parameter's key) of rank r in its tensors."""
    rank_cfg = _pattern_value(cfg.get("rank_pattern"), key, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), key, cfg["lora_alpha"])
    if int(rank_cfg) != r:
        raise ConversionError(f"--peft: {where} has rank {r} in its tensors but {rank_cfg} in adapter_config.json")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


class _ExpertStacks:
    """Per GGUF expert tensor (E, out, in): each expert's (left (out, r), right (r, in)), scaling folded in."""

    def __init__(self, base: TensorSource):
        self.base = base
        self.parts: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self.sources: dict[str, set[str]] = {}

    def gguf_name(self, module: str, layer: str, kind: str) -> str:
        name = f"blk.{layer}.{kind}.weight"
        if name not in self.base.names():
            raise ConversionError(
                f"--peft: module {module!r}: base {self.base.path} ({self.base.arch.gguf_name}) has no tensor "
                f"{name!r}; is the adapter for another model?"
            )
        if len(self.base.shape(name)) != 3:
            raise ConversionError(f"--peft: module {module!r}: base tensor {name!r} is not a 3-D expert stack")
        return name

    def add(self, module: str, name: str, expert: int, left: np.ndarray, right: np.ndarray) -> None:
        n_expert, rows, cols = self.base.shape(name)
        if not 0 <= expert < n_expert:
            raise ConversionError(f"--peft: module {module!r}: expert {expert} but base tensor {name!r} has {n_expert} experts")
        if (left.shape[0], right.shape[1]) != (rows, cols):
            raise ConversionError(
                f"--peft: module {module!r}: the LoRA gives expert {expert} a delta of shape "
                f"{(left.shape[0], right.shape[1])} but base tensor {name!r} has experts of {(rows, cols)}; the "
                f"adapter was trained on another model"
            )
        if not (np.all(np.isfinite(left)) and np.all(np.isfinite(right))):
            raise ConversionError(f"--peft: module {module!r} has NaN/Inf values")
        slot = self.parts.setdefault(name, {})
        if expert in slot:
            raise ConversionError(
                f"--peft: expert {expert} of {name!r} is adapted twice ({module!r} and "
                f"{sorted(self.sources[name])}); an adapter holds one LoRA per expert weight"
            )
        slot[expert] = (left, right)
        self.sources.setdefault(name, set()).add(module)

    def stacked(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (left (E, out, R), right (E, R, in)): one rank R (the largest; smaller ones zero-padded),
        experts without a LoRA zero."""
        out = {}
        for name, slot in sorted(self.parts.items()):
            n_expert, rows, cols = self.base.shape(name)
            rank = max(left.shape[1] for left, _ in slot.values())
            left3 = np.zeros((n_expert, rows, rank), np.float32)
            right3 = np.zeros((n_expert, rank, cols), np.float32)
            for e, (left, right) in slot.items():
                left3[e, :, : left.shape[1]] = left
                right3[e, : right.shape[0]] = right
            out[name] = (left3, right3)
        return out


def _per_expert(module: str, m: re.Match, parts: dict, cfg: dict, stacks: _ExpertStacks, tmap) -> None:
    """One expert's nn.Linear LoRA (hub layout) into its stacked tensor."""
    generic = hf_language_name(stacks.base.arch, f"{m['stack']}.{m['proj']}.weight") or ""
    name = tmap.get_name(generic, try_suffixes=(".weight",)) if generic else None
    kind = EXPERT_PROJ.get(m["proj"])
    if name is None and kind is None:
        raise ConversionError(f"--peft: module {module!r}: expert projection {m['proj']!r} is unknown; {MOE_HELP}")
    name = name or f"blk.{m['layer']}.{kind}.weight"
    name = stacks.gguf_name(module, m["layer"], name.split(".")[2])
    left, right = _factors(module, parts, cfg)
    stacks.add(module, name, int(m["expert"]), left, right)


def _fused_experts(stack: str, layer: str, levels: dict[int, tuple[str, dict]], cfg: dict, stacks: _ExpertStacks) -> None:
    """PEFT ParamWrappers (nested, one per targeted 3-D parameter) on one fused experts module."""
    names = stacks.base.names()
    gate = f"blk.{layer}.ffn_gate_exps.weight"
    fused_gate_up = f"blk.{layer}.ffn_gate_up_exps.weight"
    down = stacks.gguf_name(stack, layer, "ffn_down_exps")
    n_expert, embd, ff = stacks.base.shape(down)
    targets = {(2 * ff, embd): "gate_up_proj", (embd, ff): "down_proj"}
    gate_rows, up_rows = _gate_up_rows(stacks.base.arch, ff)
    seen: dict[str, str] = {}
    for _, (module, parts) in sorted(levels.items()):
        if "lora_A" not in parts or "lora_B" not in parts or set(parts) - {"lora_A", "lora_B"}:
            raise ConversionError(f"--peft: module {module!r} has {sorted(parts)}; lora_A and lora_B come in pairs")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] % n_expert:
            raise ConversionError(
                f"--peft: module {module!r}: lora_A {a.shape} / lora_B {b.shape} are not a ParamWrapper's "
                f"(r*E, in) / (out, r*E) for the base's {n_expert} experts; {MOE_HELP}"
            )
        param = targets.get((b.shape[0], a.shape[1]))
        if param is None:
            raise ConversionError(
                f"--peft: module {module!r}: a delta of shape {(b.shape[0], a.shape[1])} per expert is neither "
                f"gate_up_proj {(2 * ff, embd)} nor down_proj {(embd, ff)} of base tensor {down!r}; {MOE_HELP}"
            )
        if param in seen:
            raise ConversionError(f"--peft: {module!r} and {seen[param]!r} both target {stack}.{param}")
        seen[param] = module
        r = a.shape[0] // n_expert
        scaling = _scaling(cfg, f"{stack}.{param}", r, f"module {module!r} ({param})")
        a_e = a.reshape(n_expert, r, a.shape[1])  # (E, r, in)
        b_e = b.reshape(b.shape[0], r, n_expert)  # (out, r, E): expert index is the fastest on lora_B's columns
        where = f"{module} ({param})"
        for e in range(n_expert):
            left, right = b_e[:, :, e] * scaling, a_e[e]
            if param == "down_proj":
                stacks.add(where, down, e, left, right)
            elif gate in names:
                stacks.add(where, stacks.gguf_name(where, layer, "ffn_gate_exps"), e, left[gate_rows], right)
                stacks.add(where, stacks.gguf_name(where, layer, "ffn_up_exps"), e, left[up_rows], right)
            elif fused_gate_up in names:
                stacks.add(where, stacks.gguf_name(where, layer, "ffn_gate_up_exps"), e, left, right)
            else:
                stacks.gguf_name(where, layer, "ffn_gate_exps")  # raises: names the missing tensor


def _gate_up_rows(spec, ff: int) -> tuple[slice, slice]:
    """Rows of a fused gate_up_proj's (out, in) delta that are gate and up: the architecture's converter rule
    (gpt-oss: even / odd rows, arches._GPT_OSS_EXPERTS), else halves (Qwen3-MoE, Mixtral in transformers 5).
    PEFT's B_e @ A_e is (out, in) whether the parameter is stored (E, out, in) or transposed (E, in, out)
    (ParamWrapper swaps in/out features unless the experts module says is_transposed)."""
    for suffix, parts in getattr(spec, "fused_experts", ()):
        if suffix.endswith("gate_up_proj"):
            rows = {("gate" if "gate_proj" in part.name else "up"): part.rows for part in parts}
            if set(rows) == {"gate", "up"}:
                return rows["gate"], rows["up"]
    return slice(0, ff), slice(ff, 2 * ff)


def _expert_factors(left: np.ndarray, right: np.ndarray, policy: RankPolicy | None, device: str) -> Factors:
    """A 3-D expert stack's factors at one rank: kept as given (policy None), else each expert's product SVD
    (QR of both sides) cut at one rank chosen on the experts' summed spectrum, as lowrank.factorize does."""
    n_expert, rows, rank = left.shape
    cols = right.shape[2]
    parts = []
    for e in range(n_expert):
        b = torch.from_numpy(np.ascontiguousarray(left[e])).to(device).double()
        a = torch.from_numpy(np.ascontiguousarray(right[e])).to(device).double()
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        uc, s, vch = torch.linalg.svd(rb @ ra.T)
        parts.append((qb @ uc, s, vch @ qa.T))
    s2 = torch.stack([s**2 for _, s, _ in parts]).sum(0)
    total = float(torch.sum(s2))
    n = int(s2.numel())
    if policy is None:
        return Factors(left, right, rank, total, 1.0, "peft-experts", s2.cpu().numpy())
    cap = policy.cap(min(n, rows, cols))
    r = choose_rank(s2, total, policy, cap)
    new_left = np.stack([((u[:, :r]) * torch.sqrt(s[:r])).float().cpu().numpy() for u, s, _ in parts])
    new_right = np.stack([(torch.sqrt(s[:r])[:, None] * vh[:r]).float().cpu().numpy() for _, s, vh in parts])
    kept = float(torch.sum(s2[:r])) / total if total > 0 else 1.0
    return Factors(new_left, new_right, r, total, min(kept, 1.0), "product-svd", s2[:cap].cpu().numpy())


def _factors(module: str, parts: dict, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) with delta = left @ right in the base's (out, in) order, PEFT's scaling applied."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    ka, kb = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if ka not in parts or kb not in parts:
        raise ConversionError(f"--peft: module {module!r} has only {sorted(parts)}; {ka} and {kb} come in pairs")
    a, b = parts[ka], parts[kb]
    r = a.shape[0]
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
        raise ConversionError(f"--peft: module {module!r}: {ka} {a.shape} and {kb} {b.shape} are not a LoRA pair")
    scaling = _scaling(cfg, module, r, f"module {module!r}")
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


def _metadata(name: str, domain: str | None, base: TensorSource, path: Path, policy: RankPolicy | None) -> dict:
    return {
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
        stacks = _ExpertStacks(base)
        fused: dict[tuple[str, str], dict[int, tuple[str, dict]]] = {}
        for module, parts in sorted(modules.items()):
            if ".experts" in module:  # (a Mixtral GGUF's architecture is llama's: no moe flag to ask)
                if m := PER_EXPERT_RE.match(module):
                    _per_expert(module, m, parts, cfg, stacks, tmap)
                elif m := FUSED_RE.match(module):
                    fused.setdefault((m["stack"], m["layer"]), {})[m["nest"].count(".base_layer")] = (module, parts)
                else:
                    _target(module, base, tmap)  # raises: an expert module of no layout avgguf reads
                continue
            gguf_name = _target(module, base, tmap)
            left, right = _pair(module, parts, cfg, base, gguf_name)
            reason = fmt.unapplicable_reason(gguf_name, 2, tied) or unapplied_reason(base.arch, gguf_name)
            factors = factorize_product(left, right, policy, device)
            if reason:
                build.skip(gguf_name, factors.energy, reason)
                continue
            build.add(gguf_name, (left.shape[0], right.shape[1]), factors, (left @ right) if policy is not None else None)
        for (stack, layer), levels in sorted(fused.items()):
            _fused_experts(stack, layer, levels, cfg, stacks)
        for gguf_name, (left, right) in stacks.stacked().items():
            factors = _expert_factors(left, right, policy, device)
            delta = np.matmul(left, right) if policy is not None else None
            build.add(gguf_name, tuple(base.shape(gguf_name)), factors, delta)
        return build.commit(_metadata(name, domain, base, path, policy))
    except BaseException:
        build.writer.abort()
        raise
