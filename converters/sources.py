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
    ArchSpec,
    hf_language_name,
    permute_rows,
    qk_heads,
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
        text = self.config.get("text_config") or self.config  # a multimodal checkpoint's language model
        try:
            self.n_layer = int(text["num_hidden_layers"])
            self.n_embd = int(text["hidden_size"])
            self.n_head = int(text["num_attention_heads"])
            self.n_head_kv = int(text.get("num_key_value_heads") or self.n_head)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(
                f"{role} {str(cfg_path)!r}: missing or bad key {exc}; expected "
                f"num_hidden_layers, hidden_size, num_attention_heads"
            ) from None

        files = self._shard_files()
        tmap = gguf.get_tensor_name_map(self.arch.model_arch, self.n_layer)
        # name -> (shard file, hf name, shape); shards are opened per tensor so that no mapping of a whole
        # checkpoint stays resident (peak memory is one tensor pair, whatever the model size)
        self._where: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        self._unmapped: dict[str, Path] = {}
        self._experts: dict[str, dict[int, tuple[Path, str, tuple[int, ...]]]] = {}
        self.unmapped = {}
        for f in files:
            for hf_name, shape in _headers(f, role).items():
                self._place(tmap, f, hf_name, shape)
        self._stack_experts()
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
        expert = HF_EXPERT.search(text_name)
        stacked = text_name[: expert.start()] + ".experts." + text_name[expert.end() :] if expert else text_name
        gguf_name = tmap.get_name(stacked, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            self._book(f, hf_name, "no llama.cpp tensor for it")
        elif expert:
            index = int(expert.group(0).split(".")[2])
            self._experts.setdefault(gguf_name, {})[index] = (f, hf_name, shape)
        else:
            self._where[gguf_name] = (f, hf_name, shape)

    def _book(self, f: Path, hf_name: str, reason: str) -> None:
        self.unmapped[hf_name] = reason
        self._unmapped[hf_name] = f

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

    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"{self.role} {str(index)!r}: expected JSON with a 'weight_map' ({exc})") from None
            files = [self.path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{self.role} {str(index)!r} names shards that are missing: {missing}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ConversionError(
                f"{self.role} {str(self.path)!r}: no *.safetensors files "
                f"(.bin checkpoints are not supported: re-save with safe_serialization=True)"
            )
        return files

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def load(self, name: str) -> np.ndarray:
        f, hf_name, _ = self._where[name]
        if f is None:  # stacked experts
            return np.stack([_read_safetensor(part, part_name) for part, part_name in hf_name])
        t = _read_safetensor(f, hf_name)
        if self.arch.norm_shift and "_norm" in name:
            t += self.arch.norm_shift  # as llama.cpp's converter writes it (Gemma: 1 + w)
        heads = qk_heads(self.arch, name, self.n_head, self.n_head_kv)
        return permute_rows(t, *heads) if heads else t

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Without reading the rest of the tensor (stacked experts: experts start:stop). Q/K rows are not
        permuted here: callers use slices for energies, which any row order keeps."""
        f, hf_name, _ = self._where[name]
        if f is None:
            return np.stack([_read_safetensor(part, part_name) for part, part_name in hf_name[start:stop]])
        t = _read_safetensor(f, hf_name, start, stop)
        if self.arch.norm_shift and "_norm" in name:
            t += self.arch.norm_shift
        return t

    def load_unmapped(self, name: str) -> np.ndarray:
        return _read_safetensor(self._unmapped[name], name)


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
