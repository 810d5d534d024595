"""`avgguf eval`: the level judge over a λ sweep, cross-domain effects, profile mixes, prompting baseline."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from avgguf.cli import args as cli_args
from avgguf.cli.judging import JUDGE_CTX, av_for_domain, judge_engine, queries_by_domain
from avgguf.config.coefficients import check_value
from avgguf.config.modelfile import open_target
from avgguf.errors import AvggufError
from avgguf.eval import answer_judge
from avgguf.eval.answer_judge import LEVELS as JUDGED
from avgguf.eval.judge import (
    EXPERT_PROMPT,
    LEVELS,
    Judge,
    pad_sweep,
    parse_lambdas,
    plot_sweeps,
    read_eval_data,
    sweep,
)
from avgguf.gguf import adapter_format as fmt


GENERATED_TOKENS = 96  # tokens per --generate answer without --max-tokens
MAX_LAMBDAS = 201  # points of one sweep; each costs a pass of the judge over the domain's queries


def add_parser(sub, parent) -> None:
    p = sub.add_parser(
        "eval",
        parents=[parent],
        help="judge avoidance/generic/expert shares as the AV coefficients move",
        description="The level judge: which of each query's reference answers (avoidance, generic, expert) the "
        "model finds likeliest, as each domain's AV coefficient λ moves. With --decode pad/pad-full, λ is the "
        "AV's PAD reward weight and the references are scored under the decoding distribution.",
    )
    cli_args.add_target_arg(p, dest="modelfile")
    cli_args.add_lora_args(p)
    cli_args.add_engine_args(p)
    cli_args.add_data_args(p)
    p.add_argument("--domain", help="only this domain's queries")
    p.add_argument("--lambdas", default="-1:1.5:0.25", help="START:STOP:STEP or a list (default -1:1.5:0.25)")
    p.add_argument("--cross", action="store_true", help="also: each AV and each profile on every domain")
    p.add_argument(
        "--prompting",
        action="store_true",
        help="also: a system prompt asking for expert answers, "
        "without AVs, side by side with the AV at λ=1 (share and time per query)",
    )
    cli_args.add_decode_arg(p)
    p.add_argument(
        "--generate",
        type=cli_args.positive_int,
        metavar="N",
        help="also generate answers to N queries per "
        "domain and setting and judge their level (avoidance/generic/expert/off-level) with the answer judge, "
        "trained on hand-labeled generated answers (--judge-data)",
    )
    p.add_argument(
        "--judge-data",
        help="the answer judge's hand-labeled generated answers (default: judge/answers.jsonl in the folder "
        "above --data's, i.e. data/judge/answers.jsonl for data/preferences/eval.jsonl)",
    )
    cli_args.add_max_tokens_arg(p)
    p.add_argument(
        "--transfer",
        metavar="OTHER.gguf",
        help="also apply the same AVs to another fine-tune of the "
        "same base and show their effect there next to their effect on the base",
    )
    p.add_argument("--plot", help="write the λ sweep as a PNG")
    cli_args.add_json_arg(p, "all results")
    p.set_defaults(decode="weights", max_tokens=GENERATED_TOKENS)


def lambdas_arg(text: str) -> list[float]:
    """--lambdas checked before anything is built: START:STOP:STEP within the coefficient range with at most
    MAX_LAMBDAS points (a step of 1e-9 would otherwise build a list of billions), or a list of such numbers."""
    where = f"--lambdas {text[:80]!r}"
    if ":" in text:
        try:
            start, stop, step = (float(x) for x in text.split(":"))
        except ValueError:
            raise AvggufError(f"{where}: expected START:STOP:STEP (e.g. -1:1.5:0.25) or a list 0,0.5,1") from None
        for label, value in (("START", start), ("STOP", stop)):
            check_value("λ", value, f"{where}: {label}")
        if not step > 0 or not math.isfinite(step):
            raise AvggufError(f"{where}: STEP must be a number > 0, got {step:g}")
        if (stop - start) / step + 1 > MAX_LAMBDAS:
            raise AvggufError(f"{where}: {int((stop - start) / step) + 1} points; at most {MAX_LAMBDAS}, use a larger STEP")
    elif text.count(",") >= MAX_LAMBDAS:
        raise AvggufError(f"{where}: more than {MAX_LAMBDAS} values")
    return [check_value("λ", lam, "--lambdas") for lam in parse_lambdas(text)]


def _judge_data(args) -> str:
    """--judge-data, else judge/answers.jsonl in the folder above --data's (data/preferences/eval.jsonl ->
    data/judge/answers.jsonl), as the references are found beside --data."""
    return args.judge_data or str(Path(args.data).resolve().parent.parent / "judge" / "answers.jsonl")


def _check_paths(args) -> None:
    """Files named by flags that are used only after the sweeps: checked before minutes of work."""
    if args.transfer is not None:
        path = Path(args.transfer)
        if not path.is_file() or fmt.gguf_kind(path) != "model":
            raise AvggufError(
                f"--transfer {args.transfer!r}: expected a GGUF model (another fine-tune of the base)"
                + ("" if path.is_file() else "; not found")
            )
    if args.generate and not Path(_judge_data(args)).is_file():
        raise AvggufError(
            f"--generate needs the answer judge's labeled answers: --judge-data {_judge_data(args)!r} not found "
            "(data/judge/answers.jsonl of the source tree, made by recipes/make_judge_set.py)"
        )
    if args.plot is not None and not Path(args.plot).resolve().parent.is_dir():
        raise AvggufError(f"--plot {args.plot!r}: directory {str(Path(args.plot).resolve().parent)!r} does not exist")


def run_eval(args) -> int:
    mf, _ = open_target(args.modelfile, cli_args.loras(args))
    rows = read_eval_data(args.data, args.domain)
    lambdas = lambdas_arg(args.lambdas)
    _check_paths(args)
    by_domain = queries_by_domain(rows, args.limit)
    log = (lambda msg: print(msg, file=sys.stderr)) if not args.json else None
    out: dict = {"modelfile": str(mf.path), "data": args.data, "decode": args.decode, "sweeps": [], "cross": [], "prompting": []}
    eng = judge_engine(mf, args)
    try:
        sweeps = domain_sweeps(eng, mf, by_domain, lambdas, args.decode, log)
        out["sweeps"] = [s.__dict__ for s in sweeps]
        judge = Judge(eng)
        if args.cross:
            out["cross"] = cross_shares(judge, mf, by_domain, log)
        if args.prompting:
            out["prompting"] = prompting_shares(judge, mf, by_domain)
    finally:
        eng.close()
    if args.transfer:
        out["transfer"] = transfer_sweeps(mf, args.transfer, by_domain, lambdas, args, log)
    if args.generate:
        out.update(generated_shares(mf, by_domain, lambdas, args, log))
    if args.plot and sweeps:
        plot_sweeps(sweeps, args.plot)
    print(json.dumps(out, indent=1) if args.json else render(out, list(by_domain)))
    return 0


def domain_sweeps(eng, mf, by_domain: dict[str, list[dict]], lambdas: list[float], decode: str, log, skips: bool = True):
    """The λ sweep of each domain's AV, λ·AV in the weights or as its PAD reward weight; a domain without an
    AV is skipped (said so on `log` with `skips`)."""
    zero = {name: 0.0 for name in mf.av_paths}
    sweeps = []
    for domain, drows in by_domain.items():
        av = av_for_domain(mf, domain)
        if av is None:
            if log and skips:
                log(f"no AV for domain {domain!r} in {mf.path.name}; skipped in the sweep")
        elif decode == "weights":
            sweeps.append(sweep(eng, drows, av, lambdas, zero, progress=log))
        else:
            sweeps.append(pad_sweep(eng, drows, av, lambdas, zero, decode, progress=log))
    return sweeps


def cross_shares(judge: Judge, mf, by_domain: dict[str, list[dict]], log) -> list[dict]:
    """Every domain's level shares under the base, each AV at 1 alone, and each profile."""
    zero = {name: 0.0 for name in mf.av_paths}
    settings = [("base", zero)] + [(f"{n}=1", {**zero, n: 1.0}) for n in mf.av_paths]
    settings += [(f"profile {p}", mf.coefficients(p)) for p in mf.spec.profiles]
    out = []
    for label, coefs in settings:
        judge.engine.set_coefficients(coefs)
        row = {"setting": label, "coefficients": coefs}
        for domain, drows in by_domain.items():
            row[domain] = judge.level_shares(drows)
        out.append(row)
        if log:
            log(f"cross {label}: " + " ".join(f"{d} expert {row[d]['expert']:.2f}" for d in by_domain))
    return out


def prompting_shares(judge: Judge, mf, by_domain: dict[str, list[dict]]) -> list[dict]:
    """Per domain: the base, the base asked for expert answers by a system prompt, and the domain's AV at 1."""
    zero = {name: 0.0 for name in mf.av_paths}
    out = []
    for domain, drows in by_domain.items():
        av = av_for_domain(mf, domain)
        judge.engine.set_coefficients(zero)
        entry = {"domain": domain, "base": judge.level_shares(drows)}
        entry["prompting"] = judge.level_shares(drows, system=EXPERT_PROMPT)
        if av:
            judge.engine.set_coefficients({**zero, av: 1.0})
            entry["av"] = judge.level_shares(drows)
        out.append(entry)
    return out


def transfer_sweeps(mf, other: str, by_domain: dict[str, list[dict]], lambdas: list[float], args, log) -> dict:
    """The modelfile's AVs on another fine-tune of its base (a GGUF model, checked by _check_paths): same
    sweeps, same judge."""
    path = Path(other)
    info = fmt.read_base_model(path)
    for name, av in mf.av_paths.items():
        try:
            fmt.check_against_base(fmt.read_adapter(av), info)
        except AvggufError as exc:
            raise AvggufError(f"--transfer: AV {name!r} does not fit {other}: {exc}") from None
    eng = judge_engine(mf, args, model=path)
    try:
        sweeps = domain_sweeps(eng, mf, by_domain, lambdas, args.decode, log, skips=False)
    finally:
        eng.close()
    return {"model": str(path), "sweeps": [s.__dict__ for s in sweeps]}


def generated_shares(mf, by_domain: dict[str, list[dict]], lambdas: list[float], args, log) -> dict:
    """Answers generated per domain and λ (greedy), their levels by the answer judge (avgguf.eval.answer_judge,
    trained on hand-labeled generated answers) and its agreement with people on the held-out labeled answers."""
    from avgguf.runtime.session import Runtime

    data = _judge_data(args)
    report = answer_judge.held_out_report(data)
    result = {
        "judge": {key: report[key] for key in ("agreement", "n", "confusion", "trained_on", "data")},
        "generated": [],
    }
    rt = Runtime(
        mf, n_ctx=args.n_ctx or JUDGE_CTX, n_gpu_layers=args.n_gpu_layers, threads=args.threads, fuse="sync", merge="off"
    )
    try:
        for domain, drows in by_domain.items():
            av = av_for_domain(mf, domain)
            if av is None:
                continue
            entry = {"domain": domain, "av": av, "lambdas": lambdas, "shares": []}
            for lam in lambdas:
                entry["shares"].append(_generated_level_shares(rt, data, mf, drows[: args.generate], av, lam, args))
                if log:
                    shares = entry["shares"][-1]
                    log(f"generated {domain} {args.decode} {av}={lam:g}: " + " ".join(f"{k} {shares[k]:.2f}" for k in JUDGED))
            result["generated"].append(entry)
    finally:
        rt.close()
    return result


def _generated_level_shares(rt, data, mf, rows: list[dict], av: str, lam: float, args) -> dict:
    """Greedy answers to `rows` with `av` at `lam` (the other AVs at 0), their level shares (off-level
    included) and time per answer."""
    from avgguf.runtime.session import GenerationRequest

    coefs = {**{name: 0.0 for name in mf.av_paths}, av: lam}
    answers, t0 = [], time.perf_counter()
    for row in rows:
        req = GenerationRequest(
            messages=[{"role": "user", "content": row["query"]}], max_tokens=args.max_tokens, temperature=0.0, seed=0
        )
        text = "".join(rt.stream_chat_text(req, coefs, decode=args.decode))
        answers.append({"domain": row["domain"], "query": row["query"], "answer": text})
    secs = (time.perf_counter() - t0) / max(len(answers), 1)
    levels = [r["level"] for r in answer_judge.judge_answers(answers, data=data)]
    shares = {lvl: levels.count(lvl) / max(len(levels), 1) for lvl in JUDGED}
    return {**shares, "n": len(levels), "seconds_per_answer": secs}


def render(out: dict, domains: list[str]) -> str:
    lines = []
    for s in out["sweeps"]:
        lines += [
            f"\n{s['domain']} queries (n={s['shares'][0]['n']}), {s['av']} AV:",
            "| λ | avoidance | generic | expert |",
            "|---|---|---|---|",
        ]
        for lam, sh in zip(s["lambdas"], s["shares"]):
            lines.append(f"| {lam:g} | " + " | ".join(f"{sh[lvl]:.2f}" for lvl in LEVELS) + " |")
    if out.get("transfer"):
        lines.append(f"\nthe same AVs on {out['transfer']['model']} (expert share: base model -> other fine-tune):")
        for s, t in zip(out["sweeps"], out["transfer"]["sweeps"]):
            header = "| λ | expert (base) | expert (other) | avoidance (base) | avoidance (other) |"
            lines += [f"\n{s['domain']} queries, {s['av']} AV:", header, "|---|---|---|---|---|"]
            for lam, a, b in zip(s["lambdas"], s["shares"], t["shares"]):
                lines.append(f"| {lam:g} | {a['expert']:.2f} | {b['expert']:.2f} | {a['avoidance']:.2f} | {b['avoidance']:.2f} |")
    if out.get("generated"):
        j = out["judge"]
        lines.append(
            f"\ngenerated answers judged by the answer judge (agreement with people's labels on "
            f"{j['n']} held-out generated answers: {j['agreement']:.2f}):"
        )
        for g in out["generated"]:
            lines += [
                f"\n{g['domain']} queries (n={g['shares'][0]['n']}), {g['av']} AV, {out['decode']}:",
                "| λ | " + " | ".join(JUDGED) + " | s/answer |",
                "|---" * (len(JUDGED) + 2) + "|",
            ]
            for lam, sh in zip(g["lambdas"], g["shares"]):
                lines.append(
                    f"| {lam:g} | " + " | ".join(f"{sh[lvl]:.2f}" for lvl in JUDGED) + f" | {sh['seconds_per_answer']:.1f} |"
                )
    if out["cross"]:
        lines += [
            "\nexpert share (avoidance share) per domain:",
            "| setting | " + " | ".join(domains) + " |",
            "|---" * (len(domains) + 1) + "|",
        ]
        for row in out["cross"]:
            lines.append(
                f"| {row['setting']} | "
                + " | ".join(f"{row[d]['expert']:.2f} ({row[d]['avoidance']:.2f})" for d in domains)
                + " |"
            )
    if out["prompting"]:
        lines += [
            "\nprompting baseline vs AV (expert share, ms per query):",
            "| domain | base | system prompt | AV λ=1 |",
            "|---|---|---|---|",
        ]
        for e in out["prompting"]:
            cells = [e["base"], e["prompting"]] + ([e["av"]] if "av" in e else [])
            lines.append(
                f"| {e['domain']} | "
                + " | ".join(f"{c['expert']:.2f}, {1000 * c['seconds_per_query']:.0f} ms" for c in cells)
                + " |"
            )
    return "\n".join(lines).strip()
