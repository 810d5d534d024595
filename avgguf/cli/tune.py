"""`avgguf tune`: coefficients for target levels per domain (see avgguf.tune)."""

from __future__ import annotations

import json
import sys

from avgguf.cli import args as cli_args
from avgguf.cli.eval import _av_for_domain
from avgguf.runtime.engine import Engine
from avgguf.errors import AvggufError
from avgguf.eval.judge import read_eval_data
from avgguf.config.modelfile import open_target
from avgguf.config.profile_save import check_profile_name, save_profile
from avgguf.runtime.threads import ThreadPolicy
from avgguf.eval.tune import grid, parse_target, tune


def add_parser(sub, parent) -> None:
    p = sub.add_parser(
        "tune",
        parents=[parent],
        help="find coefficients for target levels per domain",
        description="Find coefficients in [-2, 2] that make the level judge pick the target level "
        "in each domain, with far fewer evaluations than a grid.",
    )
    p.add_argument("modelfile", metavar="MODELFILE|BASE.gguf")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[=SCALE]")
    p.add_argument("--data", required=True, help="preference JSONL (the held-out split), as for `avgguf eval`")
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
    p.add_argument("--limit", type=cli_args.positive_int, help="at most this many queries per domain")
    p.add_argument(
        "--decode", default="weights", choices=["weights"], help="weights: AVs in the weights (PAD tuning is not implemented yet)"
    )
    p.add_argument(
        "--grid", type=cli_args.grid_step, metavar="STEP", help="instead: the exhaustive grid at this step, in (0, 4] (baseline)"
    )
    p.add_argument("--save-profile", metavar="NAME", help="write the result into the modelfile as this profile")
    p.add_argument("--threads", type=cli_args.non_negative_int)
    p.add_argument("--json", action="store_true", help="print {coefficients, evaluations, seconds, achieved}")


def run_tune(args) -> int:
    mf, _ = open_target(args.modelfile, args.lora)
    if args.save_profile is not None:
        check_profile_name(mf, args.save_profile, "--save-profile")  # before minutes of tuning, not after
    rows = read_eval_data(args.data)
    by_domain: dict[str, list[dict]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r)
    target = parse_target(args.target, sorted(by_domain))
    av_for = {d: _av_for_domain(mf, d) for d in target}
    missing = [d for d, av in av_for.items() if av is None]
    if missing:
        raise AvggufError(
            f"--target {missing[0]}: {mf.path.name} has no AV for domain {missing[0]!r} "
            f"(AVs: {', '.join(mf.av_paths) or 'none'}); the other AVs alone can still be tuned by "
            f"dropping it from --target"
        )
    if args.limit:
        by_domain = {d: rs[:: max(1, -(-len(rs) // args.limit))][: args.limit] for d, rs in by_domain.items()}
    names = list(mf.av_paths)
    progress = _progress(args)
    eng = Engine(
        mf.base_path,
        n_ctx=1024,
        logits_all=True,
        fuse="sync",
        verbose=args.verbose,
        threads=ThreadPolicy.from_settings(args.threads, mf.spec.defaults.n_threads),
    )
    try:
        for name, path in mf.av_paths.items():
            eng.load_adapter(name, path)
        if args.grid is not None:
            result = grid(eng, names, by_domain, target, args.grid, progress)
        else:
            result = tune(eng, names, by_domain, target, av_for, args.budget, progress)
    finally:
        eng.close()
        if progress:
            print(file=sys.stderr)
    saved = save_profile(mf, args.save_profile, result.coefficients) if args.save_profile else None
    out = {
        "coefficients": result.coefficients,
        "evaluations": result.evaluations,
        "seconds": round(result.seconds, 2),
        "achieved": result.achieved,
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
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
    return 0


def _progress(args):
    if args.json or not sys.stderr.isatty():
        return None
    return lambda n, best: print(f"\r{n} evaluations, best objective {best:.3f}", end="", file=sys.stderr, flush=True)
