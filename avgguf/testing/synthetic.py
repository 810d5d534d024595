"""Tiny synthetic models built at test time: a Hugging Face checkpoint (config.json + safetensors) and
the GGUF llama.cpp's converter would make from it (same name map, same Q/K permutation), and a base paired
with an aligned variant whose delta is known (make_pair). Fixed seeds: the same Spec gives the same bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from avgguf.gguf.arches import permute_rows

N_VOCAB = 300  # 3 control tokens + 256 byte tokens + 41 pieces
# the shared widths of the tiny transformers models each architecture's tests build from a config
TINY_HF_CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass
class Spec:
    arch: str = "llama"  # llama | qwen2
    tied: bool = False
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2  # GQA
    n_ff: int = 96
    n_vocab: int = N_VOCAB
    seed: int = 0

    @property
    def hf_architecture(self) -> str:
        return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.arch]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def hf_config(spec: Spec) -> dict:
    return {
        "architectures": [spec.hf_architecture],
        "model_type": spec.arch,
        "hidden_size": spec.n_embd,
        "intermediate_size": spec.n_ff,
        "num_hidden_layers": spec.n_layer,
        "num_attention_heads": spec.n_head,
        "num_key_value_heads": spec.n_head_kv,
        "vocab_size": spec.n_vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": "float32",
    }


def hf_weights(spec: Spec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    kv = spec.n_head_kv * spec.head_dim

    def mat(out, inp, scale=None):
        return (rng.standard_normal((out, inp)) * (scale or 1.0 / np.sqrt(inp))).astype(np.float32)

    w = {
        "model.embed_tokens.weight": mat(spec.n_vocab, spec.n_embd, 0.5),
        "model.norm.weight": (1 + 0.1 * rng.standard_normal(spec.n_embd)).astype(np.float32),
    }
    if not spec.tied:
        w["lm_head.weight"] = mat(spec.n_vocab, spec.n_embd)
    for i in range(spec.n_layer):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(spec.n_embd)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(spec.n_embd)).astype(np.float32)
        w[p + "self_attn.q_proj.weight"] = mat(spec.n_embd, spec.n_embd)
        w[p + "self_attn.k_proj.weight"] = mat(kv, spec.n_embd)
        w[p + "self_attn.v_proj.weight"] = mat(kv, spec.n_embd)
        w[p + "self_attn.o_proj.weight"] = mat(spec.n_embd, spec.n_embd)
        w[p + "mlp.gate_proj.weight"] = mat(spec.n_ff, spec.n_embd)
        w[p + "mlp.up_proj.weight"] = mat(spec.n_ff, spec.n_embd)
        w[p + "mlp.down_proj.weight"] = mat(spec.n_embd, spec.n_ff)
        if spec.arch == "qwen2":
            for proj, n in (("q", spec.n_embd), ("k", kv), ("v", kv)):
                w[p + f"self_attn.{proj}_proj.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
    return w


def write_hf(path: Path, spec: Spec, weights: dict[str, np.ndarray], shards: int = 1) -> Path:
    """An HF checkpoint directory: config.json and the weights in `shards` safetensors files (with an index
    when more than one)."""
    from safetensors.numpy import save_file  # the convert extra's; a desktop install has no safetensors

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(spec), indent=1))
    names = sorted(weights)
    if shards == 1:
        save_file({k: weights[k] for k in names}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: weights[k] for k in part}, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def to_gguf_tensors(spec: Spec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names/layout -> GGUF names/layout, as convert_hf_to_gguf.py does."""
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[spec.arch]
    tmap = gguf.get_tensor_name_map(model_arch, spec.n_layer)
    out = {}
    for hf_name, t in weights.items():
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if spec.arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = permute_rows(t, spec.n_head, spec.n_head)
        elif spec.arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = permute_rows(t, spec.n_head, spec.n_head_kv)
        out[name] = np.ascontiguousarray(t, dtype=np.float32)
    return out


def add_vocab(w: gguf.GGUFWriter, n_vocab: int) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces = [f"\u2581{chr(ord('a') + i % 26)}{i // 26 or ''}" for i in range(n_vocab - len(tokens))]
    tokens += pieces
    types = (
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * len(pieces)
    )
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(pieces))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def write_gguf(path: Path, spec: Spec, gguf_tensors: dict[str, np.ndarray], dtype=np.float32) -> Path:
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_name(f"tiny-{spec.arch}")
    w.add_context_length(256)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(spec.n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    add_vocab(w, spec.n_vocab)
    for name, t in gguf_tensors.items():
        keep_f32 = t.ndim == 1
        w.add_tensor(name, t.astype(np.float32 if keep_f32 else dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class Delta:
    """A known alignment vector in HF layout: dense random deltas on chosen tensors."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def applied_to(self, weights: dict[str, np.ndarray], lam: float = 1.0) -> dict[str, np.ndarray]:
        out = dict(weights)
        for k, d in self.tensors.items():
            out[k] = (weights[k] + lam * d).astype(np.float32)
        return out


def random_delta(
    spec: Spec,
    weights: dict[str, np.ndarray],
    seed: int,
    scale: float = 0.05,
    include_norms: bool = True,
    rank: int | None = None,
) -> Delta:
    """Delta on every weight (optionally low-rank), on norms and biases too (those llama.cpp cannot apply)."""
    rng = np.random.default_rng(seed)
    d = {}
    for k, w in weights.items():
        if w.ndim == 1 and not include_norms:
            continue
        if w.ndim == 2 and rank is not None:
            m = rng.standard_normal((w.shape[0], rank)) @ rng.standard_normal((rank, w.shape[1]))
            d[k] = (m * scale * np.std(w) / np.sqrt(rank)).astype(np.float32)
        else:
            d[k] = (rng.standard_normal(w.shape) * scale * (np.std(w) if w.ndim == 2 else 0.1)).astype(np.float32)
    return Delta(d)


def representable(spec: Spec, delta: Delta) -> Delta:
    """The part of a delta llama.cpp can apply through a LoRA: 2-D weights, minus tied embeddings."""
    keep = {}
    for k, d in delta.tensors.items():
        if d.ndim != 2:
            continue
        if spec.tied and k == "model.embed_tokens.weight":
            continue
        keep[k] = d
    return Delta(keep)


@dataclass
class Pair:
    """A tiny base model (HF dir + GGUF) and an aligned variant with a known delta."""

    spec: Spec
    weights: dict[str, np.ndarray]
    delta: Delta
    base_hf: Path
    aligned_hf: Path
    base_gguf: Path
    root: Path

    def gguf_of(self, weights: dict[str, np.ndarray], name: str) -> Path:
        path = self.root / name
        if not path.exists():
            write_gguf(path, self.spec, to_gguf_tensors(self.spec, weights))
        return path


def make_pair(root: Path, spec: Spec, delta_seed: int = 1, **delta_kw) -> Pair:
    """Base and aligned HF checkpoints under `root` (base/, aligned/) and the base's GGUF (base.gguf)."""
    root.mkdir(parents=True, exist_ok=True)
    w = hf_weights(spec)
    delta = random_delta(spec, w, seed=delta_seed, **delta_kw)
    base_hf = write_hf(root / "base", spec, w)
    aligned_hf = write_hf(root / "aligned", spec, delta.applied_to(w))
    base_gguf = write_gguf(root / "base.gguf", spec, to_gguf_tensors(spec, w))
    return Pair(spec, w, delta, base_hf, aligned_hf, base_gguf, root)


def quantized(src: Path, out: Path, ftype: str = "MOSTLY_Q4_0") -> Path:
    """`src` quantized by llama.cpp's own quantizer to LLAMA_FTYPE_`ftype`, written to `out`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")
    return out
