"""Alignment vector (aligned - base) -> GGUF LoRA adapter, streamed one tensor pair at a time."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avgguf.version import __version__
from avgguf.gguf import adapter_format as fmt
from avgguf.errors import ConversionError
from .deltas import Delta, applicable_deltas, factor, load_delta, relative_error, rows_of
from .lowrank import Factors, RankPolicy
from .sources import TensorSource

log = logging.getLogger(__name__)


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    rank: int
    energy: float
    kept: float  # energy fraction in the kept singular values
    rel_error: float  # ||delta - written pair|| / ||delta|| after dtype rounding
    method: str
    types: str = ""  # lora_a/lora_b storage types


@dataclass
class SkipRecord:
    name: str
    energy: float
    reason: str


@dataclass
class ConversionReport:
    out: str
    records: list[TensorRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    zero_tensors: int = 0
    fit: dict = field(default_factory=dict)  # kl_base / kl_before / kl_after / seconds of --fit distill

    @property
    def total_energy(self) -> float:
        return sum(r.energy for r in self.records) + sum(s.energy for s in self.skipped)

    @property
    def unapplied_fraction(self) -> float:
        total = self.total_energy
        return sum(s.energy for s in self.skipped) / total if total else 0.0

    @property
    def kept_fraction(self) -> float:
        """Share of the whole AV's energy the adapter carries (after truncation and skips)."""
        total = self.total_energy
        return sum(r.energy * r.kept for r in self.records) / total if total else 1.0

    def skip_summary(self) -> str:
        """The skipped tensors by reason, largest energy first: '61 tensors: 60 norm (...), 1 tied embeddings (...)'."""
        groups: dict[str, list[SkipRecord]] = {}
        for s in self.skipped:
            groups.setdefault(s.reason, []).append(s)
        total = self.total_energy or 1.0
        parts = sorted(groups.items(), key=lambda kv: -sum(s.energy for s in kv[1]))
        text = ", ".join(f"{len(v)} {reason} [{sum(s.energy for s in v) / total:.2%}]" for reason, v in parts)
        return f"{len(self.skipped)} tensors: {text}" if self.skipped else "none"

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "total_energy": self.total_energy,
            "kept_fraction": self.kept_fraction,
            "unapplied_fraction": self.unapplied_fraction,
            "zero_tensors": self.zero_tensors,
            "fit": self.fit,
            "tensors": [asdict(r) for r in self.records],
            "skipped": [asdict(s) for s in self.skipped],
        }


class AdapterBuild:
    """Collects factored tensors into an adapter file plus the avgguf.* bookkeeping."""

    def __init__(self, out: str | Path, arch: str, name: str, dtype: str, *, force: bool = False, inputs: tuple = ()):
        """`out` is checked at once (avgguf.atomic): an existing file is replaced only if avgguf wrote it as an
        adapter, or with `force`; it may be none of `inputs`."""
        if dtype not in fmt.DTYPES:
            raise ConversionError(f"--dtype {dtype!r} is not supported; choose one of {sorted(fmt.DTYPES)}")
        self.writer = fmt.AdapterWriter(out, arch, name, force=force, inputs=inputs)
        self.dtype = dtype
        self.report = ConversionReport(str(out))

    def add(
        self,
        name: str,
        delta_shape: tuple[int, ...],
        f: Factors,
        delta: Delta | None = None,
        types: tuple[str, str] | None = None,
    ) -> None:
        """Write one pair and book its error against `delta` (None: a low-rank source, against the
        factors given)."""
        type_a, type_b = types or (self.dtype, self.dtype)
        lora_a, lora_b = fmt.pair_from_factors(name, f.left, f.right)
        a_seen, b_seen = self.writer.add_pair(name, lora_a, lora_b, type_a, type_b)
        if delta is None:
            rows = lambda a, b: f.left[a:b] @ (f.right if f.right.ndim == 2 else f.right[a:b])  # noqa: E731
        else:
            rows = rows_of(delta)
        err = relative_error(name, tuple(delta_shape), rows, a_seen, b_seen)
        stored = "/".join(fmt.type_name(fmt.storage_type(t, arr)) for t, arr in ((type_a, lora_a), (type_b, lora_b)))
        self.report.records.append(TensorRecord(name, tuple(delta_shape), f.rank, f.energy, f.kept, err, f.method, stored))

    def count_zero(self) -> None:
        self.report.zero_tensors += 1

    def skip(self, name: str, energy: float, reason: str) -> None:
        log.info("not applied by llama.cpp: %s (%s), %.3g of delta energy", name, reason, energy)
        self.report.skipped.append(SkipRecord(name, energy, reason))

    def commit(self, meta: dict, max_size: int | None = None) -> ConversionReport:
        rep = self.report
        if not rep.records:
            self.writer.abort()
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in rep.skipped[:5]) or "every delta is zero"
            raise ConversionError(
                f"nothing llama.cpp can apply: {reasons}. Check that --aligned differs from --base in its attention/MLP weights"
            )
        w = self.writer
        w.add_metadata(fmt.KEY_VERSION, __version__)
        for key, value in meta.items():
            w.add_metadata(key, value)
        w.add_metadata(fmt.KEY_DTYPE, self.dtype)
        w.add_metadata(fmt.KEY_ENERGY_TOTAL, float(rep.total_energy))
        w.add_metadata(fmt.KEY_ENERGY_UNAPPLIED, float(rep.unapplied_fraction))
        w.add_metadata(fmt.KEY_ENERGY_KEPT, float(rep.kept_fraction))
        w.add_metadata(fmt.KEY_T_NAME, [r.name for r in rep.records])
        w.add_metadata(fmt.KEY_T_RANK, [int(r.rank) for r in rep.records])
        w.add_metadata(fmt.KEY_T_ENERGY, [float(r.energy) for r in rep.records])
        w.add_metadata(fmt.KEY_T_KEPT, [float(r.kept) for r in rep.records])
        w.add_metadata(fmt.KEY_T_ERROR, [float(r.rel_error) for r in rep.records])
        w.add_metadata(fmt.KEY_T_TYPES, [r.types for r in rep.records])
        w.add_metadata(fmt.KEY_S_NAME, [s.name for s in rep.skipped])
        w.add_metadata(fmt.KEY_S_ENERGY, [float(s.energy) for s in rep.skipped])
        w.add_metadata(fmt.KEY_S_REASON, [s.reason for s in rep.skipped])
        w.commit(max_size)
        return rep


def check_compatible(base: TensorSource, aligned: TensorSource) -> None:
    for attr, label in (
        ("arch", "architecture"),
        ("n_layer", "block count"),
        ("n_embd", "hidden size"),
        ("n_head", "attention heads"),
        ("n_head_kv", "KV heads"),
    ):
        b, a = getattr(base, attr), getattr(aligned, attr)
        if attr == "arch":
            b, a = b.gguf_name, a.gguf_name
        if b != a:
            raise ConversionError(
                f"--base and --aligned are different models: {label} {b} in {base.path} "
                f"vs {a} in {aligned.path}; the aligned model must be a fine-tune of the base"
            )
    bn, an = set(base.names()), set(aligned.names())
    for missing, have, lacks in ((sorted(bn - an), base, aligned), (sorted(an - bn), aligned, base)):
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConversionError(f"tensor {missing[0]!r}{more} is in {have.path} but missing from {lacks.path}")
    for name in base.names():
        if base.shape(name) != aligned.shape(name):
            raise ConversionError(
                f"tensor {name!r}: shape {base.shape(name)} in {base.path} vs {aligned.shape(name)} in {aligned.path}"
            )


@dataclass
class Planned:
    """One tensor's factors and storage types, chosen before anything is written."""

    shape: tuple[int, ...]
    factors: Factors
    types: tuple[str, str]


def _deltas(base: TensorSource, aligned: TensorSource, build: AdapterBuild, progress: bool, desc: str):
    names = tqdm(base.names(), desc=desc, unit="tensor", disable=not progress, leave=False)
    yield from applicable_deltas(base, aligned, names, build.count_zero, build.skip)


def _plan(
    base: TensorSource,
    aligned: TensorSource,
    build: AdapterBuild,
    policy: RankPolicy,
    device: str,
    progress: bool,
    max_size: int | None,
    types: tuple[str, ...],
) -> dict[str, Planned]:
    """Pass 1: factor every delta up to the policy's cap; then, under --max-size, choose rank and
    types per tensor (converters.budget)."""
    from . import budget

    plans: dict[str, Planned] = {}
    options: dict[str, list] = {}
    for tname, delta in _deltas(base, aligned, build, progress, "factoring"):
        f = factor(delta, policy, device)
        plans[tname] = Planned(delta.shape, f, (types[0], types[0]))
        if max_size is not None:
            a, b = fmt.pair_from_factors(tname, f.left, f.right)
            options[tname] = budget.candidates(tname, delta.shape, a, b, f.spectrum[: f.rank], f.energy, types)
        del delta
    if max_size is None or not plans:
        return plans
    overhead = budget.FILE_OVERHEAD + sum(24 + len(s.name) + len(s.reason) for s in build.report.skipped)
    chosen = budget.allocate(options, max_size, overhead)
    return {
        n: Planned(p.shape, p.factors.truncated(chosen[n].rank), (chosen[n].type_a, chosen[n].type_b)) for n, p in plans.items()
    }


def _write_planned(base: TensorSource, aligned: TensorSource, build: AdapterBuild, plans: dict[str, Planned]) -> None:
    """Pass 2: write each planned pair; the delta is re-read to book the error against the real AV."""
    for tname, p in plans.items():
        build.add(tname, p.shape, p.factors, load_delta(base, aligned, tname), p.types)


def _pair_meta(base: TensorSource, aligned: TensorSource, name: str, domain: str | None, policy: RankPolicy) -> dict:
    return {
        fmt.KEY_NAME: name,
        fmt.KEY_DOMAIN: domain or name,
        fmt.KEY_SOURCE_KIND: "pair",
        fmt.KEY_SOURCE_BASE: str(base.path),
        fmt.KEY_SOURCE_ALIGNED: str(aligned.path),
        fmt.KEY_RANK_POLICY: policy.describe(),
        fmt.KEY_SVD: policy.svd,
        fmt.KEY_BASE_N_LAYER: base.n_layer,
        fmt.KEY_BASE_N_EMBD: base.n_embd,
    }


def _fitted(base, aligned, build: AdapterBuild, plans: dict[str, Planned], fit, meta: dict, progress: bool):
    """--fit distill: the planned factors trained toward the aligned model's outputs."""
    from .distill import distill

    fitted, fit_meta = distill(base, aligned, {n: p.factors for n, p in plans.items()}, fit, progress)
    meta.update(fit_meta)
    keys = {"kl_base": fmt.KEY_FIT_KL_BASE, "kl_before": fmt.KEY_FIT_KL_BEFORE, "kl_after": fmt.KEY_FIT_KL_AFTER}
    build.report.fit = {k: fit_meta[v] for k, v in keys.items()} | {"seconds": fit_meta[fmt.KEY_FIT_SECONDS]}
    return {n: Planned(p.shape, fitted[n], p.types) for n, p in plans.items()}


def _book_unmapped(base: TensorSource, aligned: TensorSource, build: AdapterBuild) -> None:
    """Checkpoint tensors with no adapter pair (vision towers, unmapped names), booked with their reason."""
    for hf_name in sorted(set(base.unmapped) & set(aligned.unmapped)):
        energy = float(np.sum(np.square(aligned.load_unmapped(hf_name) - base.load_unmapped(hf_name), dtype=np.float64)))
        if energy > 0:
            build.skip(hf_name, energy, base.unmapped[hf_name])


def convert_pair(
    base: TensorSource,
    aligned: TensorSource,
    out: str | Path,
    *,
    name: str,
    domain: str | None = None,
    policy: RankPolicy = RankPolicy(rank=16),
    dtype: str = "f16",
    device: str = "cpu",
    progress: bool = False,
    max_size: int | None = None,
    types: tuple[str, ...] | None = None,
    fit=None,
    force: bool = False,
) -> ConversionReport:
    """Write the AV aligned - base as a GGUF LoRA adapter at `out` (published atomically; an existing `out`
    is replaced only if avgguf wrote it, or with `force`; `out` may not be --base or --aligned, or hold them).

    max_size: byte budget for the whole file (per-tensor rank and factor types chosen to fit; `types`
    are the factor types it may use). fit: a converters.distill.DistillSettings to train the factors
    toward the aligned model's outputs before writing."""
    check_compatible(base, aligned)
    for src in (base, aligned):
        if src.quantized:
            log.warning("%s is quantized: its quantization noise enters the alignment vector", src.path)
    build = AdapterBuild(out, base.arch.gguf_name, name, dtype, force=force, inputs=(base.path, aligned.path))
    try:
        meta = _pair_meta(base, aligned, name, domain, policy)
        if max_size is None and fit is None:
            for tname, delta in _deltas(base, aligned, build, progress, "converting"):
                build.add(tname, delta.shape, factor(delta, policy, device), delta)
                del delta
        else:
            plans = _plan(base, aligned, build, policy, device, progress, max_size, types or (dtype,))
            if max_size is not None:
                meta[fmt.KEY_SIZE_BUDGET] = int(max_size)
                meta[fmt.KEY_RANK_POLICY] = f"max_size={max_size},max_rank={policy.rank}"
            if fit is not None and plans:
                plans = _fitted(base, aligned, build, plans, fit, meta, progress)
            _write_planned(base, aligned, build, plans)
        _book_unmapped(base, aligned, build)
        return build.commit(meta, max_size)
    except BaseException:
        build.writer.abort()
        raise
