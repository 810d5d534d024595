"""Lazy tensor sources: a Hugging Face checkpoint directory or a GGUF file, both seen in GGUF naming
and GGUF layout (llama Q/K rows permuted), one tensor at a time as float32 numpy arrays."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import gguf

from avgguf.errors import ConversionError
from avgguf.gguf.arches import (
    GGUF_ONLY,
    HF_EXPERT,
    MLA_KV_B,
    MLA_PARTS,
    MXFP4_BLOCKS,
    MXFP4_SCALES,
    ArchSpec,
    FusedPart,
    dequantize_mxfp4,
    fused_parts,
    fused_shape,
    hf_language_name,
    hf_renamed,
    permute_rows,
    qk_heads,
    real_vocab,
    split_kv_b,
    spec_for_gguf,
    spec_for_hf_config,
)

log = logging.getLogger(__name__)

FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


class TensorSource:
    """Common interface. Subclasses fill the attributes in __init__."""

    path: Path
    arch: ArchSpec
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    quantized: bool = False
    unmapped: dict[str, str]  # checkpoint tensors that map to no adapter pair -> why (booked, never applied)

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def load(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def load_unmapped(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of the first axis of `load(name)` (a slice's energy is the same in any row order)."""
        return self.load(name)[start:stop]

    @property
    def tied_embeddings(self) -> bool:
        return "output.weight" not in self.names()


def open_source(path: str | Path, role: str) -> TensorSource:
    """role names the CLI argument (e.g. '--base') for error messages."""
    p = Path(path)
    if p.is_dir():
        return HFCheckpoint(p, role)
    if p.is_file():
        return GGUFModel(p, role)
    raise ConversionError(
        f"{role} {str(p)!r} not found: give a Hugging Face checkpoint directory (config.json + *.safetensors) or a .gguf file"
    )


class HFCheckpoint(TensorSource):
    def __init__(self, path: Path, role: str):

        self.path, self.role = path, role
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(
                f"{role} {str(path)!r}: config.json not found; a Hugging Face checkpoint "
                f"directory needs config.json and *.safetensors"
            )
        try:
            self.config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{role} {str(cfg_path)!r} is not valid JSON ({exc})") from None
        self.arch = spec_for_hf_config(self.config, f"{role} {str(cfg_path)!r}")
        _check_quantization(self.config, self.arch, role, cfg_path)
        text = self.config.get("text_config") or self.config  # a multimodal checkpoint's language model
        try:
            self.n_layer = int(text["num_hidden_layers"])
            self.n_embd = int(text["hidden_size"])
            self.n_head = int(text["num_attention_heads"])
            self.n_head_kv = int(text.get("num_key_value_heads") or self.n_head)
            if self.arch.mla:
                self.n_head_kv = 1  # the converter writes DeepSeek's MLA as MQA
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(
                f"{role} {str(cfg_path)!r}: missing or bad key {exc}; expected "
                f"num_hidden_layers, hidden_size, num_attention_heads"
            ) from None

        files = _shard_files(path, role)
        tmap = gguf.get_tensor_name_map(self.arch.model_arch, self.n_layer)
        # name -> (shard file, hf name, shape); shards are opened per tensor so that no mapping of a whole
        # checkpoint stays resident (peak memory is one tensor pair, whatever the model size)
        self._where: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        self._unmapped: dict[str, tuple[Path, str, int | None, int | None]] = {}  # -> (shard, hf name, rows)
        self._vocab = real_vocab(self.arch, path, self.config)
        self._experts: dict[str, dict[int, tuple[Path, str, tuple[int, ...]]]] = {}
        # a tensor the converter cuts out of another -> (FusedPart, "dense"/"blocks") or (0 k_b / 1 v_b, "mla")
        self._views: dict[str, tuple[FusedPart | int, str]] = {}
        self._scales: dict[str, Path] = {}  # MXFP4 `*_scales` tensor -> its shard
        self.unmapped = {}
        for f in files:
            for hf_name, shape in _headers(f, role).items():
                self._place(tmap, f, hf_name, shape)
        self._stack_experts()
        self._check_scales()
        if not self._where:
            lm = " (a multimodal checkpoint without its language model?)" if self.arch.strip_prefixes else ""
            raise ConversionError(f"{role} {str(path)!r}: no language-model tensors found in {[f.name for f in files]}{lm}")

    def _place(self, tmap, f: Path, hf_name: str, shape: tuple[int, ...]) -> None:
        """File one checkpoint tensor under its GGUF name (per-expert weights: as one slice of the stacked
        3-D tensor llama.cpp's converter writes), or book why it has none."""
        text_name = hf_language_name(self.arch, hf_name)
        if text_name is None:
            self._book(f, hf_name, "not the language model (a vision tower or projector)")
            return
        text_name = hf_renamed(self.arch, text_name)
        fused = fused_parts(self.arch, text_name)
        if fused is not None:
            self._place_fused(tmap, f, hf_name, shape, *fused)
            return
        if self.arch.mla and text_name.endswith("." + MLA_KV_B):
            self._place_mla(tmap, f, hf_name, shape, text_name[: -len(MLA_KV_B)])
            return
        expert = HF_EXPERT.search(text_name)
        stacked = text_name[: expert.start()] + ".experts." + text_name[expert.end() :] if expert else text_name
        gguf_name = tmap.get_name(stacked, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            self._book(f, hf_name, "no llama.cpp tensor for it")
        elif expert:
            index = int(expert.group(0).split(".")[2])
            self._experts.setdefault(gguf_name, {})[index] = (f, hf_name, shape)
        elif gguf_name in self.arch.vocab_trim and self._vocab is not None and self._vocab < shape[0]:
            # llama.cpp's converter keeps the tokenizer's rows only (Gemma3): so does this side of a pair;
            # the rows it drops are booked, never applied
            n = self._vocab
            self._where[gguf_name] = (f, hf_name, (n, *shape[1:]))
            self._book(
                f,
                f"{hf_name}[{n}:{shape[0]}]",
                f"rows past the tokenizer's {n} tokens (llama.cpp's converter drops them from {gguf_name})",
                hf_name,
                n,
                shape[0],
            )
        else:
            self._where[gguf_name] = (f, hf_name, shape)

    def _place_fused(self, tmap, f: Path, hf_name: str, shape, prefix: str, parts, kind: str) -> None:
        """A fused expert parameter (gpt-oss): one GGUF tensor per part, cut out of it on load."""
        if kind == "scales":
            self._scales[hf_name] = f
            return
        if kind == "blocks":
            self.quantized = True  # MXFP4: its quantization noise enters the delta
        for part in parts:
            gguf_name = tmap.get_name(prefix + part.name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ConversionError(f"{self.role} {str(self.path)!r}: {hf_name!r}: gguf-py maps no tensor for {part.name!r}")
            self._where[gguf_name] = (f, hf_name, fused_shape(part, shape, kind))
            self._views[gguf_name] = (part, kind)

    def _place_mla(self, tmap, f: Path, hf_name: str, shape, prefix: str) -> None:
        """DeepSeek's kv_b_proj as the converter writes it: attn_k_b and attn_v_b (split_kv_b)."""
        hparams = {**self.config, **(self.config.get("text_config") or {})}
        k_b, v_b = split_kv_b(np.empty(shape, np.float32), hparams)  # shapes only
        for i, (part, t) in enumerate(zip(MLA_PARTS, (k_b, v_b))):
            gguf_name = tmap.get_name(prefix + part, try_suffixes=(".weight",))
            if gguf_name is None:
                self._book(f, hf_name, "no llama.cpp tensor for it")
                return
            self._where[gguf_name] = (f, hf_name, t.shape)
            self._views[gguf_name] = (i, "mla")

    def _check_scales(self) -> None:
        for name, (part, kind) in self._views.items():
            hf_name = self._where[name][1]
            if kind == "blocks" and hf_name[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES not in self._scales:
                raise ConversionError(
                    f"{self.role} {str(self.path)!r}: MXFP4 {hf_name!r} has no {hf_name[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES!r}"
                )

    def _load_fused(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """One part of a fused expert parameter, experts start:stop, in GGUF layout (E, out, in) / (E, out);
        or one half of DeepSeek's kv_b_proj, heads start:stop."""
        f, hf_name, _ = self._where[name]
        part, kind = self._views[name]
        if kind == "mla":  # small (n_head x head dims x kv_lora): split whole, then sliced
            hparams = {**self.config, **(self.config.get("text_config") or {})}
            return split_kv_b(_read_safetensor(f, hf_name), hparams)[part][start:stop]
        if kind == "blocks":
            scales = hf_name[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES
            t = dequantize_mxfp4(_read_raw(f, hf_name, start, stop), _read_raw(self._scales[scales], scales, start, stop))
        else:
            t = _read_safetensor(f, hf_name, start, stop)
            if part.transpose:
                t = t.swapaxes(-1, -2)
        return np.ascontiguousarray(t[:, part.rows])

    def _book(self, f: Path, key: str, reason: str, hf_name: str | None = None, start=None, stop=None) -> None:
        self.unmapped[key] = reason
        self._unmapped[key] = (f, hf_name or key, start, stop)

    def _stack_experts(self) -> None:
        """Per-expert slices -> one 3-D tensor [n_expert, *slice] per GGUF name, as the converter stacks them."""
        for gguf_name, slices in self._experts.items():
            order = sorted(slices)
            if order != list(range(len(order))):
                raise ConversionError(
                    f"{self.role} {str(self.path)!r}: experts of {gguf_name!r} are not 0..{len(order) - 1}: {order}"
                )
            shape = (len(order), *slices[0][2])
            self._where[gguf_name] = (None, [slices[i][:2] for i in order], shape)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def load(self, name: str) -> np.ndarray:
        if name in self._views:
            return self._load_fused(name)
        f, hf_name, _ = self._where[name]
        if f is None:  # stacked experts
            return np.stack([_read_safetensor(part, part_name) for part, part_name in hf_name])
        t = _read_safetensor(f, hf_name, *self._trim(name))
        if self.arch.norm_shift and "_norm" in name:
            t += self.arch.norm_shift  # as llama.cpp's converter writes it (Gemma: 1 + w)
        heads = qk_heads(self.arch, name, self.n_head, self.n_head_kv)
        return permute_rows(t, *heads) if heads else t

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Without reading the rest of the tensor (stacked experts: experts start:stop). Q/K rows are not
        permuted here: callers use slices for energies, which any row order keeps."""
        if name in self._views:
            return self._load_fused(name, start, stop)
        f, hf_name, _ = self._where[name]
        if f is None:
            return np.stack([_read_safetensor(part, part_name) for part, part_name in hf_name[start:stop]])
        t = _read_safetensor(f, hf_name, start, stop)
        if self.arch.norm_shift and "_norm" in name:
            t += self.arch.norm_shift
        return t

    def _trim(self, name: str) -> tuple[int | None, int | None]:
        """Rows to read of a tensor the converter trims to the tokenizer's vocabulary (all others: all)."""
        return (0, self._where[name][2][0]) if name in self.arch.vocab_trim else (None, None)

    def load_unmapped(self, name: str) -> np.ndarray:
        return _read_safetensor(*self._unmapped[name])


def _check_quantization(config: dict, arch, role: str, cfg_path: Path) -> None:
    """A quantized checkpoint's integer tensors are no weights: only MXFP4 experts are dequantized here."""
    qcfg = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not qcfg:
        return
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if method == "mxfp4" and arch.fused_experts:
        return
    raise ConversionError(
        f"{role} {str(cfg_path)!r}: a {method or 'quantized'} checkpoint (quantization_config); avgguf "
        f"reads Hugging Face weights unquantized (bf16/f16/f32), or MXFP4 experts of gpt-oss. Convert both "
        f"checkpoints with llama.cpp's convert_hf_to_gguf.py and give the two GGUFs (`avgguf convert --base "
        f"base.gguf --aligned aligned.gguf`)"
    )


def _shard_files(path: Path, role: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConversionError(f"{role} {str(index)!r}: expected JSON with a 'weight_map' ({exc})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{role} {str(index)!r} names shards that are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(
            f"{role} {str(path)!r}: no *.safetensors files "
            f"(.bin checkpoints are not supported: re-save with safe_serialization=True)"
        )
    return files


def _headers(f: Path, role: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:
        raise ConversionError(f"{role}: {str(f)!r} is not a readable safetensors file ({exc})") from None


def _read_safetensor(path: Path, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        t = handle.get_tensor(name) if start is None else handle.get_slice(name)[start:stop]
        return t.to(torch.float32, copy=True).numpy()


def _read_raw(path: Path, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """A tensor as stored (MXFP4 blocks and scales: uint8)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        t = handle.get_tensor(name) if start is None else handle.get_slice(name)[start:stop]
        return t.numpy().copy()


class GGUFModel(TensorSource):
    def __init__(self, path: Path, role: str):
        self.path, self.role = path, role
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:
            raise ConversionError(f"{role} {str(path)!r} is not a readable GGUF file ({exc})") from None
        self.reader = reader
        arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
        if arch_field is None:
            raise ConversionError(f"{role} {str(path)!r}: no general.architecture key; not a model GGUF")
        arch = arch_field.contents()
        gtype = reader.get_field(gguf.Keys.General.TYPE)
        if gtype is not None and gtype.contents() == gguf.GGUFType.ADAPTER:
            raise ConversionError(f"{role} {str(path)!r} is a LoRA adapter, not a model")
        self.arch = spec_for_gguf(arch, f"{role} {str(path)!r}")

        def key(k: str, default=None):
            f = reader.get_field(k.format(arch=arch))
            if f is None:
                if default is None:
                    raise ConversionError(f"{role} {str(path)!r}: missing key {k.format(arch=arch)!r}")
                return default
            value = f.contents()
            return int(max(value)) if isinstance(value, list) else int(value)  # per-layer arrays: the widest

        self.n_layer = key(gguf.Keys.LLM.BLOCK_COUNT)
        self.n_embd = key(gguf.Keys.LLM.EMBEDDING_LENGTH)
        self.n_head = key(gguf.Keys.Attention.HEAD_COUNT)
        self.n_head_kv = key(gguf.Keys.Attention.HEAD_COUNT_KV, self.n_head)
        # rope_freqs & co. are generated by the converter, not weights: no delta, absent from an HF side
        self._tensors = {t.name: t for t in reader.tensors if t.name not in GGUF_ONLY}
        self.quantized = any(t.tensor_type not in FLOAT_TYPES for t in reader.tensors)
        self.unmapped = {}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._tensors[name].shape.tolist()))

    def load(self, name: str) -> np.ndarray:
        return self.load_rows(name, 0, self.shape(name)[0])

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        t = self._tensors[name]
        shape = self.shape(name)
        row_bytes = t.n_bytes // shape[0]  # quant blocks run along the last axis: whole rows are whole blocks
        # pread rather than the reader's memmap: touched mmap pages would stay resident for the whole run
        with open(self.path, "rb") as fh:
            raw = os.pread(fh.fileno(), (stop - start) * row_bytes, t.data_offset + start * row_bytes)
        rows = (stop - start, *t.data.shape[1:]) if t.data.shape[0] == shape[0] else (-1, t.data.shape[-1])
        data = np.frombuffer(raw, dtype=t.data.dtype).reshape(rows)
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = data.astype(np.float32)
        else:
            data = gguf.quants.dequantize(data, t.tensor_type)
        return data.reshape((stop - start, *shape[1:]))
