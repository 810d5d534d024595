"""Argument types and the shared options of the `avgguf` command line.

Every option that several commands take is declared once here (add_*_arg[s]) and used by each of them, so
its spelling, metavar, help and checks agree everywhere; every value is checked at parse time, with a message
that says what was expected and what was found."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from avgguf.config.coefficients import COEF_MAX, COEF_MIN
from avgguf.config.profile_save import DECODE_MODES
from avgguf.errors import AvggufError
from avgguf.runtime.merged import MERGE_MODES


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


def add_verbose_arg(p, default=False) -> None:
    p.add_argument("--verbose", "-v", action="store_true", default=default, help="show debug logs and llama.cpp's output")


def common_parent() -> argparse.ArgumentParser:
    """Options every command accepts after its name too (`avgguf run -v ...`, not only `avgguf -v run`); their
    default is SUPPRESS, so a subcommand without them leaves the top-level value alone."""
    parent = argparse.ArgumentParser(add_help=False)
    add_verbose_arg(parent, default=argparse.SUPPRESS)
    return parent


# --- the shared options: each declared once, here, and used by every command that takes it ----------------

MODELS = "MODELFILE|BASE.gguf"


def add_target_arg(p, nargs: str | None = None, profile: bool = False, dest: str = "target") -> None:
    """The model positional: one (args.`dest`), at most one (nargs="?"), or several (nargs="+": args.targets);
    `profile`: the command applies MODELFILE:PROFILE."""
    if nargs == "+":
        p.add_argument("targets", nargs="+", metavar=MODELS, help="modelfiles, or one base GGUF / builtin:NAME with --lora")
        return
    if profile:
        metavar, what = "MODELFILE[:PROFILE]|BASE.gguf", "a YAML modelfile (optionally :PROFILE)"
    else:
        metavar, what = MODELS, "a YAML modelfile"
    p.add_argument(dest, nargs=nargs, metavar=metavar, help=f"{what}, a base .gguf or builtin:NAME")


def add_lora_args(p) -> None:
    """Adapters on a bare base GGUF: --lora PATH[=SCALE] and --lora-scaled PATH SCALE (read by `loras`)."""
    scale = f"a number in [{COEF_MIN:g}, {COEF_MAX:g}]"
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[=SCALE]",
        help=f"with a base GGUF or builtin:NAME: an adapter to load as an AV, at SCALE ({scale}; default 1, "
        "like llama.cpp's --lora FNAME); one adapter per flag: repeat it for more (llama.cpp's comma-separated "
        "FNAME,... is not split)",
    )
    p.add_argument(
        "--lora-scaled",
        nargs=2,
        action="append",
        default=[],
        metavar=("PATH", "SCALE"),
        help=f"the same as --lora PATH=SCALE, as two arguments (SCALE {scale}); repeatable. Not llama.cpp's "
        "one-argument --lora-scaled FNAME:SCALE,... list: give each adapter its own --lora-scaled PATH SCALE",
    )


def add_control_vector_args(p) -> None:
    """Control vectors on a bare base GGUF, llama.cpp's flags (read by `loras` and `cvec_layers`)."""
    scale = f"a number in [{COEF_MIN:g}, {COEF_MAX:g}]"
    p.add_argument(
        "--control-vector",
        action="append",
        default=[],
        metavar="PATH[=SCALE]",
        help=f"with a base GGUF or builtin:NAME: a llama.cpp control vector to load as a knob, at SCALE ({scale}; "
        "default 1, like llama.cpp's --control-vector FNAME); repeatable",
    )
    p.add_argument(
        "--control-vector-scaled",
        nargs=2,
        action="append",
        default=[],
        metavar=("PATH", "SCALE"),
        help="the same as --control-vector PATH=SCALE, as two arguments (llama.cpp's form); repeatable",
    )
    p.add_argument(
        "--control-vector-layer-range",
        nargs=2,
        type=int,
        metavar=("START", "END"),
        help="blocks the control vectors apply to, inclusive (llama.cpp's flag; default all; overrides a "
        "modelfile's control_vector_layers)",
    )


def cvec_layers(args) -> tuple[int, int] | None:
    """--control-vector-layer-range, checked."""
    given = getattr(args, "control_vector_layer_range", None)
    if given and given[0] > 0 and given[1] > 0 and given[0] > given[1]:
        raise AvggufError(f"--control-vector-layer-range {given[0]} {given[1]}: START must be <= END")
    return tuple(given) if given else None


def loras(args) -> list[str]:
    """--lora, --lora-scaled, --control-vector and --control-vector-scaled together, as PATH=SCALE strings
    (open_target checks paths and scales and tells the kinds apart from the files)."""
    for path, scale in [*args.lora_scaled, *getattr(args, "control_vector_scaled", [])]:
        try:
            float(scale)
        except ValueError:
            raise AvggufError(
                f"--lora-scaled {path[:200]!r} {scale[:80]!r}: expected PATH SCALE, two arguments with a number "
                f"second (llama.cpp's FNAME:SCALE,... is one argument; here write --lora-scaled PATH SCALE or "
                f"--lora PATH=SCALE)"
            ) from None
    cvecs = [*getattr(args, "control_vector", []), *(f"{p}={v}" for p, v in getattr(args, "control_vector_scaled", []))]
    return list(args.lora) + [f"{path}={scale}" for path, scale in args.lora_scaled] + cvecs


def add_engine_args(p) -> None:
    """How llama.cpp loads the model: GPU layers, context length, CPU threads."""
    p.add_argument(
        "--n-gpu-layers",
        type=gpu_layers,
        help="layers to offload to the GPU (-1 = all; default: the modelfile's n_gpu_layers, 0; "
        "needs a CUDA build of llama-cpp-python)",
    )
    p.add_argument(
        "--n-ctx",
        type=context_length,
        help="context length in tokens (default: the modelfile's n_ctx, 2048; eval and tune: 1024)",
    )
    p.add_argument(
        "--threads",
        type=non_negative_int,
        help="CPU threads (0 = adaptive: as many as cores are free; default: $AVGGUF_THREADS, else the "
        "modelfile's n_threads, else adaptive)",
    )


def add_stats_arg(p) -> None:
    p.add_argument("--stats", action="store_true", help="print prompt/generation token counts and speeds to stderr")


def add_model_args(p, many: bool = False) -> None:
    """What every generating command takes: the model (a modelfile with :PROFILE unless `many`, a base GGUF or
    builtin:NAME), adapters llama.cpp-style, the engine options and --stats."""
    add_target_arg(p, "+" if many else None, profile=not many)
    add_lora_args(p)
    add_control_vector_args(p)
    add_engine_args(p)
    add_stats_arg(p)


def add_merge_arg(p) -> None:
    """For the long-lived commands (chat, serve, desktop): hot sets on merged weights (avgguf.runtime.merged)."""
    p.add_argument(
        "--merge",
        choices=MERGE_MODES,
        help="a coefficient set that stays in use runs on merged weights baked in the background "
        "(base speed; q8_0 for a 4-bit base): on, off, or auto = where that measured faster than "
        "adapters (small models on CPU, or 8-bit-or-better bases); default: the modelfile's, auto",
    )


def add_max_tokens_arg(p) -> None:
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        help="tokens to generate per answer (default: the modelfile's max_tokens; demo: 80; eval --generate: 96)",
    )


def add_generation_args(p) -> None:
    add_max_tokens_arg(p)
    p.add_argument("--seed", type=int, help="sampling seed, for reproducible output")
    p.add_argument("--temperature", type=temperature, help="sampling temperature in [0, 5] (0 = greedy)")


def add_decode_arg(p) -> None:
    p.add_argument(
        "--decode",
        choices=DECODE_MODES,
        default=None,
        help="weights: the AVs added to the weights; pad: decoding-time alignment, the base's top-10 tokens "
        "re-scored by each AV's reward weighted by its coefficient; pad-full: the same over the whole "
        "vocabulary (default: weights; run and chat: the profile's `decode:` if it names one; tune: weights only)",
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


def add_data_args(p) -> None:
    """The level judge's rows (eval, tune)."""
    p.add_argument(
        "--data",
        required=True,
        help='preference JSONL, rows {"domain", "query", "responses": {"avoidance", "generic", "expert"}} '
        "(the held-out split; see docs/eval-tune.md)",
    )
    p.add_argument("--limit", type=positive_int, help="at most this many queries per domain (evenly spaced)")


def add_output_args(p, what: str) -> None:
    """--out (required) and --force, for the commands that write files (convert, bake)."""
    p.add_argument(
        "--out", required=True, help=f"{what}; an existing one is replaced only if avgguf wrote it (same kind), see --force"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out avgguf did not write (a directory keeps its other files); an --out "
        "that is, or holds, an input is refused even so",
    )


def add_json_arg(p, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def add_server_args(p) -> None:
    """serve and desktop: who may use the server, what it may write, and its connection limits. The key comes
    from --api-key-file, --api-key or $AVGGUF_API_KEY (cli.serve.api_key)."""
    p.add_argument("--allow-write", action="store_true", help="let the chat page save profiles into the modelfile")
    p.add_argument(
        "--api-key",
        help="require Authorization: Bearer KEY (prefer --api-key-file or AVGGUF_API_KEY: argv is visible in ps)",
    )
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
        type=positive_int,
        default=128,
        help="open connections and requests at once; above it new ones get 503 (default 128)",
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
            and tok not in ("--lora-scaled", "--control-vector-scaled")
        ):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out
