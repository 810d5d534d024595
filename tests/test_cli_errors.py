"""Bad command lines (issue 20): every case is answered before any model loads by one clear error on stderr
that names the flag (or argument), with exit status 2 and no traceback, across every subcommand."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from avgguf.cli import main
from avgguf.testing.synthetic import Spec, hf_weights, to_gguf_tensors, write_gguf, write_hf

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "modelfiles" / "demo.yaml")
MED = str(ROOT / "modelfiles" / "avs" / "medical.gguf")


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("badcli")
    spec = Spec("llama")
    weights = hf_weights(spec)
    write_gguf(root / "base.gguf", spec, to_gguf_tensors(spec, weights))
    write_hf(root / "hf", spec, weights)
    (root / "notes.txt").write_text("just notes\n")
    row = {"query": "q", "responses": {"avoidance": "no", "generic": "maybe", "expert": "yes"}}
    (root / "eval.jsonl").write_text("".join(json.dumps({**row, "domain": d}) + "\n" for d in ("medical", "legal")))
    return {
        "root": str(root),
        "base": str(root / "base.gguf"),
        "hf": str(root / "hf"),
        "notes": str(root / "notes.txt"),
        "data": str(root / "eval.jsonl"),
        "out": str(root / "out.gguf"),
    }


# (case, argv with {placeholders} from kit, words stderr must hold: the flag and what is wrong). A comment per case.
CASES = [
    # no subcommand at all
    ("no command", [], ["the following arguments are required: command"]),
    # a subcommand that does not exist
    ("unknown command", ["frobnicate"], ["invalid choice: 'frobnicate'"]),
    # run without its prompt
    ("run: missing prompt", ["run", DEMO], ["required: prompt"]),
    # a flag run does not have
    ("run: unknown flag", ["run", DEMO, "hi", "--bogus"], ["unrecognized arguments: --bogus"]),
    # the modelfile is not there
    ("run: missing modelfile", ["run", "{root}/nowhere.yaml", "hi"], ["nowhere.yaml' not found"]),
    # a profile the modelfile does not have
    ("run: unknown profile", ["run", DEMO + ":nope", "hi"], ["no profile 'nope'", "expert-all"]),
    # --set without '='
    ("run: --set without =", ["run", DEMO, "hi", "--set", "medical"], ["--set: expected NAME=VALUE", "'medical'"]),
    # --set with text for the value
    ("run: --set not a number", ["run", DEMO, "hi", "--set", "medical=high"], ["--set: medical: expected a number"]),
    # --set naming an AV the modelfile lacks
    ("run: --set unknown AV", ["run", DEMO, "hi", "--set", "surgery=1"], ["--set", "unknown alignment vector 'surgery'"]),
    # --set out of [-2, 2]
    ("run: --set out of range", ["run", DEMO, "hi", "--set", "medical=5"], ["--set", "outside [-2, 2]"]),
    # --set NaN
    ("run: --set NaN", ["run", DEMO, "hi", "--set", "legal=nan"], ["--set", "'legal' = nan is outside"]),
    # temperature above 5
    ("run: temperature too high", ["run", DEMO, "hi", "--temperature", "9"], ["--temperature", "in [0, 5]"]),
    # temperature NaN passed every range check before
    ("run: temperature NaN", ["run", DEMO, "hi", "--temperature", "nan"], ["--temperature", "got 'nan'"]),
    # max-tokens 0
    ("run: max-tokens 0", ["run", DEMO, "hi", "--max-tokens", "0"], ["--max-tokens", "a positive integer, got 0"]),
    # max-tokens as text
    ("run: max-tokens text", ["run", DEMO, "hi", "--max-tokens", "lots"], ["--max-tokens", "got 'lots'"]),
    # a context too small for any chat prompt
    ("run: n-ctx too small", ["run", DEMO, "hi", "--n-ctx", "8"], ["--n-ctx", ">= 32"]),
    # negative threads
    ("run: threads negative", ["run", DEMO, "hi", "--threads", "-1"], ["--threads", ">= 0, got -1"]),
    # threads as text
    ("run: threads text", ["run", DEMO, "hi", "--threads", "many"], ["--threads", "got 'many'"]),
    # gpu layers below -1
    ("run: n-gpu-layers -5", ["run", DEMO, "hi", "--n-gpu-layers", "-5"], ["--n-gpu-layers", "or -1"]),
    # a decode mode that does not exist
    ("run: bad decode", ["run", DEMO, "hi", "--decode", "fast"], ["--decode", "invalid choice: 'fast'"]),
    # seed as text
    ("run: seed text", ["run", DEMO, "hi", "--seed", "lucky"], ["--seed", "invalid int value"]),
    # --lora on a modelfile
    ("run: lora on a modelfile", ["run", DEMO, "hi", "--lora", MED], ["--lora applies to a bare base GGUF"]),
    # --lora file missing
    ("run: lora missing", ["run", "{base}", "hi", "--lora", "{root}/gone.gguf"], ["--lora", "gone.gguf' not found"]),
    ("run: lora comma list", ["run", "{base}", "hi", "--lora", "{root}/a.gguf,{root}/b.gguf"], ["not found", "repeat --lora"]),
    # --lora scale not a number
    ("run: lora bad scale", ["run", "{base}", "hi", "--lora", MED + "=big"], ["--lora", "expected PATH[=SCALE]"]),
    # --lora scale out of range
    ("run: lora scale out of range", ["run", "{base}", "hi", "--lora", MED + "=7"], ["--lora", "outside [-2, 2]"]),
    # chat: a merge mode that does not exist
    ("chat: bad merge", ["chat", DEMO, "--merge", "maybe"], ["--merge", "invalid choice: 'maybe'"]),
    # chat: --set out of range
    ("chat: --set out of range", ["chat", DEMO, "--set", "legal=-3"], ["--set", "outside [-2, 2]"]),
    # serve with no model
    ("serve: no model", ["serve"], ["required: MODELFILE|BASE.gguf"]),
    # port 0
    ("serve: port 0", ["serve", DEMO, "--port", "0"], ["--port", "a TCP port 1-65535, got 0"]),
    # port out of range
    ("serve: port too big", ["serve", DEMO, "--port", "70000"], ["--port", "got 70000"]),
    # port as text
    ("serve: port text", ["serve", DEMO, "--port", "http"], ["--port", "got 'http'"]),
    # parallel 0
    ("serve: parallel 0", ["serve", DEMO, "--parallel", "0"], ["--parallel", "a positive integer"]),
    # contexts 0
    ("serve: contexts 0", ["serve", DEMO, "--contexts", "0"], ["--contexts", "a positive integer"]),
    # a negative queue
    ("serve: max-queue negative", ["serve", DEMO, "--max-queue", "-1"], ["--max-queue", "got -1"]),
    # the server's threads as text
    ("serve: threads text", ["serve", DEMO, "--threads", "x"], ["--threads", "got 'x'"]),
    # desktop: port out of range
    ("desktop: port too big", ["desktop", DEMO, "--port", "99999"], ["--port", "got 99999"]),
    # bake: a format that does not exist
    ("bake: bad format", ["bake", DEMO, "--format", "zip", "--out", "{out}"], ["--format", "invalid choice: 'zip'"]),
    # bake without --out
    ("bake: missing out", ["bake", DEMO, "--format", "gguf"], ["required: --out"]),
    # bake: a quantization that does not exist
    ("bake: bad type", ["bake", DEMO, "--format", "gguf", "--out", "{out}", "--type", "q9"], ["--type", "'q9'"]),
    # bake: rank 0
    ("bake: rank 0", ["bake", DEMO, "--format", "adapter", "--out", "{out}", "--rank", "0"], ["--rank", "got 0"]),
    # bake: --source without NAME=BASE,ALIGNED
    (
        "bake: bad source",
        ["bake", DEMO, "--format", "gguf", "--out", "{out}", "--source", "bogus"],
        ["--source 'bogus'", "NAME=BASE,ALIGNED"],
    ),
    # bake: --set out of range
    (
        "bake: --set out of range",
        ["bake", DEMO, "--format", "gguf", "--out", "{out}", "--set", "medical=9"],
        ["--set", "outside"],
    ),
    # convert: the base is not there
    (
        "convert: missing base",
        ["convert", "--base", "{root}/nope", "--aligned", "{hf}", "--out", "{out}"],
        ["--base", "nope' not found"],
    ),
    # convert: neither --aligned nor --peft
    (
        "convert: no source",
        ["convert", "--base", "{hf}", "--out", "{out}"],
        ["one of the arguments --preferences --aligned --peft"],
    ),
    # convert: both --aligned and --peft
    (
        "convert: aligned and peft",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--peft", "{hf}", "--out", "{out}"],
        ["--peft", "not allowed with argument --aligned"],
    ),
    # convert: --rank and --energy together
    (
        "convert: rank and energy",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--out", "{out}", "--rank", "4", "--energy", "0.5"],
        ["--energy", "not allowed with argument --rank"],
    ),
    # convert: energy above 1
    (
        "convert: energy above 1",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--out", "{out}", "--energy", "1.5"],
        ["--energy", "(0, 1]"],
    ),
    # convert: a size that is not one (said before torch is even imported)
    (
        "convert: bad max-size",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--out", "{out}", "--max-size", "big"],
        ["--max-size 'big'", "2.5MB"],
    ),
    # convert: --max-rank without --energy/--max-size
    (
        "convert: max-rank alone",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--out", "{out}", "--max-rank", "8"],
        ["--max-rank only applies"],
    ),
    # convert: negative fit samples
    (
        "convert: fit-samples negative",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--out", "{out}", "--fit-samples", "-1"],
        ["--fit-samples", "got -1"],
    ),
    # convert: calibration without --fit distill
    (
        "convert: calibration without distill",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--out", "{out}", "--calibration", "{data}"],
        ["--calibration/--tokenizer only apply"],
    ),
    # convert: an output directory that does not exist
    (
        "convert: out dir missing",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--out", "{root}/no/dir/o.gguf"],
        ["--out", "does not exist"],
    ),
    # convert: a factor type that does not exist
    (
        "convert: bad dtype",
        ["convert", "--base", "{hf}", "--aligned", "{hf}", "--out", "{out}", "--dtype", "q3"],
        ["--dtype", "invalid choice: 'q3'"],
    ),
    # eval without --data
    ("eval: no data", ["eval", DEMO], ["required: --data"]),
    # eval: data missing
    ("eval: data missing", ["eval", DEMO, "--data", "{root}/none.jsonl"], ["--data", "none.jsonl' not found"]),
    # eval: lambdas not numbers
    ("eval: lambdas text", ["eval", DEMO, "--data", "{data}", "--lambdas", "low:high:1"], ["--lambdas 'low:high:1'"]),
    # eval: lambdas outside [-2, 2]
    ("eval: lambdas out of range", ["eval", DEMO, "--data", "{data}", "--lambdas", "-3:1:1"], ["--lambdas", "outside"]),
    # eval: a step that would build a list of billions (a hang / MemoryError before)
    ("eval: lambdas too many", ["eval", DEMO, "--data", "{data}", "--lambdas", "-1:1:1e-9"], ["--lambdas", "at most 201"]),
    # eval: a zero step
    ("eval: lambdas zero step", ["eval", DEMO, "--data", "{data}", "--lambdas", "0:1:0"], ["--lambdas", "STEP"]),
    # eval: limit 0
    ("eval: limit 0", ["eval", DEMO, "--data", "{data}", "--limit", "0"], ["--limit", "got 0"]),
    # eval: --transfer that is not a model (checked only after the sweeps before)
    (
        "eval: transfer not a model",
        ["eval", DEMO, "--data", "{data}", "--transfer", "{notes}"],
        ["--transfer", "expected a GGUF model"],
    ),
    # eval: --generate without classifier rows (checked only after the sweeps before)
    ("eval: generate without judge data", ["eval", DEMO, "--data", "{data}", "--generate", "2"], ["--judge-data", "not found"]),
    # tune without --target
    ("tune: no target", ["tune", DEMO, "--data", "{data}"], ["required: --target"]),
    # tune: target without a level
    ("tune: target without level", ["tune", DEMO, "--data", "{data}", "--target", "legal"], ["--target 'legal'", "DOMAIN=LEVEL"]),
    # tune: a level that does not exist
    ("tune: unknown level", ["tune", DEMO, "--data", "{data}", "--target", "legal=genius"], ["unknown level 'genius'"]),
    # tune: a domain the data lacks
    ("tune: unknown domain", ["tune", DEMO, "--data", "{data}", "--target", "tax=expert"], ["unknown domain 'tax'"]),
    # tune: grid step 0
    ("tune: grid 0", ["tune", DEMO, "--data", "{data}", "--target", "legal=expert", "--grid", "0"], ["--grid", "(0, 4]"]),
    # tune: budget 0
    ("tune: budget 0", ["tune", DEMO, "--data", "{data}", "--target", "legal=expert", "--budget", "0"], ["--budget", "got 0"]),
    # tune: a profile name that cannot be saved (refused before the tuning, not after it)
    (
        "tune: bad save-profile",
        ["tune", DEMO, "--data", "{data}", "--target", "legal=expert", "--save-profile", "bad name!"],
        ["--save-profile: profile name 'bad name!'", "letters, digits"],
    ),
    # inspect: the file is not there
    ("inspect: missing", ["inspect", "{root}/gone.gguf"], ["gone.gguf' not found"]),
    # inspect: a text file
    ("inspect: not a GGUF", ["inspect", "{notes}"], ["is not a readable GGUF file"]),
    # profiles without a target
    ("profiles: no target", ["profiles"], ["give a modelfile or base .gguf", "--builtins"]),
    # profiles: --lora missing
    ("profiles: lora missing", ["profiles", "{base}", "--lora", "{root}/gone.gguf"], ["--lora", "not found"]),
    # -v takes no value
    ("verbose with a value", ["run", DEMO, "hi", "--verbose=3"], ["--verbose", "ignored explicit argument '3'"]),
]


def _argv(kit: dict[str, str], argv: list[str]) -> list[str]:
    return [a.format(**kit) for a in argv]


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1][0] for c in CASES if c[1]} >= {
        "run",
        "chat",
        "serve",
        "desktop",
        "bake",
        "convert",
        "eval",
        "tune",
        "inspect",
        "profiles",
    }


@pytest.mark.parametrize("case,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line_one_clear_error(kit, capsys, case, argv, words):
    t0 = time.perf_counter()
    try:
        code = main(_argv(kit, argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert code == 2, (case, code, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    for w in words:
        assert w in err, (case, w, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(("avgguf: error:", "avgguf " + (argv[0] if argv else "") + ": error:")), err
    assert len(err) < 4000, len(err)
    assert elapsed < 30, (case, elapsed)  # nothing was loaded or run


def test_every_help_page_renders():
    """`avgguf SUBCOMMAND --help` prints its page and exits 0 for every subcommand (`convert --help` died on a
    bare % in a help string)."""
    import contextlib
    import io

    from avgguf.cli.commands import build_parser, main

    sub = next(a for a in build_parser()._actions if a.choices and "convert" in a.choices)
    for name in sub.choices:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0 and "usage: avgguf" in out.getvalue(), name
