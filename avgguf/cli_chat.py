"""CLI commands that generate text: run, chat, profiles, demo."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from .errors import AvggufError
from .modelfile import Modelfile, load_modelfile, parse_assignments, parse_target
from .runtime import GenerationRequest, Runtime

DEMO_PROMPTS = ["I have had a headache and a fever for three days. What should I do?"]
CHAT_HELP = "commands: /set NAME=VALUE [NAME=VALUE ...], /profile NAME, /show, /reset, /quit"


def add_generation_args(p) -> None:
    p.add_argument("--max-tokens", type=int, help="tokens to generate (default: the modelfile's)")
    p.add_argument("--seed", type=int, help="sampling seed, for reproducible output")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--n-gpu-layers", type=int, help="layers to offload to the GPU (-1 = all; needs a CUDA build "
                   "of llama-cpp-python)")
    p.add_argument("--n-ctx", type=int, help="context length (default: the modelfile's)")


def add_parsers(sub) -> None:
    p = sub.add_parser("run", help="generate one answer under a profile and/or explicit coefficients")
    p.add_argument("target", metavar="MODELFILE[:PROFILE]")
    p.add_argument("prompt")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="coefficient override, repeatable (e.g. --set medical=0.8)")
    add_generation_args(p)
    p = sub.add_parser("chat", help="interactive chat with live knobs")
    p.add_argument("target", metavar="MODELFILE[:PROFILE]")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE")
    add_generation_args(p)
    p = sub.add_parser("profiles", help="list a modelfile's AVs and profiles")
    p.add_argument("modelfile")
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over modelfiles")
    p.add_argument("modelfiles", nargs="+", metavar="MODELFILE")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY")
    p.add_argument("--n-gpu-layers", type=int, help="layers to offload to the GPU (-1 = all)")
    p = sub.add_parser("demo", help="the embedded default model with the shipped demo AVs, no arguments needed")
    add_generation_args(p)


def shipped_modelfile(name: str) -> Path:
    return Path(str(resources.files("modelfiles").joinpath(name)))


def _open(args, target: str) -> tuple[Modelfile, str | None, Runtime]:
    path, profile = parse_target(target)
    mf = load_modelfile(path)
    mf.coefficients(profile)  # validates the profile name before the model loads
    rt = Runtime(mf, n_gpu_layers=args.n_gpu_layers, n_ctx=args.n_ctx, verbose=args.verbose)
    return mf, profile, rt


def _request(args, messages: list[dict]) -> GenerationRequest:
    return GenerationRequest(messages=messages, max_tokens=args.max_tokens, seed=args.seed,
                             temperature=args.temperature)


def _stream(rt: Runtime, req: GenerationRequest, coefs: dict[str, float], out=sys.stdout) -> str:
    pieces = []
    try:
        for piece in rt.stream_chat_text(req, coefs):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except ValueError as exc:  # llama-cpp-python: prompt longer than the context, etc.
        raise AvggufError(str(exc)) from None
    out.write("\n")
    return "".join(pieces)


def _describe(coefs: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in coefs.items()) or "(no AVs)"


def run_run(args) -> int:
    mf, profile, rt = _open(args, args.target)
    try:
        coefs = mf.coefficients(profile, parse_assignments(args.sets))
        _stream(rt, _request(args, [{"role": "user", "content": args.prompt}]), coefs)
    finally:
        rt.close()
    return 0


def run_profiles(args) -> int:
    from . import adapter_format as fmt

    mf = load_modelfile(args.modelfile)
    print(f"{mf.path}: base {mf.spec.base} ({mf.base_path})")
    if mf.spec.description:
        print(f"  {mf.spec.description}")
    print("alignment vectors:")
    for name, path in mf.av_paths.items():
        info = fmt.read_adapter(path)
        ranks = sorted({p.rank for p in info.pairs.values()})
        domain = info.meta.get(fmt.KEY_DOMAIN, "-")
        print(f"  {name:<12} domain {domain:<10} {len(info.pairs)} pairs, rank {ranks[0]}..{ranks[-1]}, "
              f"{path.stat().st_size / 1e6:.1f} MB  {mf.spec.avs[name].description}")
    if not mf.av_paths:
        print("  (none)")
    print("profiles:" + ("" if mf.spec.profiles else " (none)"))
    for name in mf.spec.profiles:
        mark = " (default)" if name == mf.spec.default_profile else ""
        print(f"  {name:<20} {_describe(mf.coefficients(name))}{mark}")
    return 0


def run_chat(args, stdin=None) -> int:
    stdin = stdin or sys.stdin
    mf, profile, rt = _open(args, args.target)
    try:
        coefs = mf.coefficients(profile, parse_assignments(args.sets))
        print(f"avgguf chat: {mf.name}" + (f":{profile}" if profile else "") + f"  [{_describe(coefs)}]")
        print(CHAT_HELP)
        history: list[dict] = []
        while True:
            print("> ", end="", flush=True)
            line = stdin.readline()
            if not line:
                print()
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                try:
                    done, coefs, history = _chat_command(line, mf, coefs, history)
                except AvggufError as exc:
                    print(f"error: {exc}")
                    continue
                if done:
                    break
                continue
            history.append({"role": "user", "content": line})
            try:
                reply = _stream(rt, _request(args, _fit(rt, history, args.max_tokens)), coefs)
            except AvggufError as exc:
                history.pop()
                print(f"error: {exc}")
                continue
            history.append({"role": "assistant", "content": reply})
    finally:
        rt.close()
    return 0


def _chat_command(line: str, mf: Modelfile, coefs: dict[str, float], history: list[dict]):
    cmd, _, rest = line.partition(" ")
    if cmd in ("/quit", "/exit", "/q"):
        return True, coefs, history
    if cmd == "/set":
        if not rest.strip():
            raise AvggufError("usage: /set NAME=VALUE [NAME=VALUE ...]")
        new = mf.coefficients(None, {**coefs, **parse_assignments(rest.split())})
        print(f"[{_describe(new)}]")
        return False, new, history
    if cmd == "/profile":
        new = mf.coefficients(rest.strip() or None)
        print(f"[{rest.strip()}: {_describe(new)}]")
        return False, new, history
    if cmd == "/show":
        print(f"[{_describe(coefs)}]  profiles: {', '.join(mf.spec.profiles) or 'none'}; "
              f"{len(history) // 2} turns in history")
        return False, coefs, history
    if cmd == "/reset":
        print("[conversation cleared]")
        return False, coefs, []
    raise AvggufError(f"unknown command {cmd!r}; {CHAT_HELP}")


def _fit(rt: Runtime, history: list[dict], max_tokens: int | None) -> list[dict]:
    """Drop the oldest turns until the prompt leaves room for the answer."""
    budget = rt.n_ctx - (max_tokens or rt.modelfile.spec.defaults.max_tokens)
    msgs = list(history)
    while len(msgs) > 1 and sum(rt.count_tokens(m["content"]) + 8 for m in rt.with_system(msgs)) > budget:
        msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]
    return msgs


def run_serve(args) -> int:
    from .server import serve

    serve([load_modelfile(p) for p in args.modelfiles], args.host, args.port, args.api_key,
          verbose=args.verbose, n_gpu_layers=args.n_gpu_layers)
    return 0


def run_demo(args) -> int:
    demo = shipped_modelfile("demo.yaml")
    path = demo if demo.is_file() else shipped_modelfile("smollm2.yaml")
    mf = load_modelfile(path)
    rt = Runtime(mf, n_gpu_layers=args.n_gpu_layers, n_ctx=args.n_ctx, verbose=args.verbose)
    try:
        settings = [(name, mf.coefficients(name)) for name in mf.spec.profiles] or [("base", mf.coefficients())]
        if mf.av_paths:
            settings.insert(0, ("base (all AVs at 0)", {k: 0.0 for k in mf.av_paths}))
        print(f"avgguf demo: {mf.spec.description or mf.name} ({mf.base_path.name})")
        for prompt in DEMO_PROMPTS:
            print(f"\nuser: {prompt}")
            for label, coefs in settings:
                print(f"\n--- {label} [{_describe(coefs)}]")
                req = GenerationRequest(messages=[{"role": "user", "content": prompt}],
                                        max_tokens=args.max_tokens or 80,
                                        seed=0 if args.seed is None else args.seed,
                                        temperature=0.0 if args.temperature is None else args.temperature)
                _stream(rt, req, coefs)
    finally:
        rt.close()
    return 0
