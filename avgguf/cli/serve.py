"""`avgguf serve` and `avgguf desktop`: the OpenAI-compatible HTTP server, and the same on 127.0.0.1 with the
chat page opened in the browser."""

from __future__ import annotations

import argparse
import os

from avgguf.cli import args as cli_args
from avgguf.config.modelfile import open_target
from avgguf.errors import AvggufError


def add_serve_parser(sub, parent) -> None:
    p = sub.add_parser("serve", parents=[parent], help="OpenAI-compatible HTTP server over modelfiles or a GGUF")
    cli_args.add_model_args(p, many=True)
    cli_args.add_merge_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=cli_args.port, default=8080, help="TCP port (default 8080)")
    cli_args.add_server_args(p)
    p.add_argument(
        "--parallel",
        type=cli_args.positive_int,
        default=None,
        help="requests decoded together per model (continuous batching in one llama.cpp context; KV cache for "
        "N x n_ctx tokens; default: 8 where that K/V fits 1 GiB, else 4)",
    )
    p.add_argument(
        "--max-queue",
        type=cli_args.positive_int,
        help="answer 503 when this many requests already wait for a model (default: 4 per parallel request)",
    )
    p.add_argument("--docs", action="store_true", help="serve FastAPI's /docs and /openapi.json (off by default)")
    p.add_argument(
        "-kvu",
        "--kv-unified",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="one K/V buffer with flash attention shared by the parallel requests (llama-server's flag): "
        "about 2x the requests/s at 8 clients here, but an answer's float rounding then depends on the others "
        "(greedy answers under load differ from solo ones); default (--no-kv-unified): a K/V stream per request",
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


def add_desktop_parser(sub, parent) -> None:
    p = sub.add_parser(
        "desktop",
        parents=[parent],
        help="the local web chat with a slider per AV, in your browser",
        description="`avgguf serve` on 127.0.0.1 that opens the chat page in the browser. Without a key of "
        "your own, a new random key per run is handed to the page the browser opens.",
    )
    cli_args.add_model_args(p, many=True)
    cli_args.add_merge_arg(p)
    p.add_argument("--port", type=cli_args.port, help="TCP port on 127.0.0.1 (default: a free one)")
    cli_args.add_server_args(p)
    p.add_argument("--no-browser", action="store_true", help="print the address instead of opening a browser")
    p.set_defaults(parallel=2, max_queue=None, kv_unified=False, contexts=1, docs=False)  # one person: 2 answers


def api_key(args) -> str | None:
    """The key from (in order) --api-key-file, --api-key, $AVGGUF_API_KEY; refused when empty."""
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


# what serve and desktop hand to avgguf.server.app.serve as parsed
SERVE_OPTIONS = (
    "verbose n_gpu_layers n_ctx threads stats allow_write parallel kv_unified contexts merge "
    "shutdown_timeout max_connections header_timeout docs"
).split()


def _serve(args, on_ready=None, key: str | None = None) -> int:
    from avgguf.server.app import serve

    key = key or api_key(args)
    for flag in ("shutdown_timeout", "header_timeout"):
        if not 0 <= getattr(args, flag) < 1e6:
            raise AvggufError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: seconds, 0 or more")
    loras = cli_args.loras(args)
    if loras and len(args.targets) != 1:
        raise AvggufError("--lora applies to one base GGUF; give a single BASE.gguf (or list adapters in modelfiles)")
    models = [open_target(t, loras, cli_args.cvec_layers(args))[0] for t in args.targets]
    passed = {name: getattr(args, name) for name in SERVE_OPTIONS}
    serve(models, args.host, args.port, key, max_queue=args.max_queue, on_ready=on_ready, **passed)
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
