"""`avgguf tune`: coefficients for target levels per domain (see avgguf.eval.tune)."""

from __future__ import annotations

import json
import sys

from avgguf.cli import args as cli_args
from avgguf.cli.judging import av_for_domain, judge_engine, queries_by_domain
from avgguf.config.modelfile import open_target
from avgguf.config.profile_save import check_profile_name, save_profile
from avgguf.errors import AvggufError
from avgguf.eval.judge import read_eval_data
from avgguf.eval.tune import grid, parse_target, tune


def add_parser(sub, parent) -> None:
    p = sub.add_parser(
        "tune",
        parents=[parent],
        help="find coefficients for target levels per domain",
        description="Find coefficients in [-2, 2] that make the level judge pick the target level "
        "in each domain, with far fewer evaluations than a grid.",
    )
    cli_args.add_target_arg(p, dest="modelfile")  # --target is the levels
    cli_args.add_lora_args(p)
    cli_args.add_engine_args(p)
    cli_args.add_data_args(p)
    p.add_argument(
        "--target",
        required=True,
        help="DOMAIN=LEVEL,... with LEVEL avoidance, generic or expert, e.g. legal=expert,financial=avoidance,medical=generic",
    )
    p.add_argument(
        "--budget",
        type=cli_args.positive_int,
        default=150,
        help="at most this many evaluations "
        "(one evaluation = the judge on every target domain's queries at one coefficient set; default 150)",
    )
    cli_args.add_decode_arg(p)
    p.add_argument(
        "--grid", type=cli_args.grid_step, metavar="STEP", help="instead: the exhaustive grid at this step, in (0, 4] (baseline)"
    )
    p.add_argument("--save-profile", metavar="NAME", help="write the result into the modelfile as this profile")
    cli_args.add_json_arg(p, "{coefficients, evaluations, seconds, achieved}")
    p.set_defaults(decode="weights")


def run_tune(args) -> int:
    if args.decode != "weights":
        raise AvggufError(
            f"--decode {args.decode}: tune searches coefficients in the weights only (PAD tuning is not implemented yet)"
        )
    mf, _ = open_target(args.modelfile, cli_args.loras(args))
    if args.save_profile is not None:
        check_profile_name(mf, args.save_profile, "--save-profile")  # before minutes of tuning, not after
    by_domain = queries_by_domain(read_eval_data(args.data), args.limit)  # --limit keeps every domain
    target = parse_target(args.target, sorted(by_domain))
    av_for = _avs_for(mf, target)
    progress = _progress(args)
    eng = judge_engine(mf, args)
    try:
        if args.grid is not None:
            result = grid(eng, list(mf.av_paths), by_domain, target, args.grid, progress)
        else:
            result = tune(eng, list(mf.av_paths), by_domain, target, av_for, args.budget, progress)
    finally:
        eng.close()
        if progress:
            print(file=sys.stderr)
    saved = save_profile(mf, args.save_profile, result.coefficients) if args.save_profile else None
    if args.json:
        out = {"coefficients": result.coefficients, "evaluations": result.evaluations, "seconds": round(result.seconds, 2)}
        print(json.dumps({**out, "achieved": result.achieved}, indent=1))
    else:
        _print_result(result, target, saved)
    return 0


def _avs_for(mf, target: dict[str, str]) -> dict[str, str]:
    """The AV that moves each target domain; every domain needs one."""
    av_for = {d: av_for_domain(mf, d) for d in target}
    missing = [d for d, av in av_for.items() if av is None]
    if missing:
        raise AvggufError(
            f"--target {missing[0]}: {mf.path.name} has no AV for domain {missing[0]!r} "
            f"(AVs: {', '.join(mf.av_paths) or 'none'}); the other AVs alone can still be tuned by "
            f"dropping it from --target"
        )
    return av_for


def _print_result(result, target: dict[str, str], saved) -> None:
    print(
        f"coefficients: {' '.join(f'{k}={v:g}' for k, v in result.coefficients.items())}  "
        f"({result.evaluations} evaluations, {result.seconds:.1f} s)"
    )
    for d, lvl in target.items():
        shares = result.achieved[d]
        print(f"  {d}: target {lvl} {shares[lvl]:.2f}  (" + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()) + ")")
    if saved is not None:
        replaced = " (replaced the old one)" if saved.replaced else ""
        print(f"saved profile {saved.name} in {saved.path}{replaced}")


def _progress(args):
    if args.json or not sys.stderr.isatty():
        return None
    return lambda n, best: print(f"\r{n} evaluations, best objective {best:.3f}", end="", file=sys.stderr, flush=True)
