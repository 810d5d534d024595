"""The shared options of the command line (avgguf.cli.args): each is declared once, every subcommand that
offers it shows the same help and metavar and parses the same argv to the same values; --lora-scaled says
what it accepts (avgguf's PATH SCALE, not llama.cpp's FNAME:SCALE,...). Built from the real parser, no model."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from avgguf.cli.args import join_negative_values, loras
from avgguf.cli.commands import build_parser, main
from avgguf.cli.judging import JUDGE_CTX, judge_settings, queries_by_domain
from avgguf.config.modelfile import Defaults
from avgguf.errors import AvggufError

CLI = Path(__file__).resolve().parent.parent / "avgguf" / "cli"


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def option(p: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in p._actions if flag in a.option_strings), None)


# (option, the subcommands that must offer it). A comment per group.
SHARED = [
    # adapters on a bare base GGUF: every command that opens a model
    ("--lora", {"run", "chat", "profiles", "serve", "desktop", "eval", "bake", "tune"}),
    ("--lora-scaled", {"run", "chat", "profiles", "serve", "desktop", "eval", "bake", "tune"}),
    # how llama.cpp loads the model: every command that runs one
    ("--n-gpu-layers", {"run", "chat", "serve", "desktop", "demo", "eval", "tune"}),
    ("--n-ctx", {"run", "chat", "serve", "desktop", "demo", "eval", "tune"}),
    ("--threads", {"run", "chat", "serve", "desktop", "demo", "eval", "tune"}),
    ("--stats", {"run", "chat", "serve", "desktop", "demo"}),
    # coefficients and how they act
    ("--set", {"run", "chat", "bake"}),
    ("--decode", {"run", "chat", "eval", "tune"}),
    ("--merge", {"chat", "serve", "desktop"}),
    # generation
    ("--max-tokens", {"run", "chat", "demo", "eval"}),
    ("--seed", {"run", "chat", "demo"}),
    ("--temperature", {"run", "chat", "demo"}),
    # the level judge's rows
    ("--data", {"eval", "tune"}),
    ("--limit", {"eval", "tune"}),
    # files written (--out's help names what each command writes)
    ("--out", {"convert", "bake"}),
    ("--force", {"convert", "bake"}),
    # the server's access and limits
    ("--allow-write", {"serve", "desktop"}),
    ("--api-key", {"serve", "desktop"}),
    ("--api-key-file", {"serve", "desktop"}),
    ("--shutdown-timeout", {"serve", "desktop"}),
    ("--header-timeout", {"serve", "desktop"}),
    ("--max-connections", {"serve", "desktop"}),
    # machine-readable output (the help names what is printed, so only the flag's shape is shared)
    ("--json", {"convert", "inspect", "eval", "bake", "tune", "judge"}),
]


OWN_HELP = {"--json", "--out"}  # one declaration, the help naming what that command prints or writes


@pytest.mark.parametrize("flag,commands", SHARED, ids=[s[0] for s in SHARED])
def test_a_shared_option_is_the_same_everywhere(flag, commands):
    subs = subparsers()
    offering = {name for name, p in subs.items() if option(p, flag) is not None}
    assert offering == commands, (flag, offering ^ commands)
    actions = [option(subs[name], flag) for name in sorted(commands)]
    shape = {(tuple(a.option_strings), a.dest, a.metavar, a.nargs, a.type, a.choices, a.required) for a in actions}
    assert len(shape) == 1, (flag, shape)
    helps = {a.help for a in actions}
    assert None not in helps, flag
    if flag not in OWN_HELP:
        assert len(helps) == 1, (flag, helps)


def test_each_shared_option_is_declared_once_in_the_source():
    """One add_argument call per shared flag across avgguf/cli (a second declaration would drift)."""
    declared: dict[str, int] = {}
    for path in CLI.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                        declared[arg.value] = declared.get(arg.value, 0) + 1
    assert {flag: declared.get(flag, 0) for flag, _ in SHARED} == {flag: 1 for flag, _ in SHARED}


# (subcommand, the least argv it parses with). The shared options are appended to each.
MINIMAL = {
    "run": ["run", "base.gguf", "hi"],
    "chat": ["chat", "base.gguf"],
    "profiles": ["profiles", "base.gguf"],
    "serve": ["serve", "base.gguf"],
    "desktop": ["desktop", "base.gguf"],
    "demo": ["demo"],
    "eval": ["eval", "base.gguf", "--data", "d.jsonl"],
    "tune": ["tune", "base.gguf", "--data", "d.jsonl", "--target", "medical=expert"],
    "bake": ["bake", "base.gguf", "--out", "o.gguf", "--format", "gguf"],
}


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(join_negative_values(argv))


def offering(flag: str) -> list[str]:
    return sorted(next(c for f, c in SHARED if f == flag))


@pytest.mark.parametrize("command", offering("--lora"))
def test_lora_and_lora_scaled_parse_the_same_everywhere(command):
    """Both spellings, a negative scale included, become the same PATH=SCALE list on every subcommand."""
    args = parse(MINIMAL[command] + ["--lora", "a.gguf", "--lora", "b.gguf=0.5", "--lora-scaled", "c.gguf", "-1"])
    assert loras(args) == ["a.gguf", "b.gguf=0.5", "c.gguf=-1"]
    assert loras(parse(MINIMAL[command])) == []


@pytest.mark.parametrize("command", offering("--n-ctx"))
def test_engine_options_parse_the_same_everywhere(command):
    args = parse(MINIMAL[command] + ["--n-gpu-layers", "-1", "--n-ctx", "256", "--threads", "2"])
    assert (args.n_gpu_layers, args.n_ctx, args.threads) == (-1, 256, 2)
    plain = parse(MINIMAL[command])
    assert (plain.n_gpu_layers, plain.n_ctx, plain.threads) == (None, None, None)  # the modelfile's, then


@pytest.mark.parametrize("command", offering("--decode"))
def test_decode_parses_the_same_everywhere(command):
    """The same three modes everywhere; with none given, run and chat defer to the profile (None), eval and
    tune use weights (as their help says)."""
    for mode in ("weights", "pad", "pad-full"):
        assert parse(MINIMAL[command] + ["--decode", mode]).decode == mode
    assert parse(MINIMAL[command]).decode == (None if command in ("run", "chat") else "weights")


@pytest.mark.parametrize("command", offering("--set"))
def test_set_parses_the_same_everywhere(command):
    assert parse(MINIMAL[command] + ["--set", "medical=0.8 legal=0.2", "--set", "x=1"]).sets == ["medical=0.8 legal=0.2", "x=1"]


def test_lora_scaled_help_says_what_it_accepts():
    """avgguf takes PATH SCALE (two arguments), which is not llama.cpp's --lora-scaled FNAME:SCALE,...; the
    help must not call it llama.cpp's spelling."""
    action = option(subparsers()["run"], "--lora-scaled")
    assert action.nargs == 2 and action.metavar == ("PATH", "SCALE")
    assert "two arguments" in action.help and "FNAME:SCALE" in action.help and "Not llama.cpp's" in action.help
    assert "[-2, 2]" in action.help
    lora = option(subparsers()["run"], "--lora")
    assert lora.metavar == "PATH[=SCALE]" and "[-2, 2]" in lora.help and "repeat" in lora.help


def test_llama_cpp_lora_scaled_spelling_is_refused_with_the_fix():
    # one argument, llama.cpp-style: argparse wants two
    with pytest.raises(SystemExit) as exit_:
        parse(["chat", "base.gguf", "--lora-scaled", "a.gguf:0.8"])
    assert exit_.value.code == 2
    # the prompt taken as the SCALE: a message naming both spellings, before anything is opened
    args = parse(["run", "base.gguf", "--lora-scaled", "a.gguf:0.8,b.gguf:0.5", "hello", "hi"])
    with pytest.raises(AvggufError, match=r"--lora-scaled 'a.gguf:0.8,b.gguf:0.5' 'hello'.*PATH SCALE.*FNAME:SCALE"):
        loras(args)


def test_tune_refuses_pad_before_loading(capsys):
    assert main(["tune", "missing.yaml", "--data", "d.jsonl", "--target", "medical=expert", "--decode", "pad"]) == 2
    err = capsys.readouterr().err
    assert "--decode pad" in err and "weights only" in err


def test_the_judge_takes_the_engine_options(monkeypatch):
    """eval and tune build their engine by one rule: --n-ctx (else JUDGE_CTX), --n-gpu-layers (else the
    modelfile's), --threads (else $AVGGUF_THREADS, else the modelfile's n_threads)."""
    monkeypatch.delenv("AVGGUF_THREADS", raising=False)
    mf = SimpleNamespace(spec=SimpleNamespace(defaults=Defaults(n_gpu_layers=3, n_threads=2)))
    plain = judge_settings(mf, parse(MINIMAL["eval"]))
    assert plain["n_ctx"] == JUDGE_CTX and plain["n_gpu_layers"] == 3 and plain["threads"].fixed == 2
    given = judge_settings(mf, parse(MINIMAL["tune"] + ["--n-ctx", "512", "--n-gpu-layers", "0", "--threads", "1"]))
    assert given["n_ctx"] == 512 and given["n_gpu_layers"] == 0 and given["threads"].fixed == 1


def test_limit_keeps_every_domain_evenly_spaced():
    rows = [{"domain": d, "i": i} for d in ("a", "b") for i in range(10)] + [{"domain": "c", "i": 0}]
    by_domain = queries_by_domain(rows, 3)
    assert list(by_domain) == ["a", "b", "c"]
    assert [r["i"] for r in by_domain["a"]] == [0, 4, 8] and len(by_domain["c"]) == 1
    assert queries_by_domain(rows) == {d: [r for r in rows if r["domain"] == d] for d in ("a", "b", "c")}
