"""`avgguf convert` and `avgguf inspect`: writing an alignment vector as a GGUF LoRA adapter, and reading
what any tool's adapter holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from avgguf.cli import args as cli_args
from avgguf.errors import AvggufError

TORCH_HINT = (
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
    "pip install -e '.[convert]' (or a CUDA build of torch, then the same)"
)


def add_convert_parser(sub, parent) -> None:
    p = sub.add_parser(
        "convert",
        parents=[parent],
        help="turn an alignment vector (aligned - base, or a PEFT LoRA) into a GGUF LoRA",
        description="Write aligned - base (or a PEFT LoRA) as a GGUF LoRA adapter for llama.cpp.",
    )
    p.add_argument(
        "--kind",
        default="lora",
        choices=["lora", "control-vector"],
        help="lora: a GGUF LoRA adapter (default); control-vector: a llama.cpp control vector (direction.N per "
        "layer) measured on the base's residual stream, from --aligned or --preferences (see docs/convert.md)",
    )
    p.add_argument("--base", required=True, help="base model: HF checkpoint directory or .gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--preferences",
        metavar="FILE.jsonl",
        help="--kind control-vector: preference rows {prompt|query, chosen, rejected} or avgguf's {query, "
        "responses: {level: text}} (see --positive/--negative)",
    )
    src.add_argument("--aligned", help="aligned (fine-tuned) model: HF checkpoint directory or .gguf file")
    src.add_argument(
        "--peft",
        metavar="PEFT_ADAPTER_DIR",
        help="PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) trained on --base",
    )
    cli_args.add_output_args(p, "output adapter file (.gguf)")
    p.add_argument("--name", help="AV name stored in the file (default: the output file's stem)")
    p.add_argument("--domain", help="AV domain, e.g. medical (default: the name)")
    _add_size_args(p)
    _add_fit_args(p.add_argument_group("fitting (pair conversions)"))
    p.add_argument(
        "--svd",
        default="auto",
        choices=["auto", "full", "randomized"],
        help="SVD algorithm (auto: exact Gram eigensolver up to 2048 wide, randomized with 2r columns and "
        "10 power iterations above)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where torch runs the SVD")
    _add_cvec_args(p.add_argument_group("control vectors (--kind control-vector)"))
    cli_args.add_json_arg(p, "the conversion report")


def _add_cvec_args(g) -> None:
    g.add_argument(
        "--method",
        default="mean",
        choices=["mean", "pca"],
        help="--preferences: mean difference, or the first principal direction of the per-pair differences "
        "(cvector-generator's methods; the sign here is the mean's, never random)",
    )
    g.add_argument("--positive", default="expert", help="avgguf preference rows: the level that is chosen (default expert)")
    g.add_argument(
        "--negative",
        default="generic,avoidance",
        help="avgguf preference rows: the rejected levels, comma-separated (default generic,avoidance: "
        "recipes/train_dpo.py's pairs)",
    )
    g.add_argument(
        "--layer-range",
        nargs=2,
        type=cli_args.positive_int,
        metavar=("START", "END"),
        help="make directions for blocks START..END only (inclusive; default 1..n_layer-1)",
    )
    g.add_argument(
        "--calibration-tokens",
        type=cli_args.positive_int,
        default=16384,
        help="calibration tokens measured at most (all run as one batch; default 16384)",
    )


def _add_size_args(p) -> None:
    """Rank and storage: a uniform rank, an energy fraction, or a byte budget; the factor type."""
    rank = p.add_mutually_exclusive_group()
    rank.add_argument(
        "--rank",
        type=cli_args.positive_int,
        help="uniform rank (default 16 for a pair; a PEFT adapter keeps "
        "its own ranks); a rank >= a tensor's smaller dimension keeps it exact",
    )
    rank.add_argument(
        "--energy",
        type=cli_args.fraction,
        help="per tensor, the smallest rank keeping this fraction of the delta's Frobenius energy",
    )
    p.add_argument("--max-rank", type=cli_args.positive_int, help="cap for --energy and --max-size (default 128 there)")
    p.add_argument(
        "--max-size",
        metavar="SIZE",
        help="byte budget for the whole file, e.g. 10MB (KB/MB/GB, "
        "KiB/MiB/GiB): rank and factor type per tensor are chosen for the most fidelity per byte",
    )
    p.add_argument(
        "--dtype",
        choices=["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
        help="factor storage type (default f16; with --max-size, the only type used instead of a mix of "
        "f32/f16/q8_0/q5_0/q4_0). Quantized types need rank %% 32 == 0 for lora_b, else it stays f16",
    )


def _add_fit_args(fit) -> None:
    fit.add_argument(
        "--fit",
        default="svd",
        choices=["svd", "distill"],
        help="svd: best low-rank approximation of the weight delta (default); distill: start there, then "
        "train all factors together so base + AV reproduces the aligned model's outputs "
        "(needs transformers: pip install 'avgguf[train]')",
    )
    fit.add_argument(
        "--calibration",
        metavar="FILE.jsonl",
        help="calibration prompts/text for --fit distill "
        '(default: the built-in set; rows {"prompt"}, {"prompt","chosen","rejected"}, '
        '{"messages"}, {"text"}, {"tokens"}; see docs/convert.md)',
    )
    fit.add_argument(
        "--tokenizer", metavar="DIR_OR_GGUF", help="tokenizer for --fit distill (default: the one beside --aligned or --base)"
    )
    fit.add_argument("--fit-steps", type=cli_args.positive_int, default=200, help="distillation steps (default 200)")
    fit.add_argument(
        "--fit-samples",
        type=cli_args.non_negative_int,
        default=1,
        help="answers sampled from the aligned model per calibration prompt (default 1; 0 = only the given text)",
    )


def _check_inputs(args) -> None:
    """Paths the user named, checked before anything heavy is imported."""
    for flag, value in (
        ("--base", args.base),
        ("--aligned", args.aligned),
        ("--peft", args.peft),
        ("--preferences", args.preferences),
    ):
        if value is not None and not Path(value).exists():
            raise AvggufError(f"{flag} {value!r} not found (a Hugging Face checkpoint directory or a .gguf file)")
    out_dir = Path(args.out).resolve().parent
    if not out_dir.is_dir():
        raise AvggufError(f"--out {args.out!r}: directory {str(out_dir)!r} does not exist")


def _check_cvec_options(args) -> None:
    """--kind control-vector takes --aligned or --preferences; the LoRA-only flags are refused by name."""
    if args.kind != "control-vector":
        if args.preferences:
            raise AvggufError("--preferences makes a control vector: add --kind control-vector")
        return
    if args.peft:
        raise AvggufError("--kind control-vector is measured from --aligned or --preferences, not from a --peft adapter")
    lora_only = [
        f
        for f, v in (
            ("--rank", args.rank),
            ("--energy", args.energy),
            ("--max-size", args.max_size),
            ("--max-rank", args.max_rank),
            ("--dtype", args.dtype),
        )
        if v
    ]
    if args.fit != "svd":
        lora_only.append("--fit")
    if lora_only:
        raise AvggufError(f"{', '.join(lora_only)}: LoRA options; a control vector has one F32 vector per layer")
    if args.preferences and args.calibration:
        raise AvggufError("--calibration applies to --aligned pairs; --preferences is the control vector's data")


def _check_options(args) -> None:
    """Flags that do not go together, and values argparse cannot check, before torch is imported."""
    from avgguf.converters.budget import parse_size

    _check_cvec_options(args)
    if args.kind == "control-vector":
        return _check_paths(args)

    if args.max_rank and args.energy is None and args.max_size is None:
        raise AvggufError("--max-rank only applies with --energy or --max-size; for a uniform rank use --rank")
    if args.max_size is not None and (args.rank or args.energy):
        raise AvggufError("--max-size chooses the rank of each tensor itself; drop --rank/--energy (use --max-rank to cap it)")
    if args.max_size is not None:
        parse_size(args.max_size)
    if args.peft and (args.fit != "svd" or args.max_size):
        raise AvggufError("--fit distill and --max-size work on --aligned pairs; for a PEFT adapter use --rank/--energy")
    if args.fit != "distill" and (args.calibration or args.tokenizer):
        raise AvggufError("--calibration/--tokenizer only apply with --fit distill (or --kind control-vector)")
    _check_paths(args)


def _check_paths(args) -> None:
    for flag, value in (("--calibration", args.calibration), ("--tokenizer", args.tokenizer)):
        if value is not None and not Path(value).exists():
            raise AvggufError(f"{flag} {value!r} not found")


def run_convert(args) -> int:
    _check_inputs(args)
    _check_options(args)
    try:
        import safetensors  # noqa: F401
        import torch
    except ImportError as exc:
        raise AvggufError(f"conversion needs torch and safetensors ({exc.name} is missing): {TORCH_HINT}") from None
    from avgguf.converters.sources import open_source

    if args.device == "cuda" and not torch.cuda.is_available():
        raise AvggufError("--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); use --device cpu")
    name = args.name or Path(args.out).stem
    base = open_source(args.base, "--base")
    progress = sys.stderr.isatty()
    if args.kind == "control-vector":
        return _convert_cvec(args, base, name, progress)
    report = _convert_peft(args, base, name, progress) if args.peft else _convert_pair(args, base, name, progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(args.out, report)
    return 0


def _convert_cvec(args, base, name: str, progress: bool) -> int:
    from avgguf.converters import control_vector as cc
    from avgguf.converters.sources import open_source

    common = dict(
        layer_range=tuple(args.layer_range) if args.layer_range else None,
        max_tokens=args.calibration_tokens,
        device=args.device,
        force=args.force,
        name=name,
        tokenizer=args.tokenizer,
    )
    if args.preferences:
        negatives = tuple(x.strip() for x in args.negative.split(",") if x.strip())
        report = cc.convert_preferences(
            base,
            args.preferences,
            args.out,
            method=args.method,
            positive=args.positive,
            negatives=negatives,
            domain=args.domain,
            **common,
        )
    else:
        aligned = open_source(args.aligned, "--aligned")
        report = cc.convert_pair(
            base, aligned, args.out, calibration=args.calibration, samples=args.fit_samples, progress=progress, **common
        )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    fit = report.fit
    print(
        f"wrote {args.out}: control vector ({report.kind}, {report.method}), blocks {report.layers[0]}..{report.layers[-1]}, "
        f"n_embd {report.n_embd}, {report.tokens} tokens measured, {report.seconds:.0f} s"
    )
    if "kl_base" in fit:
        print(f"KL(aligned || base) {fit['kl_base']:.4f} -> KL(aligned || base + vector at 1.0) {fit['kl_steered']:.4f}")
    if "margin_base" in fit:
        print(
            f"chosen - rejected log-prob per token: base {fit['margin_base']:.4f}, "
            f"with the vector at 1.0 {fit['margin_steered']:.4f}"
        )
    return 0


def _print_report(out: str, report) -> None:
    ranks = [r.rank for r in report.records]
    types = ", ".join(sorted({r.types for r in report.records}))
    print(
        f"wrote {out}: {len(report.records)} tensor pairs, rank {min(ranks)}..{max(ranks)}, "
        f"{types}, {Path(out).stat().st_size / 1e6:.2f} MB"
    )
    if report.fit:
        print(
            f"distilled: KL(aligned || base+AV) {report.fit['kl_before']:.4f} (SVD) -> "
            f"{report.fit['kl_after']:.4f} on held-out calibration text (base alone: "
            f"{report.fit['kl_base']:.4f}), {report.fit['seconds']:.0f} s"
        )
    print(
        f"AV energy kept: {report.kept_fraction:.2%}   not applicable in llama.cpp: "
        f"{report.unapplied_fraction:.2%} ({report.skip_summary()})"
    )
    if report.unapplied_fraction > 0.05:
        print(
            f"warning: {report.unapplied_fraction:.1%} of the AV's energy is not in the adapter (reasons above)",
            file=sys.stderr,
        )


def _convert_peft(args, base, name: str, progress: bool):
    from avgguf.converters.lowrank import RankPolicy
    from avgguf.converters.peft import convert_peft

    policy = None
    if args.rank or args.energy:
        policy = RankPolicy(rank=args.rank, energy=args.energy, max_rank=args.max_rank, svd=args.svd)
    return convert_peft(args.peft, base, args.out, policy=policy, **_output(args, name, progress))


def _output(args, name: str, progress: bool) -> dict:
    """What both conversions (pair, PEFT) take alike: the AV's name and domain, storage, device, progress."""
    return {
        "name": name,
        "domain": args.domain,
        "dtype": args.dtype or "f16",
        "device": args.device,
        "progress": progress,
        "force": args.force,
    }


def _convert_pair(args, base, name: str, progress: bool):
    from avgguf.converters.budget import BUDGET_CAP_RANK, TYPES, parse_size
    from avgguf.converters.convert import convert_pair
    from avgguf.converters.lowrank import RankPolicy
    from avgguf.converters.sources import open_source

    aligned = open_source(args.aligned, "--aligned")
    max_size = parse_size(args.max_size) if args.max_size is not None else None
    if max_size is not None:
        policy = RankPolicy(rank=args.max_rank or BUDGET_CAP_RANK, svd=args.svd)
    else:
        policy = RankPolicy(
            rank=args.rank or (None if args.energy else 16), energy=args.energy, max_rank=args.max_rank, svd=args.svd
        )
    fit = None
    if args.fit == "distill":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise AvggufError("--fit distill needs transformers: pip install 'avgguf[train]'") from None
        from avgguf.converters.calibration import read_calibration
        from avgguf.converters.distill import DistillSettings

        read_calibration(args.calibration)  # fail before any work on a bad file
        fit = DistillSettings(
            steps=args.fit_steps,
            samples=args.fit_samples,
            device=args.device,
            calibration=args.calibration,
            tokenizer=args.tokenizer,
        )
    types = (args.dtype,) if args.dtype else (TYPES if max_size is not None else ("f16",))
    return convert_pair(
        base, aligned, args.out, policy=policy, max_size=max_size, types=types, fit=fit, **_output(args, name, progress)
    )


def add_inspect_parser(sub, parent) -> None:
    p = sub.add_parser("inspect", parents=[parent], help="show what a GGUF LoRA adapter holds (any tool's)")
    p.add_argument("adapter", help="adapter .gguf file")
    cli_args.add_json_arg(p, "what it holds")


def run_inspect(args) -> int:
    from avgguf.gguf.inspect import describe, render_table

    desc = describe(args.adapter)
    print(json.dumps(desc, indent=2) if args.json else render_table(desc))
    return 0
