"""The GGUF LoRA adapter format, as llama.cpp (llama-cpp-python >= 0.3.36) reads it.

This module is the single owner of that format: tensor names, pair shapes, the scale rule, dtypes,
the avgguf.* metadata keys, writing (streamed through a temp file and published by avgguf.atomic) and
validation of any adapter before llama.cpp sees it: keys and their types, complete pairs and their shapes
against the base, factor types llama.cpp's backends can multiply and finite factor values (llama.cpp aborts
the process on a key of the wrong type, a missing half of a pair or a shape mismatch, and crashes at the
first decode on a factor type without a kernel).

Conventions: shapes are numpy order. A linear weight W is (out, in); its delta is factored as
left @ right with left (out, r) and right (r, in). llama.cpp computes
``scale * alpha / r * (lora_b @ lora_a)`` per tensor (r read from lora_b); avgguf writes
``alpha = 0`` so the factor is just ``scale`` whatever each tensor's rank, and scale 1.0
reproduces the delta exactly.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType

from avgguf import atomic
from avgguf.errors import AdapterError

LORA_A = ".lora_a"
LORA_B = ".lora_b"
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
NORM_SUFFIX = "_norm.weight"  # llama.cpp loads tensors named so in an adapter and skips them (not pairs)

# avgguf's own metadata keys.
KEY_VERSION = "avgguf.version"
KEY_NAME = "avgguf.av.name"
KEY_DOMAIN = "avgguf.av.domain"
KEY_SOURCE_KIND = "avgguf.source.kind"
KEY_SOURCE_BASE = "avgguf.source.base"
KEY_SOURCE_ALIGNED = "avgguf.source.aligned"
KEY_RANK_POLICY = "avgguf.rank.policy"
KEY_SVD = "avgguf.svd.method"
KEY_DTYPE = "avgguf.dtype"
KEY_BASE_N_LAYER = "avgguf.base.block_count"
KEY_BASE_N_EMBD = "avgguf.base.embedding_length"
KEY_ENERGY_TOTAL = "avgguf.energy.total"
KEY_ENERGY_UNAPPLIED = "avgguf.energy.unapplied_fraction"
KEY_ENERGY_KEPT = "avgguf.energy.kept_fraction"
KEY_T_NAME = "avgguf.tensors.name"
KEY_T_RANK = "avgguf.tensors.rank"
KEY_T_ENERGY = "avgguf.tensors.energy"
KEY_T_KEPT = "avgguf.tensors.energy_kept"
KEY_T_ERROR = "avgguf.tensors.rel_error"
KEY_S_NAME = "avgguf.skipped.name"
KEY_S_ENERGY = "avgguf.skipped.energy"
KEY_S_REASON = "avgguf.skipped.reason"

KEY_SIZE_BUDGET = "avgguf.size.budget_bytes"
KEY_FIT = "avgguf.fit.method"
KEY_FIT_SETTINGS = "avgguf.fit.settings"
KEY_FIT_CALIBRATION = "avgguf.fit.calibration"
KEY_FIT_TOKENS = "avgguf.fit.calibration_tokens"
KEY_FIT_KL_BEFORE = "avgguf.fit.kl_before"
KEY_FIT_KL_AFTER = "avgguf.fit.kl_after"
KEY_FIT_KL_BASE = "avgguf.fit.kl_base"
KEY_FIT_SECONDS = "avgguf.fit.seconds"
KEY_T_TYPES = "avgguf.tensors.types"

# Factor storage types llama.cpp multiplies on its CPU backend (and CUDA/Metal). Quantized types need a
# row length that is a multiple of their block size (32); for lora_b the row length is the rank.
DTYPES = {
    "f32": QType.F32,
    "f16": QType.F16,
    "q8_0": QType.Q8_0,
    "q5_1": QType.Q5_1,
    "q5_0": QType.Q5_0,
    "q4_1": QType.Q4_1,
    "q4_0": QType.Q4_0,
}
QUANTIZED = {QType.Q8_0, QType.Q5_1, QType.Q5_0, QType.Q4_1, QType.Q4_0}
# Factor types accepted when reading any tool's adapter: those ggml's CPU, CUDA and Metal backends multiply
# (ggml_mul_mat / get_rows against f32 activations). I8/I16/I32/I64/F64 have no CPU kernel: the first decode
# using the adapter would crash the process. K-quants need rows of a multiple of 256 (their block).
FACTOR_TYPES = (
    QType.F32,
    QType.F16,
    QType.BF16,
    QType.Q4_0,
    QType.Q4_1,
    QType.Q5_0,
    QType.Q5_1,
    QType.Q8_0,
    QType.Q2_K,
    QType.Q3_K,
    QType.Q4_K,
    QType.Q5_K,
    QType.Q6_K,
)
# Byte offsets of the f16 scale fields (d, and dmin/m where there is one) inside one block: every value of a
# block is a finite scale times small integers, so the block is finite iff these are.
_SCALE_OFFSETS = {
    QType.Q4_0: (0,),
    QType.Q4_1: (0, 2),
    QType.Q5_0: (0,),
    QType.Q5_1: (0, 2),
    QType.Q8_0: (0,),
    QType.Q2_K: (80, 82),
    QType.Q3_K: (108,),
    QType.Q4_K: (0, 2),
    QType.Q5_K: (0, 2),
    QType.Q6_K: (208,),
}
CHECK_CHUNK_BYTES = 4 << 20  # factor values are checked this many bytes at a time (never one whole copy)


def lora_names(base_name: str) -> tuple[str, str]:
    return base_name + LORA_A, base_name + LORA_B


def is_expert(base_name: str) -> bool:
    """A stacked MoE expert tensor (ffn_{gate,up,down,gate_up}_exps): 3-D, [n_expert, out, in] in numpy order;
    llama.cpp applies its pair per expert (build_lora_mm_id)."""
    return "_exps." in base_name


def unapplicable_reason(base_name: str, ndim: int, tied_embeddings: bool) -> str | None:
    """Why llama.cpp cannot apply a delta on this base tensor through a LoRA, or None if it can."""
    if "_norm" in base_name:
        return "norm (llama.cpp never applies norm deltas)"
    if base_name.endswith(".bias"):
        return "bias (llama.cpp LoRA reaches matmuls only)"
    if ndim == 3 and not is_expert(base_name):
        return "3-D tensor that is not a MoE expert stack (llama.cpp's LoRA path never reaches it)"
    if ndim not in (2, 3):
        return f"{ndim}-D tensor (not a matmul weight)"
    if tied_embeddings and base_name in (TOKEN_EMBD, OUTPUT):
        return "tied embeddings (llama.cpp would apply it in the wrong orientation)"
    if not base_name.endswith(".weight"):
        return "not a weight tensor"
    return None


def pair_from_factors(base_name: str, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) for delta = left @ right, left (out, r), right (r, in) in the base's numpy order.
    A 3-D expert stack has one such pair per expert: left (E, out, r), right (E, r, in), i.e. lora_a
    ne [n_embd, r, n_expert] and lora_b ne [r, n_ff, n_expert] in GGUF order, one rank for all experts.

    token_embd is flipped in llama.cpp (get_rows on lora_a, then lora_b): lora_a (n_vocab, r),
    lora_b (n_embd, r).
    """
    if base_name == TOKEN_EMBD:
        return np.ascontiguousarray(left), np.ascontiguousarray(right.T)
    return np.ascontiguousarray(right), np.ascontiguousarray(left)


def delta_from_pair(
    base_name: str, lora_a: np.ndarray, lora_b: np.ndarray, start: int | None = None, stop: int | None = None
) -> np.ndarray:
    """The delta llama.cpp applies at scale 1 with alpha 0 (inverse of pair_from_factors); only its rows
    start:stop (experts start:stop of a 3-D stack) if given."""
    if base_name == TOKEN_EMBD:
        return lora_a[start:stop] @ lora_b.T
    if lora_b.ndim == 3:
        return lora_b[start:stop] @ lora_a[start:stop]
    return lora_b[start:stop] @ lora_a


def expected_pair_shapes(base_name: str, base_shape: tuple[int, ...], rank: int) -> tuple[tuple, tuple]:
    if len(base_shape) == 3 and is_expert(base_name):
        n_expert, rows, cols = base_shape
        return (n_expert, rank, cols), (n_expert, rows, rank)
    if len(base_shape) != 2:
        raise AdapterError(
            f"pair on {base_name!r}, a {len(base_shape)}-D base tensor {tuple(base_shape)}: llama.cpp "
            f"applies pairs to 2-D matmul weights and 3-D MoE expert stacks (*_exps) only"
        )
    rows, cols = base_shape
    if base_name == TOKEN_EMBD:
        return (rows, rank), (cols, rank)
    return (rank, cols), (rows, rank)


def fits_type(qtype: QType, row_length: int) -> bool:
    """Can a tensor with rows of this length be stored as qtype (block-size rule)?"""
    return qtype not in QUANTIZED or row_length % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def storage_type(requested: str, arr: np.ndarray) -> QType:
    """The GGML type a factor is stored in; a quantized type needs rows of a multiple of 32, else f16."""
    qtype = DTYPES[requested]
    return qtype if fits_type(qtype, arr.shape[-1]) else QType.F16


def stored_bytes(qtype: QType, shape: tuple[int, ...]) -> int:
    """Bytes of tensor data in the file, before GGUF's alignment padding."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def type_name(qtype: QType) -> str:
    return next(k for k, v in DTYPES.items() if v == qtype)


def encode(arr: np.ndarray, qtype: QType) -> np.ndarray:
    if qtype == QType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == QType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def decode(raw: np.ndarray, qtype: QType) -> np.ndarray:
    if qtype in (QType.F32, QType.F16):
        return np.asarray(raw, dtype=np.float32)
    return gguf.quants.dequantize(raw, qtype)


def written_by_avgguf(path: str | os.PathLike, kind: str) -> bool:
    """Is `path` a GGUF avgguf wrote, of `kind` ('adapter' or 'model')? The rule for replacing an existing
    output without --force (avgguf.atomic): any avgguf.* key marks it."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            return False
    reader = gguf.GGUFReader(path)
    gtype = reader.get_field(gguf.Keys.General.TYPE)
    is_adapter = gtype is not None and gtype.contents() == gguf.GGUFType.ADAPTER
    return is_adapter == (kind == "adapter") and any(key.startswith("avgguf.") for key in reader.fields)


def _previous_adapter(path: Path) -> bool:
    return written_by_avgguf(path, "adapter")


class AdapterWriter:
    """Writes one adapter. Tensors stream to an unnamed temp file beside the output; the GGUF is
    assembled in a temp file and published by commit() (avgguf.atomic.output_file). Nothing is left on
    failure. An existing `out_path` is replaced only if avgguf wrote it as an adapter, or with `force`;
    `inputs`: files the output must not be."""

    def __init__(self, out_path: str | os.PathLike, arch: str, name: str, *, force: bool = False, inputs: tuple = ()):
        self.out_path = Path(out_path)
        self._policy = {"force": force, "previous": _previous_adapter, "inputs": tuple(inputs), "what": "adapter"}
        target = atomic.check_output_file(self.out_path, **self._policy)
        self.writer = gguf.GGUFWriter(None, arch)
        # Keep tensor data on disk as it is produced, never all of it in memory (unnamed: gone after a kill).
        self.writer.temp_file = tempfile.TemporaryFile(dir=target.parent, prefix=".avgguf-tensors-")
        self.writer.add_type(gguf.GGUFType.ADAPTER)
        self.writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        self.writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        self.writer.add_name(name)
        self.n_pairs = 0

    def add_pair(
        self, base_name: str, lora_a: np.ndarray, lora_b: np.ndarray, dtype: str, dtype_b: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Store a pair (lora_b in dtype_b when given); returns the factors as llama.cpp will see them
        (after quantization)."""
        seen = []
        for suffix, arr, requested in ((LORA_A, lora_a, dtype), (LORA_B, lora_b, dtype_b or dtype)):
            qtype = storage_type(requested, arr)
            raw = encode(arr, qtype)
            # quantized data is uint8 in byte shape; gguf derives the element shape from it
            self.writer.add_tensor(base_name + suffix, raw, raw_dtype=qtype if qtype in QUANTIZED else None)
            seen.append(decode(raw, qtype).reshape(arr.shape))
        self.n_pairs += 1
        return seen[0], seen[1]

    def add_raw_pair(self, base_name: str, raw_a: np.ndarray, type_a: QType, raw_b: np.ndarray, type_b: QType) -> None:
        """Store a pair exactly as given (float rows, or uint8 rows of quantized blocks)."""
        for suffix, raw, qtype in ((LORA_A, raw_a, type_a), (LORA_B, raw_b, type_b)):
            self.writer.add_tensor(base_name + suffix, np.ascontiguousarray(raw), raw_dtype=qtype if qtype in QUANTIZED else None)
        self.n_pairs += 1

    def add_metadata(self, key: str, value: Any) -> None:
        w = self.writer
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):  # sizes of big models pass 2**32 (a --max-size above 4.3 GB)
            w.add_uint32(key, value) if 0 <= value < 1 << 32 else w.add_uint64(key, value) if value >= 0 else w.add_int64(
                key, value
            )
        elif isinstance(value, float):
            w.add_float64(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            if value:
                w.add_key_value(key, list(value), VType.ARRAY, sub_type=_array_type(value))
        else:
            raise TypeError(f"unsupported metadata type for {key}: {type(value).__name__}")

    def commit(self, max_size: int | None = None) -> None:
        """Write the file and publish it; with max_size, refuse (and leave nothing) if larger."""
        pending = self.writer.temp_file.tell() if self.writer.temp_file is not None else 0
        if not any(KEY_VERSION in kv for kv in self.writer.kv_data):  # every adapter avgguf writes says so
            from avgguf.version import __version__

            self.writer.add_string(KEY_VERSION, __version__)
        try:
            with atomic.output_file(self.out_path, needed_bytes=pending + (1 << 20), **self._policy) as tmp:
                self.writer.write_header_to_file(tmp)
                self.writer.write_kv_data_to_file()
                self.writer.write_tensors_to_file()
                self.writer.close()
                size = os.path.getsize(tmp)
                if max_size is not None and size > max_size:
                    raise AdapterError(
                        f"{self.out_path}: the adapter came out at {size} bytes, over the "
                        f"{max_size}-byte budget (metadata larger than planned); lower --max-size "
                        f"by {size - max_size} bytes"
                    )
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.writer.temp_file is not None:
            self.writer.temp_file.close()
        self.writer.close()


def _array_type(values) -> VType:
    first = values[0]
    if isinstance(first, str):
        return VType.STRING
    if isinstance(first, (int, np.integer)) and not isinstance(first, bool):
        return VType.UINT32
    return VType.FLOAT32


# ---------------------------------------------------------------------------------------------
# Reading and validation


@dataclass
class PairInfo:
    base_name: str
    rank: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_type: str
    b_type: str


@dataclass
class AdapterInfo:
    path: Path
    arch: str
    alpha: float
    name: str | None
    pairs: dict[str, PairInfo]
    meta: dict[str, Any] = field(default_factory=dict)  # avgguf.* and other non-standard keys
    ignored: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensors llama.cpp loads but skips


def numpy_shape(t) -> tuple[int, ...]:
    """A GGUFReader tensor's shape in numpy order (GGUF stores it reversed)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key/value of a model GGUF into a writer for another file of the same model (the writer sets the
    architecture and the GGUF.* header fields itself)."""
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)


def tensor_floats(t, dtype=np.float32) -> np.ndarray:
    """A GGUFReader tensor as a float array of its numpy shape, dequantized where stored quantized."""
    return decode(np.asarray(t.data), t.tensor_type).reshape(numpy_shape(t)).astype(dtype)


def _open(path: Path, what: str) -> gguf.GGUFReader:
    if not path.is_file():
        raise AdapterError(f"{what} {str(path)!r} not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on corrupt files
        raise AdapterError(f"{what} {str(path)!r} is not a readable GGUF file ({exc}); re-create it or check the path") from None


def _field(reader: gguf.GGUFReader, key: str, vtype: VType, path: Path, required: bool = True):
    f = reader.get_field(key)
    if f is None:
        if required:
            raise AdapterError(f"{path}: missing key {key!r}; this is not a GGUF LoRA adapter (make one with `avgguf convert`)")
        return None
    if f.types[0] != vtype:
        raise AdapterError(
            f"{path}: key {key!r} has GGUF type {f.types[0].name}, expected {vtype.name} "
            f"(llama.cpp would abort on it); re-create the adapter"
        )
    return f.contents()


def read_adapter(path: str | os.PathLike, check_values: bool = True) -> AdapterInfo:
    """Read and check an adapter's own structure (keys and their types, complete pairs, pair shapes, factor
    types) and, with check_values, that every factor value is finite (streamed; once per file version)."""
    path = Path(path)
    reader = _open(path, "adapter")
    arch, alpha, name = _adapter_header(reader, path)
    pairs, ignored = _adapter_pairs(reader, path)
    if check_values:
        check_factor_values(path, [t for t in reader.tensors if not t.name.endswith(NORM_SUFFIX)])
    meta = {key: f.contents() for key, f in reader.fields.items() if key.startswith("avgguf.")}
    return AdapterInfo(path, arch, alpha, name, pairs, meta, ignored)


def _adapter_header(reader: gguf.GGUFReader, path: Path) -> tuple[str, float, str | None]:
    """general.type adapter, adapter.type lora, the architecture, a finite alpha and the optional name."""
    gtype = _field(reader, gguf.Keys.General.TYPE, VType.STRING, path)
    if gtype != gguf.GGUFType.ADAPTER:
        raise AdapterError(
            f"{path}: general.type is {gtype!r}, expected 'adapter' "
            f"(is this a model file? adapters are made with `avgguf convert`)"
        )
    atype = _field(reader, gguf.Keys.Adapter.TYPE, VType.STRING, path)
    if atype != "lora":
        raise AdapterError(
            f"{path}: adapter.type is {atype!r}, expected 'lora' (avgguf and llama.cpp apply LoRA "
            f"adapters only); re-create it as a LoRA (e.g. with `avgguf convert`)"
        )
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE, VType.STRING, path)
    alpha = _field(reader, gguf.Keys.Adapter.LORA_ALPHA, VType.FLOAT32, path)
    if not math.isfinite(float(alpha)):
        raise AdapterError(
            f"{path}: key {gguf.Keys.Adapter.LORA_ALPHA!r} is {float(alpha)}, expected a finite "
            f"number (llama.cpp scales every pair by alpha / rank); re-create the adapter"
        )
    return arch, float(alpha), _field(reader, gguf.Keys.General.NAME, VType.STRING, path, required=False)


def _adapter_pairs(reader: gguf.GGUFReader, path: Path) -> tuple[dict[str, PairInfo], dict[str, tuple[int, ...]]]:
    """Every tensor in a complete lora_a/lora_b pair, or a norm llama.cpp skips (returned as `ignored`)."""
    tensors = {t.name: t for t in reader.tensors}
    pairs: dict[str, PairInfo] = {}
    ignored: dict[str, tuple[int, ...]] = {}
    for tname, t in tensors.items():
        if tname.endswith(LORA_A):
            base = tname[: -len(LORA_A)]
        elif tname.endswith(LORA_B):
            base = tname[: -len(LORA_B)]
        elif tname.endswith(NORM_SUFFIX):
            ignored[tname] = numpy_shape(t)  # e.g. mergekit -> convert_lora_to_gguf.py norms
            continue
        else:
            raise AdapterError(
                f"{path}: tensor {tname!r} ends neither in .lora_a nor .lora_b "
                f"(nor {NORM_SUFFIX}, which llama.cpp skips); llama.cpp would refuse this file. "
                f"Re-create the adapter (e.g. with `avgguf convert`)"
            )
        if base not in pairs:
            pairs[base] = _pair(path, base, tensors.get(base + LORA_A), tensors.get(base + LORA_B))
    return pairs, ignored


def _pair(path: Path, base: str, a, b) -> PairInfo:
    """One pair's shapes and factor types checked: both halves, 2-D (3-D on expert stacks), one rank >= 1 (lora_a of token_embd is
    stored transposed, as llama.cpp's converter writes it)."""
    if a is None or b is None:
        missing = base + (LORA_A if a is None else LORA_B)
        raise AdapterError(
            f"{path}: tensor {missing!r} is missing; lora_a and lora_b come in pairs "
            f"(llama.cpp refuses half a pair). Re-create the adapter"
        )
    a_shape, b_shape = numpy_shape(a), numpy_shape(b)
    rank = _pair_rank(path, base, a_shape, b_shape)
    for t in (a, b):
        check_factor_type(path, t)
    return PairInfo(base, rank, a_shape, b_shape, a.tensor_type.name, b.tensor_type.name)


def _pair_rank(path: Path, base: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """The rank both halves agree on: 2-D pairs, or 3-D per-expert pairs (E, r, in) / (E, out, r) on a *_exps
    tensor with one rank and one expert count."""
    ndim = 3 if is_expert(base) else 2
    if len(a_shape) != ndim or len(b_shape) != ndim:
        what = "3-D per-expert pairs (n_expert, r, in) / (n_expert, out, r)" if ndim == 3 else "2-D pairs"
        raise AdapterError(f"{path}: {base!r}: expected {what}, found lora_a {a_shape}, lora_b {b_shape}; re-create the adapter")
    rank = b_shape[-1]
    ok = a_shape[1] == rank if base == TOKEN_EMBD else a_shape[-2] == rank
    if ndim == 3:
        ok = ok and a_shape[0] == b_shape[0]
    if not ok or rank < 1:
        raise AdapterError(
            f"{path}: {base!r}: lora_a {a_shape} and lora_b {b_shape} disagree on the rank "
            f"(expected a rank >= 1 shared by both{' and one expert count' if ndim == 3 else ''}); re-create the adapter"
        )
    return rank


def check_factor_type(path: Path, t) -> None:
    """AdapterError unless llama.cpp's backends can multiply this factor (type, and row length vs block)."""
    qtype = QType(t.tensor_type)
    shape = numpy_shape(t)
    if qtype not in FACTOR_TYPES:
        raise AdapterError(
            f"{path}: tensor {t.name!r} is stored as {qtype.name}, which llama.cpp's backends "
            f"cannot multiply (the first decode with this adapter would crash the process); "
            f"expected one of {', '.join(q.name for q in FACTOR_TYPES)}. Re-create the adapter "
            f"(e.g. `avgguf convert ... --dtype f16`)"
        )
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        raise AdapterError(
            f"{path}: tensor {t.name!r} is {qtype.name} with rows of {shape[-1]} values, expected "
            f"a multiple of {block} (its block size); re-create the adapter with f16 factors"
        )


_VALUES_CHECKED: dict[tuple, bool] = {}  # (file identity) -> checked: a file version is scanned once per process


def check_factor_values(path: Path, tensors) -> None:
    """AdapterError naming the first tensor (and row) with a NaN or ±Inf value; streamed in chunks of
    CHECK_CHUNK_BYTES (quantized blocks: their f16 scales; every value is a scale times small integers)."""
    st = path.stat()
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if _VALUES_CHECKED.get(key):
        return
    for t in tensors:
        found = _first_non_finite(np.asarray(t.data), QType(t.tensor_type))
        if found is not None:
            row, what = found
            raise AdapterError(
                f"{path}: tensor {t.name!r} has a {what} value (row {row}); expected finite "
                f"factors (llama.cpp would give NaN logits). Re-create the adapter from finite "
                f"weights"
            )
    _VALUES_CHECKED[key] = True


# exponent bits of the 16-bit float types: a value is NaN or ±Inf iff they are all ones
_EXPONENT_MASK = {QType.F16: 0x7C00, QType.BF16: 0x7F80}


def _first_non_finite(data: np.ndarray, qtype: QType) -> tuple[int, str] | None:
    """(row, 'NaN' / '+Inf' / '-Inf') of the first non-finite value of a factor as GGUFReader maps it, or None."""
    rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, 1)
    row_bytes = max(1, rows.shape[1] * rows.dtype.itemsize)
    step = max(1, CHECK_CHUNK_BYTES // row_bytes)
    for start in range(0, rows.shape[0], step):
        chunk = np.ascontiguousarray(rows[start : start + step])
        if qtype in _EXPONENT_MASK:  # integer max of the exponent bits: ~3x faster than np.isfinite on f16
            mask = _EXPONENT_MASK[qtype]
            bits = chunk.view(np.uint16)
            if int(np.max(bits & mask)) != mask:
                continue
            values = chunk.view(np.float16) if qtype == QType.F16 else (bits.astype(np.uint32) << 16).view(np.float32)
        elif qtype == QType.F32:
            values = chunk
        else:  # quantized: the f16 scales of every block
            size = gguf.GGML_QUANT_SIZES[qtype][1]
            blocks = chunk.reshape(chunk.shape[0], -1, size)
            values = np.stack(
                [np.ascontiguousarray(blocks[..., o : o + 2]).view(np.float16)[..., 0] for o in _SCALE_OFFSETS[qtype]], axis=-1
            ).reshape(chunk.shape[0], -1)
        ok = np.isfinite(values)
        if not ok.all():
            return _where(start, ~ok, values)
    return None


def _where(start: int, bad: np.ndarray, values: np.ndarray) -> tuple[int, str]:
    row, col = (int(i[0]) for i in np.nonzero(bad))
    v = float(values[row, col])
    return start + row, "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")


@dataclass
class BaseModelInfo:
    path: Path
    arch: str
    shapes: dict[str, tuple[int, ...]]
    block_count: int | None
    embedding_length: int | None

    @property
    def tied_embeddings(self) -> bool:
        return OUTPUT not in self.shapes


GGUF_MAGIC = b"GGUF"


def gguf_kind(path: str | os.PathLike) -> str | None:
    """'adapter' or 'model' for a GGUF file, None for anything else (e.g. a YAML modelfile)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            return None
    gtype = _open(path, "GGUF file").get_field(gguf.Keys.General.TYPE)
    return "adapter" if gtype is not None and gtype.contents() == gguf.GGUFType.ADAPTER else "model"


def read_base_model(path: str | os.PathLike) -> BaseModelInfo:
    path = Path(path)
    reader = _open(path, "base model")
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE, VType.STRING, path)
    gtype = reader.get_field(gguf.Keys.General.TYPE)
    if gtype is not None and gtype.contents() == gguf.GGUFType.ADAPTER:
        raise AdapterError(f"{path} is an adapter, not a base model")
    n_layer = reader.get_field(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    n_embd = reader.get_field(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    shapes = {t.name: numpy_shape(t) for t in reader.tensors}
    return BaseModelInfo(
        path, arch, shapes, int(n_layer.contents()) if n_layer else None, int(n_embd.contents()) if n_embd else None
    )


def check_against_base(adapter: AdapterInfo, base: BaseModelInfo) -> None:
    """Raise AdapterError unless llama.cpp can load this adapter on this base."""
    where = f"adapter {str(adapter.path)!r}"
    if adapter.arch != base.arch:
        raise AdapterError(
            f"{where} is for architecture {adapter.arch!r} but base {str(base.path)!r} is "
            f"{base.arch!r}; convert it against this base"
        )
    for base_name, p in adapter.pairs.items():
        if base_name not in base.shapes:
            raise AdapterError(
                f"{where}: tensor {base_name!r} does not exist in base {str(base.path)!r}; "
                f"the adapter was built for another model: convert it against this base"
            )
        shape = base.shapes[base_name]
        if len(shape) != (3 if is_expert(base_name) else 2):
            raise AdapterError(
                f"{where}: pair on {base_name!r}, a {len(shape)}-D base tensor {shape} of base "
                f"{str(base.path)!r}; llama.cpp applies a LoRA to 2-D matmul weights and 3-D MoE expert "
                f"stacks only (never to norms or biases). Re-convert the adapter with avgguf, which books "
                f"such tensors as not applicable"
            )
        if base.tied_embeddings and base_name in (TOKEN_EMBD, OUTPUT):
            raise AdapterError(
                f"{where}: pair on {base_name!r} but the base ties its embeddings; "
                f"llama.cpp would apply it wrongly. Re-convert the adapter with avgguf"
            )
        want_a, want_b = expected_pair_shapes(base_name, base.shapes[base_name], p.rank)
        if (p.a_shape, p.b_shape) != (want_a, want_b):
            raise AdapterError(
                f"{where}: {base_name!r}: lora_a {p.a_shape} / lora_b {p.b_shape} do not fit the "
                f"base tensor {base.shapes[base_name]} (expected {want_a} / {want_b}); "
                f"the adapter was built for another model: convert it against this base"
            )
