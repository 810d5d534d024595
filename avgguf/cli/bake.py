"""`avgguf bake`: a profile as one GGUF, one adapter, an Ollama model directory or a PEFT LoRA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from avgguf.cli import args as cli_args
from avgguf.export.bake import FORMATS, GGUF_TYPES, bake, check_type, open_sources
from avgguf.config.coefficients import describe, parse_assignments
from avgguf.gguf.inspect import terminal_safe
from avgguf.config.modelfile import open_target
from avgguf.errors import AvggufError
from avgguf.gguf import adapter_format as fmt
from avgguf.gguf import control_vector as cvf


def add_parser(sub, parent) -> None:
    p = sub.add_parser(
        "bake",
        parents=[parent],
        help="write a profile as a GGUF, adapter, Ollama dir or PEFT LoRA",
        description="Bake a profile (its coefficients, with --set on top) into files that need no "
        "live knobs: stock llama.cpp, LM Studio, Ollama, transformers+peft, vLLM.",
    )
    cli_args.add_target_arg(p, profile=True)
    cli_args.add_lora_args(p)
    cli_args.add_set_arg(p)
    cli_args.add_output_args(p, "output file (gguf, adapter) or directory (ollama, peft)")
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="gguf: one merged model; adapter: one fused LoRA at scale 1; ollama: Modelfile + files; "
        "peft: adapter_config.json + adapter_model.safetensors",
    )
    p.add_argument(
        "--type",
        choices=sorted(GGUF_TYPES),
        metavar="TYPE",
        help=f"--format gguf: quantization ({', '.join(GGUF_TYPES)}; default: the base's own)",
    )
    p.add_argument(
        "--rank",
        type=cli_args.positive_int,
        help="--format adapter: re-compress to this rank by SVD (default: exact concatenation)",
    )
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=BASE,ALIGNED",
        help="--format gguf: bake AV NAME from its full fine-tune delta (ALIGNED - BASE; HF directories or "
        "GGUFs) instead of its low-rank adapter: no low-rank loss, norms included (repeatable)",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE.jsonl",
        help="--format gguf at the base's own quantized type: text whose layer inputs the merge keeps the AVs' "
        "effect on (convert's calibration format; default: the built-in set)",
    )
    cli_args.add_json_arg(p, "the report")


def split_control_vectors(mf, profile: str | None, coefs: dict[str, float], format_: str) -> tuple[dict, dict]:
    """(LoRA coefficients, active control vectors) of a profile. Control vectors are not weights: gguf and
    adapter outputs get their sum as one control-vector file beside them; Ollama and PEFT have no place for
    one, so a profile that sets one is refused there with what to do instead."""
    names = {n for n, p in mf.av_paths.items() if cvf.is_control_vector(p)}
    active = {n: c for n, c in coefs.items() if n in names and c != 0.0}
    if active and format_ not in ("gguf", "adapter"):
        raise AvggufError(
            f"bake --format {format_}: {mf.name}:{profile or 'custom'} sets control vector(s) {describe(active)}; "
            f"{format_} has no place for a llama.cpp control vector. Bake --format gguf or adapter (the summed "
            f"vector is written beside it as a .cvec.gguf for llama.cpp's --control-vector), or set "
            f"{' '.join(f'{n}=0' for n in active)} with --set"
        )
    return {n: c for n, c in coefs.items() if n not in names}, active


def _bake_control_vectors(mf, active: dict[str, float], out: str, force: bool) -> str | None:
    if not active:
        return None
    base = fmt.read_base_model(mf.base_path)
    target = str(Path(out).with_suffix("")) + ".cvec.gguf"
    vectors = [(cvf.read_control_vector(mf.av_paths[n]), c) for n, c in active.items()]
    layers = mf.spec.control_vector_layers
    cvf.write_summed(target, vectors, base.embedding_length, base.block_count, layers, base.arch, force=force)
    return target


def run_bake(args) -> int:
    check_type(args.type)
    mf, profile = open_target(args.target, cli_args.loras(args))
    coefs = mf.coefficients(profile, parse_assignments(args.sets), source="--set")
    lora_coefs, vectors = split_control_vectors(mf, profile, coefs, args.format)
    sources = open_sources(args.source, mf) if args.source else None
    report = bake(
        mf,
        profile,
        lora_coefs,
        args.out,
        args.format,
        args.type,
        args.rank,
        progress=sys.stderr.isatty(),
        sources=sources,
        force=args.force,
        calibration=args.calibration,
    )
    cvec = _bake_control_vectors(mf, vectors, args.out, args.force)
    if cvec:
        report = {**report, "coefficients": coefs, "control_vector": cvec}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        size = f", {report['bytes'] / 1e6:.2f} MB" if "bytes" in report else ""
        print(terminal_safe(f"wrote {args.out} ({args.format}{size}) from {mf.name}:{report['profile']} [{describe(coefs)}]"))
        if report.get("base") == "hard-linked":
            print(
                terminal_safe(
                    f"  {report['base_file']} is a hard link to the base {mf.base_path} (no copy): "
                    f"editing either file in place changes both"
                )
            )
        elif report.get("base") == "copied":
            print(terminal_safe(f"  {report['base_file']} is a copy of the base {mf.base_path} (another file system)"))
        if cvec:
            print(terminal_safe(f"  control vectors {describe(vectors)} summed into {cvec}: run with --control-vector {cvec}"))
    return 0
