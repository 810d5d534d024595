"""`avgguf bake`: one profile as files that need no live knobs.

- gguf:    one complete model, base + Σ c·ΔW, streamed one tensor at a time into a float32 intermediate and
           quantized by llama.cpp's own quantizer (llama_model_quantize) to the base's type or --type.
- adapter: one fused GGUF LoRA at scale 1 (avgguf.gguf.fuse), optionally re-compressed to --rank.
- ollama:  a directory with an Ollama Modelfile (FROM base, ADAPTER fused adapter, SYSTEM, PARAMETERs).
- peft:    a PEFT LoRA directory (avgguf.export.peft).
Every output records the profile and coefficients it was baked from. Outputs appear atomically and never
replace what avgguf did not write (avgguf.atomic: an existing file or directory is replaced only if it is an
earlier avgguf output of the same kind, or with --force; an --out that is, or contains, an input is refused;
free space is checked before the multi-GB gguf bake).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as QType

from avgguf.gguf import adapter_format as fmt
from avgguf import atomic
from avgguf.errors import AvggufError
from avgguf.gguf.fuse import Cancelled, write_fused
from avgguf.gguf.recompress import write_recompressed
from avgguf.export.merge import Bake, open_av_sources, touched_names, write_merged_f32
from avgguf.export.requant_bake import baked_kept_type
from avgguf.config.modelfile import Modelfile

FORMATS = ("gguf", "adapter", "ollama", "peft")
# --type for `--format gguf` -> llama.cpp's LLAMA_FTYPE_* name
GGUF_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q2_k": "MOSTLY_Q2_K",
}
# bytes per weight of each --type (K_M mixes keep some tensors one type up: about 10 % more), for the
# free-space check before a gguf bake
BYTES_PER_WEIGHT = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q6_k": 210 / 256,
    "q5_k_m": 176 / 256 * 1.1,
    "q5_k_s": 176 / 256,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_k_m": 144 / 256 * 1.1,
    "q4_k_s": 144 / 256,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "q3_k_m": 110 / 256 * 1.1,
    "q2_k": 84 / 256 * 1.2,
}


# --- shared helpers ----------------------------------------------------------------------------------------


def fused_adapter(bake: Bake, out: Path, rank: int | None = None) -> Path:
    """The profile as one adapter at scale 1 (exact concatenation; --rank: re-compressed by SVD)."""
    if not bake.active:
        raise AvggufError(
            f"profile {bake.label!r} has every coefficient at 0: nothing to bake into an adapter "
            f"(the base model alone is the result)"
        )
    arch = fmt.read_base_model(bake.modelfile.base_path).arch
    with atomic.output_file(out, **bake.file_policy("adapter")) as tmp:
        if rank is None:
            write_fused(bake.active, tmp, arch, extra=bake.metadata())
        else:
            with atomic.scratch_dir(out) as scratch:
                exact = write_fused(bake.active, scratch / "exact.gguf", arch)
                write_recompressed(exact, tmp, arch, rank, bake.metadata())
    return out


# --- gguf ---------------------------------------------------------------------------------------------------


def _ftype(type_: str) -> int:
    import llama_cpp

    return getattr(llama_cpp, f"LLAMA_FTYPE_{GGUF_TYPES[type_]}")


# Re-quantizing a base that is already below 8 bits after adding a small delta snaps most weights back
# onto the old grid: SmolLM2 Q4_1 + the demo profile baked to Q4_1 kept 0.10 of the profile's effect, to
# Q8_0 0.98 (bench/bake_speed.py). So the default keeps 8-bit-or-better bases' type and otherwise uses q8_0.
KEEPS_EFFECT = ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "MOSTLY_Q8_0")


def stored_ftype(reader: gguf.GGUFReader) -> int | None:
    """The base's general.file_type (llama.cpp's LLAMA_FTYPE_*), if it records one."""
    field = reader.get_field(gguf.Keys.General.FILE_TYPE)
    return None if field is None else int(field.contents())


def keeps_blocks(reader: gguf.GGUFReader, ftype: int, type_: str | None) -> bool:
    """Whether `--type` asks for the base's own quantized type: then the merge keeps the base's blocks
    (avgguf.export.requant_bake) instead of re-deciding every rounding, which loses a small AV's effect."""
    import llama_cpp

    full = {getattr(llama_cpp, f"LLAMA_FTYPE_{name}") for name in ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16")}
    return type_ is not None and ftype == stored_ftype(reader) and ftype not in full


def default_ftype(reader: gguf.GGUFReader) -> int:
    import llama_cpp

    stored = stored_ftype(reader)
    keeps = {getattr(llama_cpp, f"LLAMA_FTYPE_{name}") for name in KEEPS_EFFECT}
    return stored if stored in keeps else llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0


def bake_bytes(reader: gguf.GGUFReader, touched: set[str], type_name: str) -> tuple[int, int]:
    """(float32 intermediate, quantized output) sizes in bytes, estimated from the base's header."""
    merged = output = int(reader.data_offset)
    per_weight = BYTES_PER_WEIGHT.get(type_name, 4.0)
    for t in reader.tensors:
        merged += int(t.n_elements) * 4 if t.name in touched else int(t.n_bytes)
        output += int(int(t.n_elements) * per_weight) if len(t.shape) >= 2 else int(t.n_elements) * 4
    return merged, output


def baked_gguf(
    bake: Bake,
    out: Path,
    type_: str | None = None,
    progress: bool = False,
    threads: int | None = None,
    stop=None,
    calibration: str | Path | None = None,
) -> dict:
    """The whole model with the profile merged in, quantized by llama.cpp to `type_` (default: see
    default_ftype) on `threads` threads (default: all cores); tensors the profile does not touch keep their
    stored type where that type is chosen. `stop`: see write_merged_f32 (checked before quantizing too).
    The float32 intermediate lives in a scratch directory beside `out`; both sizes are checked against the
    free space there first. A `type_` that is the base's own quantized type keeps the base's blocks instead
    (keeps_blocks; `calibration`: the text whose layer inputs the merge is fitted on)."""
    import llama_cpp

    base_reader = gguf.GGUFReader(bake.modelfile.base_path)
    ftype = _ftype(type_) if type_ else default_ftype(base_reader)
    sources, full = open_av_sources(bake)
    touched = touched_names({t.name: t for t in base_reader.tensors}, sources, full)
    del sources, full
    if bake.full_base is None and keeps_blocks(base_reader, ftype, type_):  # from full precision: quantize afresh
        return {"type": type_, **baked_kept_type(bake, out, touched, progress, stop, calibration)}
    merged_size, out_size = bake_bytes(base_reader, touched, type_ or _type_name(ftype))
    with (
        atomic.output_file(out, needed_bytes=merged_size + out_size, **bake.file_policy("model")) as partial,
        atomic.scratch_dir(out) as tmp,
    ):
        merged = write_merged_f32(bake, tmp / "merged-f32.gguf", progress, stop)
        if stop is not None and stop():
            raise Cancelled
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads or os.cpu_count() or 1
        params.allow_requantize = True
        touched = {name for _, path, _ in bake.active for name in fmt.read_adapter(path).pairs}
        types = {t.name: t.tensor_type for t in base_reader.tensors}
        if type_ is None:  # embeddings the profile does not touch keep the base's own types
            if fmt.TOKEN_EMBD in types and fmt.TOKEN_EMBD not in touched:
                params.token_embedding_type = int(types[fmt.TOKEN_EMBD])
            if fmt.OUTPUT in types and fmt.OUTPUT not in touched:
                params.output_tensor_type = int(types[fmt.OUTPUT])
        rc = llama_cpp.llama_model_quantize(str(merged).encode(), str(partial).encode(), params)
        if rc != 0:
            raise AvggufError(f"llama.cpp's quantizer failed on the merged model (code {rc}); try another --type")
    return {"format": "gguf", "type": type_ or _type_name(ftype), "bytes": out.stat().st_size}


def _type_name(ftype: int) -> str:
    import llama_cpp

    return next((k for k, v in GGUF_TYPES.items() if getattr(llama_cpp, f"LLAMA_FTYPE_{v}") == ftype), str(ftype))


# --- ollama -------------------------------------------------------------------------------------------------

OLLAMA_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repeat_penalty": "repeat_penalty",
    "seed": "seed",
    "n_ctx": "num_ctx",
    "max_tokens": "num_predict",
}


OLLAMA_FILES = ("Modelfile", "adapter.gguf", atomic.MARKER)


def ollama_system(system: str, where: str) -> str:
    """The SYSTEM instruction for `system`; refused where it would end Ollama's \"\"\"-string early (and let the
    rest of the text inject Modelfile instructions)."""
    if '"""' in system or system.endswith('"'):
        raise AvggufError(
            f"{where}: system: contains '\"\"\"' (or ends in '\"'), which would end the SYSTEM string "
            f"of the Ollama Modelfile and let the rest be read as instructions; reword it (e.g. "
            f"use single quotes) and bake again"
        )
    return f'SYSTEM """{system}"""'


def ollama_base_name(base: Path) -> str:
    """The name the base gets inside the Ollama directory: its own, unless unprintable or taken by ours."""
    name = base.name
    return name if name.isprintable() and name not in OLLAMA_FILES and name.strip() == name else "base.gguf"


def ollama_modelfile(bake: Bake, base_name: str, adapter_name: str | None) -> str:
    mf = bake.modelfile
    coefs = " ".join(f"{k}={v:g}" for k, v in bake.coefficients.items())
    label = "".join(ch if ch.isprintable() else "?" for ch in f"{mf.name}:{bake.label} ({coefs})")
    lines = [f"# avgguf bake of {label}; Ollama applies the adapter at scale 1", f"FROM ./{base_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    if mf.spec.system:
        lines.append(ollama_system(mf.spec.system, str(mf.path)))
    defaults = mf.spec.defaults.model_dump()
    for ours, theirs in OLLAMA_PARAMETERS.items():
        if defaults.get(ours) is not None:
            lines.append(f"PARAMETER {theirs} {defaults[ours]}")
    return "\n".join(lines) + "\n"


def ollama_dir(bake: Bake, out: Path) -> dict:
    """FROM the base (hard-linked where the file system allows: in-place edits of either name change both;
    else copied), ADAPTER the fused profile, SYSTEM and PARAMETERs; avgguf.json marks the directory as ours."""
    base = bake.modelfile.base_path
    fmt.read_base_model(base)  # a real GGUF model, AVs active or not (`base: /etc/passwd` is refused)
    base_name = ollama_base_name(base)
    adapter = "adapter.gguf" if bake.active else None
    text = ollama_modelfile(bake, base_name, adapter)
    with atomic.output_dir(out, "ollama", force=bake.force, inputs=bake.inputs()) as d:
        try:
            os.link(base, d.path / base_name)  # no copy where the file system allows
            how = "hard-linked"
        except OSError:
            atomic.check_free_space(d.path, base.stat().st_size + (1 << 20), f"--out {str(out)!r} (a copy of the base)")
            shutil.copy2(base, d.path / base_name)
            how = "copied"
        if adapter:
            fused_adapter(bake, d.path / adapter)
        (d.path / "Modelfile").write_text(text, encoding="utf-8")
        d.meta.update(bake.metadata())
        d.meta["base_gguf"] = str(base)
        files = sorted(p.name for p in d.path.iterdir()) + [atomic.MARKER]
    return {"format": "ollama", "files": sorted(files), "base": how, "base_file": base_name}


# --- entry point --------------------------------------------------------------------------------------------


def open_sources(specs: list[str], mf: Modelfile) -> dict:
    """--source NAME=BASE,ALIGNED (HF directories or GGUFs): the full AV, checked against the base GGUF."""
    from avgguf.converters.sources import open_source

    out = {}
    base_info = fmt.read_base_model(mf.base_path)
    for spec in specs:
        name, sep, pair = spec.partition("=")
        parts = pair.split(",")
        if not sep or len(parts) != 2 or not all(parts):
            raise AvggufError(
                f"--source {spec!r}: expected NAME=BASE,ALIGNED (the fine-tune's base and aligned "
                f"checkpoints: HF directories or .gguf files)"
            )
        if name not in mf.av_paths:
            raise AvggufError(f"--source {spec!r}: no AV named {name!r}; AVs: {', '.join(mf.av_paths) or 'none'}")
        base, aligned = open_source(parts[0], "--source base"), open_source(parts[1], "--source aligned")
        if aligned.arch.gguf_name != base_info.arch or base.n_layer != aligned.n_layer:
            raise AvggufError(
                f"--source {spec!r}: {aligned.arch.gguf_name} with {aligned.n_layer} layers does not "
                f"match the base GGUF ({base_info.arch}, {base_info.block_count} layers)"
            )
        out[name] = (base, aligned)
    return out


def bake(
    mf: Modelfile,
    profile: str | None,
    coefficients: dict[str, float],
    out: str | Path,
    format_: str,
    type_: str | None = None,
    rank: int | None = None,
    progress: bool = False,
    sources: dict | None = None,
    force: bool = False,
    calibration: str | Path | None = None,
) -> dict:
    """Bake into `out`; `force`: replace an existing output avgguf did not write (a directory output keeps the
    other files it holds)."""
    out = Path(out)
    if sources and format_ != "gguf":
        raise AvggufError("--source applies to --format gguf (the other formats are adapters)")
    if format_ not in FORMATS:
        raise AvggufError(f"--format {format_!r}: choose one of {', '.join(FORMATS)}")
    if type_ is not None and format_ != "gguf":
        raise AvggufError("--type applies to --format gguf (adapters keep their factor types; see --rank)")
    if rank is not None and format_ != "adapter":
        raise AvggufError("--rank applies to --format adapter")
    if calibration is not None and format_ != "gguf":
        raise AvggufError("--calibration applies to --format gguf at the base's own quantized --type")
    job = Bake(mf, profile, coefficients, sources, force)
    if format_ in ("gguf", "adapter"):  # before any heavy work (output_file checks again when publishing)
        atomic.check_output_file(out, **job.file_policy("model" if format_ == "gguf" else "adapter"))
    if format_ == "gguf":
        report = baked_gguf(job, out, type_, progress, calibration=calibration)
    elif format_ == "adapter":
        fused_adapter(job, out, rank)
        report = {"format": "adapter", "bytes": out.stat().st_size, "rank": rank or "exact"}
    elif format_ == "ollama":
        report = ollama_dir(job, out)
    else:
        from avgguf.export.peft import peft_dir

        report = peft_dir(job, out)
    return {**report, "out": str(out), "profile": job.label, "coefficients": coefficients}


def check_type(type_: str | None) -> None:
    if type_ is not None and type_ not in GGUF_TYPES:
        raise AvggufError(f"--type {type_!r}: choose one of {', '.join(GGUF_TYPES)}")


def describe_types() -> str:
    return ", ".join(GGUF_TYPES)


__all__ = ["FORMATS", "GGUF_TYPES", "Bake", "QType", "bake"]
