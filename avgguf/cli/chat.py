"""CLI commands that generate text in the terminal: run, chat, profiles, demo (serve and desktop: cli.serve)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from avgguf.gguf import adapter_format as fmt
from avgguf.cli import args as cli_args
from avgguf.cli.repl import HELP, ChatState, chat_loop
from avgguf.config.coefficients import describe, parse_assignments
from avgguf.errors import AvggufError
from avgguf.gguf.inspect import terminal_safe as safe
from avgguf.config.modelfile import BUILTIN_PREFIX, Modelfile, load_modelfile, open_target
from avgguf.config.builtin import builtin_names, builtin_path
from avgguf.runtime.session import GenerationRequest, Runtime

DEMO_PROMPTS = ["I have had a headache and a fever for three days. What should I do?"]


def add_run_parser(sub, parent) -> None:
    p = sub.add_parser(
        "run",
        parents=[parent],
        help="generate one answer under a profile and/or coefficients",
        description="Generate one answer. MODEL is a modelfile[:PROFILE], a base .gguf "
        "(adapters with --lora PATH=SCALE) or builtin:NAME.",
    )
    cli_args.add_model_args(p)
    p.add_argument("prompt")
    cli_args.add_set_arg(p)
    cli_args.add_decode_arg(p)
    cli_args.add_generation_args(p)


def add_chat_parser(sub, parent) -> None:
    p = sub.add_parser("chat", parents=[parent], help="interactive chat with live knobs")
    cli_args.add_model_args(p)
    cli_args.add_merge_arg(p)
    cli_args.add_set_arg(p)
    cli_args.add_decode_arg(p)
    cli_args.add_generation_args(p)


def add_profiles_parser(sub, parent) -> None:
    p = sub.add_parser("profiles", parents=[parent], help="list a model's AVs and profiles, or the built-in bases")
    cli_args.add_target_arg(p, "?")
    cli_args.add_lora_args(p)
    p.add_argument("--builtins", action="store_true", help="list the built-in base models (builtin:NAME)")


def add_demo_parser(sub, parent) -> None:
    p = sub.add_parser("demo", parents=[parent], help="the embedded default model with the shipped demo AVs")
    cli_args.add_generation_args(p)
    cli_args.add_engine_args(p)
    cli_args.add_stats_arg(p)


def shipped_modelfile(name: str) -> Path:
    return Path(str(resources.files("avgguf.modelfiles").joinpath(name)))


def _runtime(args, mf: Modelfile, merge: str | None = None) -> Runtime:
    """`merge`: None = --merge or the modelfile's; one-shot commands (run, demo) pass "off": a set there never
    answers twice, and a bake would only delay the exit."""
    return Runtime(
        mf,
        n_gpu_layers=args.n_gpu_layers,
        n_ctx=args.n_ctx,
        threads=args.threads,
        verbose=args.verbose,
        merge=merge or getattr(args, "merge", None),
    )


def _open(args) -> tuple[Modelfile, str | None, dict[str, float]]:
    """The model and the coefficients the command starts with; every check before the model loads."""
    mf, profile = open_target(args.target, cli_args.loras(args), cli_args.cvec_layers(args))
    return mf, profile, mf.coefficients(profile, parse_assignments(args.sets), source="--set")


def _request(args, messages: list[dict]) -> GenerationRequest:
    return GenerationRequest(messages=messages, max_tokens=args.max_tokens, seed=args.seed, temperature=args.temperature)


def _stream(rt: Runtime, req: GenerationRequest, coefs: dict[str, float], stats: bool, out=None, decode: str = "weights") -> str:
    out = out or sys.stdout  # at call time: a default bound at import would outlive a replaced sys.stdout
    pieces = []
    for piece in rt.stream_chat_text(req, coefs, decode=decode):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    if stats:
        print(rt.stats(decode=decode), file=sys.stderr)
    return "".join(pieces)


def run_run(args) -> int:
    mf, profile, coefs = _open(args)
    rt = _runtime(args, mf, merge="off")
    try:
        _stream(
            rt,
            _request(args, [{"role": "user", "content": args.prompt}]),
            coefs,
            args.stats,
            decode=args.decode or mf.decode_mode(profile),
        )
    finally:
        rt.close()
    return 0


def run_profiles(args) -> int:
    if args.builtins:
        for name in builtin_names():
            print(f"{BUILTIN_PREFIX}{name}  {builtin_path(name)}")
        return 0
    if args.target is None:
        raise AvggufError("give a modelfile or base .gguf (or --builtins to list the built-in bases)")
    mf, _ = open_target(args.target, cli_args.loras(args))
    print(f"{mf.path}: base {mf.spec.base} ({mf.base_path})")
    if mf.spec.description:
        print(f"  {safe(mf.spec.description)}")
    print("alignment vectors:")
    for name, path in mf.av_paths.items():
        info = fmt.read_adapter(path)
        ranks = sorted({p.rank for p in info.pairs.values()})
        domain = safe(info.meta.get(fmt.KEY_DOMAIN, "-"))  # a downloaded adapter's text: no terminal escapes
        print(
            f"  {name:<12} domain {domain:<10} {len(info.pairs)} pairs, rank {ranks[0]}..{ranks[-1]}, "
            f"{path.stat().st_size / 1e6:.1f} MB  {safe(mf.spec.avs[name].description or '')}"
        )
    if not mf.av_paths:
        print("  (none)")
    print("profiles:" + ("" if mf.spec.profiles else " (none)"))
    for name in mf.spec.profiles:
        mark = " (default)" if name == mf.spec.default_profile else ""
        print(f"  {name:<20} {describe(mf.coefficients(name))}{mark}")
    for name, path in mf.baked_paths.items():
        print(f"  {name:<20} baked: {path.name} (full speed, no live knobs)")
    return 0


def run_chat(args, stdin=None) -> int:
    mf, profile, coefs = _open(args)
    rt = _runtime(args, mf)
    try:
        state = ChatState(mf, profile, coefs, decode=args.decode or mf.decode_mode(profile))
        print(f"avgguf chat: {mf.name}  profile {state.profile_label}  [{describe(coefs)}]  decode {state.decode}")
        print(HELP.splitlines()[0].rstrip(":") + ": /help lists them; Ctrl-C stops an answer, Ctrl-D leaves")
        chat_loop(rt, state, lambda messages: _request(args, messages), args.stats, stdin or sys.stdin)
    finally:
        rt.close()
    return 0


def run_demo(args) -> int:
    demo = shipped_modelfile("demo.yaml")
    path = demo if demo.is_file() else shipped_modelfile("smollm2.yaml")
    mf = load_modelfile(path)
    rt = _runtime(args, mf, merge="off")
    try:
        settings = [(name, mf.coefficients(name)) for name in mf.spec.profiles] or [("base", mf.coefficients())]
        if mf.av_paths:
            settings.insert(0, ("base (all AVs at 0)", {k: 0.0 for k in mf.av_paths}))
        print(f"avgguf demo: {mf.spec.description or mf.name} ({mf.base_path.name})")
        for prompt in DEMO_PROMPTS:
            print(f"\nuser: {prompt}")
            for label, coefs in settings:
                print(f"\n--- {label} [{describe(coefs)}]")
                req = GenerationRequest(
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=args.max_tokens or 80,
                    seed=0 if args.seed is None else args.seed,
                    temperature=0.0 if args.temperature is None else args.temperature,
                )
                _stream(rt, req, coefs, args.stats)
    finally:
        rt.close()
    return 0
