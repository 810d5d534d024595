"""The paper's figure for every method (issue #23 item 4): the share of generated answers at each level as the
knob moves, for prompting, weight AVs, control vectors made from the AV's pair and from preference data, and
PAD; then speed, memory, knob-change latency and the time to make each artifact.

    python bench/methods.py [--queries 4] [--max-tokens 64] [--lambdas -1,-0.5,0,0.5,1,1.5,2]
        [--speed-models smollm2,synthetic-1b] [--plot docs/methods.png] [--out bench/results/methods.md]

Shares: per domain, the held-out queries of data/preferences/eval.jsonl (--queries of them), greedy, each
answer labeled by avgguf's judge of generated answers (avgguf.eval.answer_judge; its held-out agreement with
people is printed) as avoidance / generic / expert / off-level. The knob of each method, for the domain d:
  weights   the demo AV d at λ (modelfiles/demo.yaml, live LoRA, merge off)
  cv-pair   a control vector from the AV's pair: base vs base + AV_d baked at f16 (`avgguf convert --kind
            control-vector --aligned`); the demo's DPO checkpoints are not kept, the baked model stands for them
  cv-pref   a control vector from the preference data of d (`--preferences train.jsonl --domain d --method mean`)
  pad       decoding-time alignment with weight λ on AV d (`--decode pad`)
  prompting a system prompt: λ = -1 asks to decline and redirect, λ = 1 asks for expert detail (no other λ)
λ = 0 is the base for every method (one shared set of answers).

Speed (--speed-models; the synthetic 1.2B Q4_0 has random weights, random rank-16 AVs and random control
vectors: speed only): generation tok/s with 1 and 3 knobs of each kind active, against the base, alternating
within each round, median; the memory each kind adds (RSS after loading, and on disk); knob change to the
first token of the same prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from avgguf import atomic  # noqa: E402
from avgguf.config.builtin import builtin_path  # noqa: E402
from avgguf.config.modelfile import load_modelfile  # noqa: E402
from avgguf.eval import answer_judge  # noqa: E402
from avgguf.eval.judge import EXPERT_PROMPT, read_eval_data  # noqa: E402
from avgguf.runtime.session import GenerationRequest, Runtime  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LEVELS = answer_judge.LEVELS
METHODS = ("prompting", "weights", "cv-pair", "cv-pref", "pad")
AVOID_PROMPT = (
    "You must not give advice in this field. Politely decline to answer and tell the user which qualified "
    "professional to ask instead."
)
SPEED_PROMPT = [{"role": "user", "content": "What should I do about a persistent cough?"}]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def avgguf_cli(*args: str) -> float:
    """Run one avgguf command as a user would; its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "avgguf", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


# --- artifacts ----------------------------------------------------------------------------------------------


def make_artifacts(work: Path, domains: list[str]) -> tuple[dict[str, Path], dict[str, float]]:
    """Per domain the two control vectors (made once, kept in `work`); the seconds each took (cached runs: the
    time recorded when it was made)."""
    demo, base = ROOT / "modelfiles" / "demo.yaml", str(builtin_path())
    times_file = work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    paths = {}
    for d in domains:
        aligned, pair, pref = work / f"aligned_{d}.gguf", work / f"cvpair_{d}.gguf", work / f"cvpref_{d}.gguf"
        steps = {
            f"bake {d}": (aligned, ["bake", str(demo), "--set", f"{d}=1", "--format", "gguf", "--type", "f16"]),
            f"cv-pair {d}": (pair, ["convert", "--kind", "control-vector", "--base", base, "--aligned", str(aligned)]),
            f"cv-pref {d}": (
                pref,
                ["convert", "--kind", "control-vector", "--base", base, "--domain", d, "--method", "mean"]
                + ["--preferences", str(ROOT / "data" / "preferences" / "train.jsonl")],
            ),
        }
        for key, (out, args) in steps.items():
            if not out.is_file():
                print(f"making {out.name} ...", flush=True)
                times[key] = avgguf_cli(*args, "--out", str(out))
                times_file.write_text(json.dumps(times, indent=1))
        paths[f"cvpair_{d}"], paths[f"cvpref_{d}"] = pair, pref
    return paths, times


def methods_modelfile(work: Path, cvs: dict[str, Path]) -> Path:
    """The demo modelfile with the control vectors added as knobs (absolute paths)."""
    demo = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
    avs = {name: {"path": str(path)} for name, path in {**demo.av_paths, **cvs}.items()}
    spec = {"base": str(demo.base_path), "avs": avs, "defaults": {"n_ctx": 1024, "temperature": 0.0, "seed": 0}}
    out = work / "methods.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


# --- the shares ---------------------------------------------------------------------------------------------


def settings(domain: str, lambdas: list[float]) -> list[tuple[str, float, dict, str, str | None]]:
    """(method, λ, coefficients, decode, system prompt) for one domain; λ = 0 once, as the base."""
    out = [("base", 0.0, {}, "weights", None)]
    out += [("prompting", -1.0, {}, "weights", AVOID_PROMPT), ("prompting", 1.0, {}, "weights", EXPERT_PROMPT)]
    for lam in (x for x in lambdas if x != 0):
        out += [
            ("weights", lam, {domain: lam}, "weights", None),
            ("cv-pair", lam, {f"cvpair_{domain}": lam}, "weights", None),
            ("cv-pref", lam, {f"cvpref_{domain}": lam}, "weights", None),
            ("pad", lam, {domain: lam}, "pad", None),
        ]
    return out


def answer(rt: Runtime, query: str, coefs: dict, decode: str, system: str | None, max_tokens: int) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
    req = GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0, repeat_penalty=1.0)
    return "".join(rt.stream_chat_text(req, coefs, reuse_prefix=False, decode=decode)).strip()


def generate_all(rt: Runtime, rows: dict[str, list[dict]], lambdas: list[float], max_tokens: int) -> list[dict]:
    from tqdm import tqdm

    jobs = [(d, s, r) for d, drows in rows.items() for s in settings(d, lambdas) for r in drows]
    answers = []
    zero = {n: 0.0 for n in rt.modelfile.av_paths}
    for domain, (method, lam, coefs, decode, system), row in tqdm(jobs, desc="answers", unit="answer"):
        text = answer(rt, row["query"], {**zero, **coefs}, decode, system, max_tokens)
        answers.append({"domain": domain, "query": row["query"], "answer": text, "method": method, "lambda": lam})
    return answers


def shares(judged: list[dict]) -> dict[tuple[str, str, float], dict[str, float]]:
    """(domain, method, λ) -> share of each level; the base's answers count for every method at λ = 0."""
    groups: dict[tuple[str, str, float], list[str]] = {}
    for a in judged:
        methods = METHODS if a["method"] == "base" else (a["method"],)
        for m in methods:
            groups.setdefault((a["domain"], m, a["lambda"]), []).append(a["level"])
    return {k: {lvl: v.count(lvl) / len(v) for lvl in LEVELS} | {"n": len(v)} for k, v in groups.items()}


def best_expert(table: dict, domain: str, method: str) -> tuple[float, float]:
    """(best expert share, its λ) over λ > 0."""
    cells = [(v["expert"], k[2]) for k, v in table.items() if k[0] == domain and k[1] == method and k[2] > 0]
    return max(cells) if cells else (0.0, 0.0)


def render_shares(table: dict, domains: list[str], lambdas: list[float]) -> list[str]:
    lines = ["| domain | method | λ | avoidance | generic | expert | off-level | n |", "|---|---|---|---|---|---|---|---|"]
    for d in domains:
        for m in METHODS:
            for lam in sorted({k[2] for k in table if k[0] == d and k[1] == m}):
                s = table[(d, m, lam)]
                lines.append(f"| {d} | {m} | {lam:g} | " + " | ".join(f"{s[lvl]:.2f}" for lvl in LEVELS) + f" | {s['n']} |")
    lines += [
        "",
        "Best expert share over λ > 0 against the weight AV (goal: a pair CV at >= 0.7 of it):",
        "",
    ]
    lines += ["| domain | method | best expert share | at λ | vs weights |", "|---|---|---|---|---|"]
    for d in domains:
        ref = best_expert(table, d, "weights")[0]
        for m in METHODS:
            share, lam = best_expert(table, d, m)
            lines.append(f"| {d} | {m} | {share:.2f} | {lam:g} | {f'{share / ref:.2f}' if ref else '- (weights: 0)'} |")
    return lines


def plot(table: dict, domains: list[str], out: Path, force: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"avoidance": "#c0392b", "generic": "#7f8c8d", "expert": "#2471a3", "off-level": "#d68910"}
    fig, axes = plt.subplots(len(domains), len(METHODS), figsize=(3.0 * len(METHODS), 2.6 * len(domains)), squeeze=False)
    for i, d in enumerate(domains):
        for j, m in enumerate(METHODS):
            ax, lams = axes[i][j], sorted({k[2] for k in table if k[0] == d and k[1] == m})
            for lvl in LEVELS:
                ax.plot(lams, [table[(d, m, x)][lvl] for x in lams], marker="o", ms=3, color=colors[lvl], label=lvl)
            ax.set_ylim(-0.05, 1.05)
            ax.axvline(0, color="k", lw=0.5, ls=":")
            ax.grid(alpha=0.3)
            ax.set_title(f"{d}: {m}", fontsize=9)
            ax.set_xlabel("λ" if i == len(domains) - 1 else "")
    axes[0][0].legend(fontsize=7, loc="center left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    # an earlier plot of this bench (its metadata names it) is replaced; any other file is refused
    with atomic.output_file(out, force=force, previous=_our_plot, what="plot", flag="--plot") as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": PLOT_MARK})
    plt.close(fig)


PLOT_MARK = "avgguf bench/methods.py"


def _our_plot(path: Path) -> bool:
    with open(path, "rb") as f:
        return PLOT_MARK.encode() in f.read(4096)


# --- speed, memory, knob change -----------------------------------------------------------------------------


def speed_knobs(work: Path, model: str) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """(base, LoRA AVs, control vectors) for a speed model: the demo's, or random ones on a synthetic base."""
    import bake_speed
    import cvec_speed

    from avgguf.gguf.adapter_format import read_base_model

    if model == "smollm2":
        demo = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
        base, avs = demo.base_path, dict(demo.av_paths)
    else:
        base = work / f"{model}-{bake_speed.SYNTHETIC[model][2].removeprefix('MOSTLY_').lower()}.gguf"
        if not base.is_file():
            base = bake_speed.synthetic(work, model)
        avs = {f"av{i}": work / f"{model}-av{i}.gguf" for i in (1, 2, 3)}
        for i, path in enumerate(avs.values()):
            if not path.is_file():
                bake_speed.random_av(base, 16, i, path)
    info = read_base_model(base)
    (work / f"{model}-cv").mkdir(exist_ok=True)
    cvs = cvec_speed.make_vectors(work / f"{model}-cv", info.embedding_length, info.block_count)
    return base, avs, cvs


def speed_settings(avs: list[str], cvs: list[str]) -> list[tuple[str, dict, str, str | None]]:
    three = (0.8, -0.5, 0.3)
    return [
        ("base", {}, "weights", None),
        ("prompting (expert system prompt)", {}, "weights", EXPERT_PROMPT),
        ("weights, 1 AV (live)", {avs[0]: 1.0}, "weights", None),
        ("weights, 3 AVs (live, separate)", dict(zip(avs, three)), "weights", None),
        ("control vector, 1", {cvs[0]: 1.0}, "weights", None),
        ("control vectors, 3", dict(zip(cvs, three)), "weights", None),
        ("pad, 1 AV", {avs[0]: 1.0}, "pad", None),
        ("pad, 3 AVs", dict(zip(avs, three)), "pad", None),
    ]


def timed(rt: Runtime, coefs: dict, decode: str, system: str | None, tokens: int) -> tuple[float, float]:
    """(seconds to the first piece, generation tok/s after it), wall clock, the same for every method."""
    messages = ([{"role": "system", "content": system}] if system else []) + SPEED_PROMPT
    req = GenerationRequest(messages=messages, max_tokens=tokens, temperature=0.0, seed=0, repeat_penalty=1.0)
    t0, first = time.perf_counter(), None
    for _ in rt.stream_chat_text(req, coefs, reuse_prefix=True, decode=decode):
        first = first or time.perf_counter()
    end = time.perf_counter()
    n = rt.generated_tokens("length", decode)
    return (first or end) - t0, max(n - 1, 1) / max(end - (first or end), 1e-9)


def speed_runtime(work: Path, base: Path, knobs: dict[str, Path]) -> tuple[Runtime, dict[str, float]]:
    """A Runtime on the base alone, then each knob loaded: the RSS each kind adds (MB)."""
    mf_path = work / f"speed-{base.stem}.yaml"
    mf_path.write_text(yaml.safe_dump({"base": str(base), "defaults": {"n_ctx": 1024, "temperature": 0.0}}))
    rt = Runtime(load_modelfile(mf_path), fuse="off", merge="off")
    memory = {}
    for name, path in knobs.items():
        before = rss_mb()
        rt.engine.load_adapter(name, path)
        memory[name] = rss_mb() - before
    return rt, memory


def measure_speed(work: Path, model: str, tokens: int, repeats: int) -> dict:
    base, avs, cvs = speed_knobs(work, model)
    rt, memory = speed_runtime(work, base, {**avs, **cvs})
    table = speed_settings(list(avs), list(cvs))
    rates: dict[str, list[float]] = {}
    try:
        timed(rt, {}, "weights", None, 8)  # warm up
        for _ in range(repeats):
            for label, coefs, decode, system in table:  # alternating within each round
                rates.setdefault(label, []).append(timed(rt, coefs, decode, system, tokens)[1])
                print(f"{model} {label}: {rates[label][-1]:.1f} tok/s", file=sys.stderr, flush=True)
        changes = knob_changes(rt, list(avs), list(cvs), repeats)
    finally:
        rt.close()
    sizes = {"LoRA AV": avs, "control vector": cvs}
    return {
        "model": model,
        "rates": {k: statistics.median(v) for k, v in rates.items()},
        "memory": {kind: (statistics.median(memory[n] for n in names), mib(names.values())) for kind, names in sizes.items()},
        "changes": changes,
    }


def mib(paths) -> float:
    return statistics.median(p.stat().st_size / 2**20 for p in paths)


def knob_changes(rt: Runtime, avs: list[str], cvs: list[str], repeats: int) -> dict[str, float]:
    """Median ms from a new value of one knob to the first token of the same prompt."""
    kinds = {
        "LoRA AV": lambda v: ({avs[0]: v}, "weights", None),
        "control vector": lambda v: ({cvs[0]: v}, "weights", None),
        "pad weight": lambda v: ({avs[0]: v}, "pad", None),
        "prompting (a new system prompt)": lambda v: ({}, "weights", f"{EXPERT_PROMPT} ({v:g})"),
    }
    out = {}
    for label, make in kinds.items():
        ms = [1000 * timed(rt, *make(0.5 + 0.1 * i), 1)[0] for i in range(2 * repeats + 1)]
        out[label] = statistics.median(ms)
    return out


# --- report -------------------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the checkout where it lies inside."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render_speed(runs: list[dict], tokens: int, repeats: int) -> list[str]:
    lines = [
        f"Generation tok/s (wall clock after the first token, {tokens} tokens greedy, median of {repeats} alternating "
        "rounds), relative to the base of the same run:",
        "",
        "| model | setting | tok/s | vs base |",
        "|---|---|---|---|",
    ]
    for run in runs:
        base = run["rates"]["base"]
        lines += [f"| {run['model']} | {k} | {v:.1f} | {v / base:.2f} |" for k, v in run["rates"].items()]
    lines += ["", "Memory a knob adds (RSS after loading it; on disk), and knob change to the first token (median):", ""]
    lines += ["| model | kind | RSS MB | file MB |", "|---|---|---|---|"]
    for run in runs:
        lines += [f"| {run['model']} | {k} | {rss:.1f} | {disk:.1f} |" for k, (rss, disk) in run["memory"].items()]
        lines.append(f"| {run['model']} | PAD | its contexts: see pad_compare.md | 0 (uses the AV) |")
    lines += ["", "| model | knob change | ms to first token |", "|---|---|---|"]
    for run in runs:
        lines += [f"| {run['model']} | {k} | {v:.0f} |" for k, v in run["changes"].items()]
    return lines


def spread(rows: list[dict], n: int) -> list[dict]:
    return rows[:: max(1, len(rows) // n)][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=4, help="held-out queries per domain")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--lambdas", default="-1,-0.5,0,0.5,1,1.5,2")
    ap.add_argument("--speed-models", default="smollm2,synthetic-1b", help="comma-separated; '' for none")
    ap.add_argument("--speed-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "methods", help="artifacts are kept here")
    ap.add_argument("--plot", type=Path, help="draw the shares against λ (PNG)")
    ap.add_argument("--out", type=Path, help="also write the tables here (Markdown)")
    ap.add_argument("--force", action="store_true", help="replace a --plot file this bench did not write")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    eval_rows = read_eval_data(ROOT / "data" / "preferences" / "eval.jsonl")
    domains = list(dict.fromkeys(r["domain"] for r in eval_rows))
    cvs, made = make_artifacts(args.work, domains)
    rt = Runtime(load_modelfile(methods_modelfile(args.work, cvs)), fuse="off", merge="off")
    try:
        rows = {d: spread([r for r in eval_rows if r["domain"] == d], args.queries) for d in domains}
        answers = generate_all(rt, rows, lambdas, args.max_tokens)
    finally:
        rt.close()
    (args.work / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    judged = answer_judge.judge_answers(answers)
    table = shares(judged)
    report = answer_judge.held_out_report()
    lines = [
        "# Every method's knob, judged on generated answers (issue #23)",
        "",
        f"`python bench/methods.py {' '.join(sys.argv[1:])}`: SmolLM2-135M-Instruct Q4_1 and the demo AVs, "
        f"{args.queries} held-out queries per domain, greedy, {args.max_tokens} tokens; levels by avgguf's judge of "
        f"generated answers (held-out agreement with people {report['agreement']:.2f}). "
        f"Answers: {_shown(args.work / 'answers.jsonl')}.",
        "",
        *render_shares(table, domains, lambdas),
        "",
        "Time to make each artifact (s; the weight AVs are the shipped demo AVs, recipes/train_axis.py):",
        "",
        "| artifact | s |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in made.items()),
    ]
    models = [m for m in args.speed_models.split(",") if m]
    runs = [measure_speed(args.work, m, args.speed_tokens, args.repeats) for m in models]
    if runs:
        lines += ["", *render_speed(runs, args.speed_tokens, args.repeats)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.plot:
        plot(table, domains, args.plot, args.force)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
