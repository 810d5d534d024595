"""Argument types and shared option groups of the `avgguf` command line: every value checked at parse time,
with a message that says what was expected and what was found."""

from __future__ import annotations

import argparse
import math
import re


def _number(text: str, kind, expected: str):
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text[:80]!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text[:80]!r}")
    return value


def ranged(kind, expected: str, low=None, high=None, low_open: bool = False):
    """An argparse type: a `kind` number within [low, high] ((low, high] with low_open), else `expected`."""

    def parse(text: str):
        value = _number(text, kind, expected)
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value:g}")
        return value

    return parse


MIN_CTX = 32
positive_int = ranged(int, "a positive integer", 1)
non_negative_int = ranged(int, "a whole number >= 0", 0)
fraction = ranged(float, "a number in (0, 1]", 0.0, 1.0, low_open=True)
temperature = ranged(float, "a temperature in [0, 5] (0 = greedy)", 0.0, 5.0)
context_length = ranged(int, f"a context length >= {MIN_CTX} tokens (a chat prompt alone needs ~20)", MIN_CTX)
port = ranged(int, "a TCP port 1-65535", 1, 65535)
gpu_layers = ranged(int, "a layer count >= 0 or -1 (all)", -1)
grid_step = ranged(float, "a step in (0, 4], e.g. 0.4 (11 points per AV)", 0.0, 4.0, low_open=True)


def common_parent() -> argparse.ArgumentParser:
    """Options every command accepts after its name too (`avgguf run -v ...`, not only `avgguf -v run`)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="show debug logs and llama.cpp's output"
    )
    return parent


def add_model_args(p, many: bool = False) -> None:
    """The model: a modelfile (with :PROFILE), a base GGUF or builtin:NAME, plus adapters llama.cpp-style."""
    if many:
        p.add_argument(
            "targets", nargs="+", metavar="MODELFILE|BASE.gguf", help="modelfiles, or one base GGUF / builtin:NAME with --lora"
        )
    else:
        p.add_argument(
            "target",
            metavar="MODELFILE[:PROFILE]|BASE.gguf",
            help="a YAML modelfile (optionally :PROFILE), a base .gguf or builtin:NAME",
        )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[=SCALE]",
        help="with a base GGUF: an adapter to load as an AV, at SCALE (default 1, like llama.cpp's --lora); repeatable",
    )
    p.add_argument(
        "--lora-scaled",
        nargs=2,
        action="append",
        default=[],
        metavar=("PATH", "SCALE"),
        help="llama.cpp's spelling of --lora PATH=SCALE",
    )
    p.add_argument(
        "--n-gpu-layers", type=gpu_layers, help="layers to offload to the GPU (-1 = all; needs a CUDA build of llama-cpp-python)"
    )
    p.add_argument("--n-ctx", type=context_length, help="context length (default: the modelfile's, 2048)")
    p.add_argument(
        "--threads",
        type=non_negative_int,
        help="CPU threads (default: adaptive, as many as cores are free; 0 = adaptive; env AVGGUF_THREADS)",
    )
    p.add_argument("--stats", action="store_true", help="print prompt/generation token counts and speeds to stderr")


def add_merge_arg(p) -> None:
    """For the long-lived commands (chat, serve, desktop): hot sets on merged weights (avgguf.runtime.merged)."""
    p.add_argument(
        "--merge",
        choices=["auto", "on", "off"],
        help="a coefficient set that stays in use runs on merged weights baked in the background "
        "(base speed; q8_0 for a 4-bit base): on, off, or auto = where that measured faster than "
        "adapters (small models on CPU, or 8-bit-or-better bases); default: the modelfile's, auto",
    )


def loras(args) -> list[str]:
    """--lora and --lora-scaled together, as PATH=SCALE strings."""
    return list(args.lora) + [f"{path}={scale}" for path, scale in args.lora_scaled]


def add_generation_args(p) -> None:
    p.add_argument("--max-tokens", type=positive_int, help="tokens to generate (default: the modelfile's)")
    p.add_argument("--seed", type=int, help="sampling seed, for reproducible output")
    p.add_argument("--temperature", type=temperature, help="sampling temperature in [0, 5] (0 = greedy)")


def add_decode_arg(p) -> None:
    p.add_argument(
        "--decode",
        choices=["weights", "pad", "pad-full"],
        default=None,
        help="weights: AVs added to the weights (default); pad: decoding-time alignment, the base's top-10 "
        "tokens re-scored by each AV's reward weighted by its coefficient; pad-full: the same over the "
        "whole vocabulary (default: the profile's `decode`, else weights)",
    )


def add_set_arg(p) -> None:
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help='coefficient override, repeatable; several in one: --set "medical=0.8 legal=0.2"',
    )


_NUMBERISH = re.compile(r"^-(\d|\.\d)[\d.:,eE+\-]*$")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--lambdas -1:1:0.5` -> `--lambdas=-1:1:0.5`: argparse would read a value starting with '-' that is not
    a plain number as an option. Only long options without '=' followed by a number-like token are joined."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if (
            tok.startswith("--")
            and "=" not in tok
            and i + 1 < len(argv)
            and _NUMBERISH.match(argv[i + 1])
            and tok not in ("--lora-scaled",)
        ):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out
