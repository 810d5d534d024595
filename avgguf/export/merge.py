"""The profile's merged weights, streamed one tensor at a time: base + Σ c·ΔW from the AVs' adapters (or
from --source checkpoints), for `avgguf bake --format gguf` (avgguf.export.bake, avgguf.export.requant_bake),
the merged hot sets and the benchmarks' full-precision references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from avgguf.config.modelfile import Modelfile
from avgguf.errors import AvggufError
from avgguf.gguf import adapter_format as fmt
from avgguf.gguf.fuse import Cancelled

KEY_PROFILE = "avgguf.baked.profile"
KEY_COEFS = "avgguf.baked.coefficients"
KEY_NAMES = "avgguf.baked.names"


@dataclass
class Bake:
    modelfile: Modelfile
    profile: str | None
    coefficients: dict[str, float]
    sources: dict = None  # AV name -> (base, aligned) TensorSource: bake the full delta, not the adapter
    force: bool = False  # replace an existing --out avgguf did not write (--force)

    @property
    def active(self) -> list[tuple[str, Path, float]]:
        return [(n, self.modelfile.av_paths[n], c) for n, c in self.coefficients.items() if c != 0.0]

    @property
    def label(self) -> str:
        return self.profile or "custom"

    @property
    def full_base(self):
        """The full-precision base to merge into: the --source base when every active AV has a --source and
        they name one base (the GGUF's own 4-bit rounding is then not compounded: bench/bake_source.py); else
        None. The default type stays q8_0 for a 4-bit base even so: the demo's DPO effect is below 4-bit
        rounding from any start (quantizing the full-precision aligned model to Q4_1 kept 0.07-0.11 of it)."""
        sources = self.sources or {}
        if not self.active or any(name not in sources for name, _, _ in self.active):
            return None
        bases = {Path(sources[name][0].path).resolve() for name, _, _ in self.active}
        return sources[self.active[0][0]][0] if len(bases) == 1 else None

    def metadata(self) -> dict:
        return {
            KEY_PROFILE: self.label,
            KEY_NAMES: list(self.coefficients),
            KEY_COEFS: [float(v) for v in self.coefficients.values()],
        }

    def inputs(self) -> list[Path]:
        """Every file the bake reads: --out may be none of them (nor a directory holding one)."""
        mf = self.modelfile
        paths = [mf.path, mf.base_path, *mf.av_paths.values(), *mf.baked_paths.values()]
        for base, aligned in (self.sources or {}).values():
            paths += [Path(base.path), Path(aligned.path)]
        return paths

    def file_policy(self, kind: str) -> dict:
        """avgguf.atomic's rule for a file output of `kind` ('adapter' or 'model')."""
        return {
            "force": self.force,
            "previous": lambda p: fmt.written_by_avgguf(p, kind),
            "inputs": self.inputs(),
            "what": "adapter" if kind == "adapter" else "baked GGUF",
        }


def _merged(
    reader_tensors: dict,
    name: str,
    sources: list[tuple[fmt.AdapterInfo, dict, float]],
    full: list[tuple[object, object, float]] = (),
    full_base=None,
) -> np.ndarray:
    w = fmt.tensor_floats(reader_tensors[name])
    if full_base is not None and name in full_base.names():
        w = _same_model(full_base.load(name).astype(np.float32), w, name)
    for base, aligned, c in full:
        if name in base.names() and name in aligned.names():
            delta = aligned.load(name) - base.load(name)
            if delta.shape != w.shape:
                raise AvggufError(
                    f"--source: tensor {name!r} has shape {delta.shape} there but {w.shape} in the base "
                    f"GGUF; the source is another model"
                )
            w += np.float32(c) * delta.astype(np.float32)
    for info, tensors, c in sources:
        if name in info.pairs:
            a, b = (fmt.tensor_floats(tensors[name + suffix], np.float64) for suffix in (fmt.LORA_A, fmt.LORA_B))
            scale = c * (info.alpha / info.pairs[name].rank if info.alpha else 1.0)
            w += (scale * fmt.delta_from_pair(name, a, b)).astype(np.float32)
    return w


def _same_model(full: np.ndarray, stored: np.ndarray, name: str) -> np.ndarray:
    """The --source base's tensor, once it is seen to be the base GGUF's before quantization (4-bit rounding
    moves a tensor by ~10 % of its norm; another model's differs by about its whole norm)."""
    if full.shape != stored.shape:
        raise AvggufError(
            f"--source: tensor {name!r} has shape {full.shape} there but {stored.shape} in the base "
            f"GGUF; the source is another model"
        )
    rel = float(np.linalg.norm(full - stored) / max(float(np.linalg.norm(full)), 1e-30))
    if rel > 0.5:
        raise AvggufError(
            f"--source: the base checkpoint's {name!r} differs from the base GGUF's by {rel:.0%} of "
            f"its norm (quantization moves it by ~10 %); give the checkpoint the base GGUF was made "
            f"from"
        )
    return full


def open_av_sources(bake: Bake) -> tuple[list, list]:
    """(adapter sources [(info, tensors, c)], full sources [(base, aligned, c)]) of the active AVs."""
    full_sources = bake.sources or {}
    sources, full = [], []
    for name, path, c in bake.active:
        if name in full_sources:
            full.append((*full_sources[name], c))
            continue
        info = fmt.read_adapter(path)
        sources.append((info, {t.name: t for t in gguf.GGUFReader(path).tensors}, c))
    return sources, full


def touched_names(tensors: dict, sources: list, full: list) -> set[str]:
    touched = {name for info, _, _ in sources for name in info.pairs}
    return touched | {n for base, aligned, _ in full for n in tensors if n in base.names() and n in aligned.names()}


def write_merged_f32(bake: Bake, out: Path, progress: bool = False, stop=None) -> Path:
    """base + Σ c·ΔW as a GGUF: merged tensors in float32, all others exactly as stored; streamed. `stop()`
    true between tensors raises avgguf.gguf.fuse.Cancelled."""
    return write_merged(bake, out, progress, stop)


def write_merged(bake: Bake, out: Path, progress: bool = False, stop=None, keep_type=None) -> Path:
    """write_merged_f32, or with `keep_type(tensor, merged float32) -> data of the tensor's own type and
    shape as stored` every merged tensor keeps its stored type (avgguf.export.requant_bake)."""
    from tqdm import tqdm

    reader = gguf.GGUFReader(bake.modelfile.base_path)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    sources, full = open_av_sources(bake)
    tensors = {t.name: t for t in reader.tensors}
    touched = touched_names(tensors, sources, full)
    writer = gguf.GGUFWriter(None, arch)
    fmt.copy_metadata(reader, writer)
    for key, value in bake.metadata().items():
        _add_meta(writer, key, value)
    for t in reader.tensors:
        if t.name in touched and keep_type is None:
            shape = fmt.numpy_shape(t)
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tqdm(reader.tensors, desc="merge", unit="tensor", disable=not progress):
        if stop is not None and stop():
            writer.close()
            raise Cancelled
        data = np.asarray(t.data)
        if t.name in touched:
            data = _merged(tensors, t.name, sources, full, bake.full_base)
            data = data if keep_type is None else keep_type(t, data)
        writer.write_tensor_data(data)
    writer.close()
    return out


def _add_meta(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], str):
        writer.add_array(key, value)
    else:
        writer.add_key_value(key, [float(v) for v in value], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
