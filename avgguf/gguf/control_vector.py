"""The one owner of llama.cpp's control-vector format: keys, tensor names, shapes, validation against a base,
the atomic writer and the flat per-layer buffer `llama_set_adapter_cvec` takes. No torch.

The file (as llama.cpp's common/common.cpp loads it, and as tools/cvector-generator and repeng write it):
- `general.architecture = "controlvector"`, `controlvector.model_hint` (a string: the base's architecture),
  `controlvector.layer_count` (int32 from cvector-generator, uint32 from repeng; llama.cpp never reads it);
- F32 1-D tensors `direction.N`, N >= 1, each of n_embd floats. Direction N is added to the output of block
  N (0-based: the residual stream after block N, i.e. Hugging Face's `hidden_states[N + 1]`); llama.cpp has
  no vector for block 0 and ignores N >= n_layer. Two tensors naming the same layer (`direction.1`,
  `direction.01`) are summed, as llama.cpp does.

llama.cpp checks names, type and shape only and drops a bad file with a warning; a vector made for another
model (n_embd or depth) is refused here, with expected vs found, before llama.cpp sees it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from avgguf import atomic
from avgguf.errors import AdapterError

log = logging.getLogger(__name__)
ARCH = "controlvector"
KEY_MODEL_HINT = f"{ARCH}.model_hint"
KEY_LAYER_COUNT = f"{ARCH}.layer_count"
PREFIX = "direction."
KEY_AVGGUF = "avgguf.control_vector"  # marks files avgguf wrote (replaced without --force)
_INT_TYPES = (gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT64, gguf.GGUFValueType.UINT64)


class ControlVectorError(AdapterError):
    """A control-vector file is malformed or does not fit the base model."""


@dataclass(frozen=True)
class ControlVector:
    """One control-vector file: its directions by layer (1-based, as in the tensor names)."""

    path: Path | None
    model_hint: str | None
    layer_count: int | None
    directions: Mapping[int, np.ndarray]  # layer -> (n_embd,) float32
    meta: Mapping[str, object] = field(default_factory=dict)

    @property
    def n_embd(self) -> int:
        return len(next(iter(self.directions.values())))

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def where(self) -> str:
        return f"control vector {str(self.path)!r}" if self.path else "control vector"


def is_control_vector(path: str | os.PathLike) -> bool:
    """Whether `path` is a GGUF whose general.architecture is "controlvector" (False for anything else)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        arch = gguf.GGUFReader(path).get_field(gguf.Keys.General.ARCHITECTURE)
    except (OSError, ValueError):
        return False
    return arch is not None and arch.contents() == ARCH


def _layer_of(name: str, path: Path) -> int:
    head, _, tail = name.partition(".")
    if head + "." != PREFIX or not tail.isdigit():
        raise ControlVectorError(
            f"{path}: tensor {name!r} is not a control-vector direction (expected names direction.N, N >= 1); "
            f"llama.cpp would refuse the file"
        )
    if int(tail) == 0:
        raise ControlVectorError(f"{path}: tensor {name!r}: layer 0 has no control vector in llama.cpp (N >= 1)")
    return int(tail)


def _header(reader: gguf.GGUFReader, path: Path) -> tuple[str | None, int | None]:
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None or arch.contents() != ARCH:
        found = None if arch is None else arch.contents()
        raise ControlVectorError(
            f"{path}: general.architecture is {found!r}, expected {ARCH!r}; this is not a control vector "
            f"(make one with `avgguf convert --kind control-vector` or llama-cvector-generator)"
        )
    hint = reader.get_field(KEY_MODEL_HINT)
    count = reader.get_field(KEY_LAYER_COUNT)
    if count is not None and count.types[0] not in _INT_TYPES:
        raise ControlVectorError(f"{path}: {KEY_LAYER_COUNT} has GGUF type {count.types[0].name}, expected an integer")
    hint_value = hint.contents() if hint is not None and hint.types[0] == gguf.GGUFValueType.STRING else None
    return hint_value, None if count is None else int(count.contents())


def read_control_vector(path: str | os.PathLike) -> ControlVector:
    """Read and check a control-vector GGUF (avgguf's, llama-cvector-generator's or repeng's)."""
    path = Path(path)
    if not path.is_file():
        raise ControlVectorError(f"control vector {str(path)!r} not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on corrupt files
        raise ControlVectorError(f"control vector {str(path)!r} is not a readable GGUF file ({exc})") from None
    hint, count = _header(reader, path)
    directions: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        layer = _layer_of(t.name, path)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ControlVectorError(
                f"{path}: {t.name} is {t.tensor_type.name}, expected F32 (llama.cpp drops non-F32 control vectors)"
            )
        if len(t.shape) != 1:
            raise ControlVectorError(f"{path}: {t.name} has shape {tuple(int(x) for x in t.shape)}, expected 1-D (n_embd)")
        vec = np.array(t.data, dtype=np.float32).reshape(-1)
        if directions and len(vec) != len(next(iter(directions.values()))):
            raise ControlVectorError(
                f"{path}: {t.name} has {len(vec)} values, the other directions {len(next(iter(directions.values())))}"
            )
        if not np.isfinite(vec).all():
            raise ControlVectorError(f"{path}: {t.name} holds non-finite values; re-create the control vector")
        directions[layer] = directions[layer] + vec if layer in directions else vec
    if not directions:
        raise ControlVectorError(f"{path}: no direction.N tensors; the control vector is empty")
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("avgguf.")}
    return ControlVector(path, hint, count, dict(sorted(directions.items())), meta)


def check_against_base(cv: ControlVector, n_embd: int | None, n_layer: int | None, base_arch: str, base: str) -> None:
    """Raise ControlVectorError unless llama.cpp applies every direction of `cv` on this base (`base`: its
    path, for messages). A model_hint other than the base's architecture is only logged (llama.cpp ignores
    it, and repeng writes Hugging Face's model_type there)."""
    if n_embd is not None and cv.n_embd != n_embd:
        raise ControlVectorError(
            f"{cv.where()} has n_embd {cv.n_embd} but base {base!r} has n_embd {n_embd}: it was made for another "
            f"model; make it again against this base"
        )
    if n_layer is not None and cv.layers[-1] >= n_layer:
        raise ControlVectorError(
            f"{cv.where()} has a direction for layer {cv.layers[-1]} but base {base!r} has {n_layer} layers "
            f"(directions 1..{n_layer - 1} apply): it was made for a deeper model; make it again against this base"
        )
    if cv.model_hint and cv.model_hint != base_arch:
        log.info("%s: model_hint %r, base %r is %r", cv.where(), cv.model_hint, base, base_arch)


def layer_range(n_layer: int, start: int | None = None, end: int | None = None) -> tuple[int, int]:
    """llama.cpp's --control-vector-layer-range defaults (common.cpp): start <= 0 -> 1, end <= 0 -> n_layer."""
    start = 1 if start is None or start <= 0 else int(start)
    end = n_layer if end is None or end <= 0 else int(end)
    if start > end:
        raise ControlVectorError(f"control-vector layer range {start}..{end} is empty (START must be <= END)")
    return start, end


def flat_buffer(vectors: Sequence[tuple[ControlVector, float]], n_embd: int, n_layer: int) -> np.ndarray:
    """The buffer llama_set_adapter_cvec takes: n_embd floats per layer from layer 1, the sum of each file's
    directions times its scale (common_control_vector_load's sum), padded with zeros to all n_layer - 1 layers
    (llama.cpp leaves a layer the buffer does not reach at its old values)."""
    out = np.zeros((max(n_layer - 1, 1), n_embd), dtype=np.float32)
    for cv, scale in vectors:
        if cv.n_embd != n_embd:
            raise ControlVectorError(f"{cv.where()} has n_embd {cv.n_embd}, expected {n_embd}")
        for layer, vec in cv.directions.items():
            if layer < n_layer:  # llama.cpp has no tensor for layers >= n_layer
                out[layer - 1] += vec * np.float32(scale)
    return out.reshape(-1)


def _previous(path: Path) -> bool:
    try:
        return is_control_vector(path) and KEY_AVGGUF in gguf.GGUFReader(path).fields
    except (OSError, ValueError):
        return False


def write_control_vector(
    out_path: str | os.PathLike,
    directions: Mapping[int, np.ndarray],
    model_hint: str,
    *,
    metadata: Mapping[str, str | float | int] | None = None,
    force: bool = False,
    inputs: tuple = (),
) -> Path:
    """Write a control vector llama.cpp (and stock llama-cli/llama-server --control-vector) loads: one F32
    direction.N per layer (N >= 1), layer_count as int32 like cvector-generator. Atomic (avgguf.atomic); an
    existing file is replaced only if avgguf wrote it, or with `force`. `metadata`: extra avgguf.* keys."""
    if not directions:
        raise ControlVectorError(f"{out_path}: no directions to write")
    vecs = {int(k): np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for k, v in sorted(directions.items())}
    if min(vecs) < 1 or len({len(v) for v in vecs.values()}) != 1:
        raise ControlVectorError(f"{out_path}: directions need layers >= 1 and one length (n_embd)")
    policy = dict(force=force, previous=_previous, inputs=inputs, what="control vector")
    atomic.check_output_file(out_path, **policy)
    w = gguf.GGUFWriter(None, ARCH)  # the directions are small: held in memory until written
    w.add_string(KEY_MODEL_HINT, model_hint)
    w.add_int32(KEY_LAYER_COUNT, len(vecs))
    w.add_string(KEY_AVGGUF, "1")
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_int64(key, value)
        else:
            w.add_float64(key, float(value))
    for layer, vec in vecs.items():
        w.add_tensor(f"{PREFIX}{layer}", vec)
    with atomic.output_file(out_path, **policy) as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return Path(out_path)


def write_summed(
    out_path: str | os.PathLike,
    vectors: Sequence[tuple[ControlVector, float]],
    n_embd: int,
    n_layer: int,
    layers: tuple[int, int] | None = None,
    model_hint: str = "",
    *,
    force: bool = False,
) -> Path:
    """One control vector that llama.cpp applies at scale 1 exactly as it applies these files at their scales
    over the inclusive block range `layers` (directions outside it are left out): bake's output beside a
    baked model or adapter. Metadata records the sources and scales."""
    start, end = layer_range(n_layer, *(layers or (None, None)))
    flat = flat_buffer(vectors, n_embd, n_layer).reshape(-1, n_embd)
    directions = {i + 1: flat[i] for i in range(len(flat)) if start <= i + 1 <= end and np.any(flat[i])}
    if not directions:
        directions = {start: np.zeros(n_embd, dtype=np.float32)}  # all scales 0: a vector that adds nothing
    sources = ", ".join(f"{cv.path.name if cv.path else '?'}={scale:g}" for cv, scale in vectors)
    return write_control_vector(out_path, directions, model_hint, metadata={"avgguf.cv.summed": sources}, force=force)
