"""CLI commands that generate text: run, chat, profiles, serve, demo."""

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


def add_parsers(sub, parent) -> None:
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
    p = sub.add_parser("chat", parents=[parent], help="interactive chat with live knobs")
    cli_args.add_model_args(p)
    cli_args.add_merge_arg(p)
    cli_args.add_set_arg(p)
    cli_args.add_decode_arg(p)
    cli_args.add_generation_args(p)
    p = sub.add_parser("profiles", parents=[parent], help="list a model's AVs and profiles, or the built-in bases")
    p.add_argument("target", nargs="?", metavar="MODELFILE|BASE.gguf")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[=SCALE]")
    p.add_argument("--builtins", action="store_true", help="list the built-in base models (builtin:NAME)")
    p = sub.add_parser("serve", parents=[parent], help="OpenAI-compatible HTTP server over modelfiles or a GGUF")
    cli_args.add_model_args(p, many=True)
    cli_args.add_merge_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=cli_args.port, default=8080, help="TCP port (default 8080)")
    add_key_args(p, "require Authorization: Bearer KEY")
    p.add_argument("--allow-write", action="store_true", help="let the chat page save profiles into the modelfile")
    p.add_argument(
        "--parallel",
        type=cli_args.positive_int,
        default=4,
        help="requests decoded together per model "
        "(continuous batching in one llama.cpp context; KV cache for N x n_ctx tokens; default 4)",
    )
    p.add_argument(
        "--max-queue",
        type=cli_args.positive_int,
        help="answer 503 when this many requests already wait for a model (default: 4 x --parallel)",
    )
    p.add_argument("--docs", action="store_true", help="serve FastAPI's /docs and /openapi.json (off by default)")
    p.add_argument(
        "-kvu",
        "--kv-unified",
        action="store_true",
        help="one K/V buffer shared by the parallel "
        "requests (llama-server's flag): more throughput, but an answer's float rounding then depends "
        "on the others (greedy answers can differ from solo ones); default: a K/V stream per request",
    )
    p.add_argument(
        "--contexts",
        type=cli_args.positive_int,
        default=1,
        help="llama.cpp contexts per model "
        "(weights shared), each batching its share of --parallel; a coefficient set's requests go "
        "to one context while it has room, the cores are split between the contexts with work "
        "(default 1)",
    )
    p = sub.add_parser("desktop", parents=[parent], help="the local web chat with a slider per AV, in your browser")
    cli_args.add_model_args(p, many=True)
    cli_args.add_merge_arg(p)
    p.add_argument("--port", type=cli_args.port, help="TCP port on 127.0.0.1 (default: a free one)")
    add_key_args(p, "require Authorization: Bearer KEY (default: a new random key per run, handed to the page the browser opens)")
    p.add_argument("--allow-write", action="store_true", help="let the page save profiles into the modelfile")
    p.add_argument("--no-browser", action="store_true", help="print the address instead of opening a browser")
    p.set_defaults(parallel=2, max_queue=None, kv_unified=False, contexts=1, docs=False)  # one person: 2 answers
    p = sub.add_parser("demo", parents=[parent], help="the embedded default model with the shipped demo AVs")
    cli_args.add_generation_args(p)
    p.add_argument("--n-gpu-layers", type=cli_args.gpu_layers, help="layers to offload to the GPU (-1 = all)")
    p.add_argument("--n-ctx", type=cli_args.context_length)
    p.add_argument("--threads", type=cli_args.non_negative_int, help="CPU threads (default adaptive)")
    p.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")


def add_key_args(p, help_: str) -> None:
    """The API key from --api-key-file, $AVGGUF_API_KEY or --api-key (visible to other users in `ps`)."""
    p.add_argument("--api-key", help=help_ + " (prefer --api-key-file or AVGGUF_API_KEY: argv is visible in ps)")
    p.add_argument("--api-key-file", type=Path, metavar="FILE", help="read the API key from FILE (first line)")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=8.0,
        metavar="SECONDS",
        help="on SIGTERM/Ctrl-C, answers still running after this long are cancelled (default 8: inside docker stop's 10)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a connection that has not sent its request headers after this long is closed (default 10)",
    )
    p.add_argument(
        "--max-connections",
        type=cli_args.positive_int,
        default=128,
        help="open connections and requests at once; above it new ones get 503 (default 128)",
    )


def api_key(args) -> str | None:
    """The key from (in order) --api-key-file, --api-key, $AVGGUF_API_KEY; refused when empty."""
    import os

    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AvggufError(f"--api-key-file {args.api_key_file}: cannot read it ({exc})") from None
        key, where = (lines[0].strip() if lines else ""), f"--api-key-file {args.api_key_file}"
    elif args.api_key is not None:
        key, where = args.api_key, "--api-key"
    elif os.environ.get("AVGGUF_API_KEY") is not None:
        key, where = os.environ["AVGGUF_API_KEY"].strip(), "AVGGUF_API_KEY"
    else:
        return None
    if not key or not key.isascii() or not key.isprintable():
        raise AvggufError(f"{where}: the API key must be non-empty printable ASCII (HTTP headers carry no more)")
    return key


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
    mf, profile = open_target(args.target, cli_args.loras(args))
    return mf, profile, mf.coefficients(profile, parse_assignments(args.sets), source="--set")


def _request(args, messages: list[dict]) -> GenerationRequest:
    return GenerationRequest(messages=messages, max_tokens=args.max_tokens, seed=args.seed, temperature=args.temperature)


def _stream(
    rt: Runtime, req: GenerationRequest, coefs: dict[str, float], stats: bool, out=sys.stdout, decode: str = "weights"
) -> str:
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
    mf, _ = open_target(args.target, args.lora)
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


def _serve(args, on_ready=None, key: str | None = None) -> int:
    from avgguf.server.app import serve

    key = key or api_key(args)
    for flag in ("shutdown_timeout", "header_timeout"):
        if not 0 <= getattr(args, flag) < 1e6:
            raise AvggufError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: seconds, 0 or more")
    loras = cli_args.loras(args)
    if loras and len(args.targets) != 1:
        raise AvggufError("--lora applies to one base GGUF; give a single BASE.gguf (or list adapters in modelfiles)")
    models = [open_target(t, loras)[0] for t in args.targets]
    serve(
        models,
        args.host,
        args.port,
        key,
        verbose=args.verbose,
        n_gpu_layers=args.n_gpu_layers,
        n_ctx=args.n_ctx,
        threads=args.threads,
        stats=args.stats,
        allow_write=args.allow_write,
        parallel=args.parallel,
        max_queue=args.max_queue or 4 * args.parallel,
        kv_unified=args.kv_unified,
        contexts=args.contexts,
        merge=args.merge,
        on_ready=on_ready,
        shutdown_timeout=args.shutdown_timeout,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        docs=args.docs,
    )
    return 0


def run_serve(args) -> int:
    return _serve(args)


def run_desktop(args) -> int:
    """`avgguf serve` on 127.0.0.1 (a free port unless --port) that opens the chat page in the browser ($BROWSER
    is honoured). Without a key of the user's own, a fresh random key per run, which the page gets for a
    one-time code in the URL's fragment (server_guard.Handoff), so no other page or local user can drive it."""
    import secrets
    import webbrowser

    args.host, args.port = "127.0.0.1", args.port or 0
    key = api_key(args) or secrets.token_urlsafe(24)
    print("avgguf desktop: Ctrl-C stops the server", flush=True)
    if args.no_browser:
        return _serve(args, on_ready=lambda url: print(f"avgguf desktop: open {url}", flush=True), key=key)
    return _serve(args, on_ready=webbrowser.open, key=key)


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
