"""The `avgguf` command line. Only this module turns errors into messages and exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from avgguf.cli import args as cli_args
from avgguf.cli import bake as cli_bake
from avgguf.cli import chat as cli_chat
from avgguf.cli import convert as cli_convert
from avgguf.cli import eval as cli_eval
from avgguf.cli import judge_cmd as cli_judge
from avgguf.cli import serve as cli_serve
from avgguf.cli import tune as cli_tune
from avgguf.errors import AvggufError
from avgguf.version import __version__

log = logging.getLogger("avgguf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avgguf", description="Alignment vectors as live knobs on llama.cpp.")
    cli_args.add_verbose_arg(parser)
    parser.add_argument("--version", action="version", version=f"avgguf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parent = cli_args.common_parent()
    cli_convert.add_convert_parser(sub, parent)
    cli_convert.add_inspect_parser(sub, parent)
    cli_chat.add_run_parser(sub, parent)
    cli_chat.add_chat_parser(sub, parent)
    cli_chat.add_profiles_parser(sub, parent)
    cli_serve.add_serve_parser(sub, parent)
    cli_serve.add_desktop_parser(sub, parent)
    cli_chat.add_demo_parser(sub, parent)
    cli_eval.add_parser(sub, parent)
    cli_judge.add_parser(sub, parent)
    cli_bake.add_parser(sub, parent)
    cli_tune.add_parser(sub, parent)
    return parser


COMMANDS = {
    "convert": cli_convert.run_convert,
    "inspect": cli_convert.run_inspect,
    "run": cli_chat.run_run,
    "chat": cli_chat.run_chat,
    "profiles": cli_chat.run_profiles,
    "demo": cli_chat.run_demo,
    "eval": cli_eval.run_eval,
    "judge": cli_judge.run_judge,
    "serve": cli_serve.run_serve,
    "bake": cli_bake.run_bake,
    "desktop": cli_serve.run_desktop,
    "tune": cli_tune.run_tune,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(cli_args.join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except AvggufError as exc:
        print(f"avgguf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `avgguf inspect x.gguf | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # unreadable/unwritable files named by the user
        print(f"avgguf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
