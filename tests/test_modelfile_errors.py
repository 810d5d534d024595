"""Bad modelfiles (issue 20, audit findings 19 and 28): each case is answered by one ModelfileError that names the
file and the key, says what was expected and found and how to fix it, through load_modelfile and through
`avgguf profiles FILE` (exit status 2, no traceback), quickly, with a short message."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from avgguf.cli import main
from avgguf.config.modelfile import ModelfileError, load_modelfile
from avgguf.testing.synthetic import Spec, hf_weights, to_gguf_tensors, write_gguf

AVS = Path(__file__).resolve().parent.parent / "modelfiles" / "avs"
MED, LEG = AVS / "medical.gguf", AVS / "legal.gguf"
SMOL = "builtin:smollm2-135m-instruct"


def bomb(levels: int) -> str:
    lines = ["base: base.gguf", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def smol(rest: str) -> str:
    return f"base: {SMOL}\navs:\n  medical: {MED}\n  legal: {LEG}\n{rest}"


# (case, file content (str or bytes), words every message must hold). Each case has a comment: what is wrong.
CASES = [
    # an empty file is not a modelfile
    ("empty", "", ["is empty", "base: MODEL.gguf"]),
    # only comments: empty too
    ("only comments", "# nothing here\n", ["is empty"]),
    # the root is a list, not a mapping
    ("root list", "- base.gguf\n", ["expected a mapping", "found a YAML list"]),
    # the root is a plain string
    ("root scalar", "base.gguf\n", ["expected a mapping", "found a YAML str"]),
    # no base key at all
    ("missing base", "description: x\n", ["missing key 'base'", "builtin:"]),
    # base names a file that is not there
    ("base not found", "base: nowhere.gguf\n", ["base 'nowhere.gguf' not found", "looked at"]),
    # base is a text file, not a GGUF (audit 20: never checked without AVs)
    ("base not a GGUF", "base: notes.txt\n", ["is not a GGUF file", "b'GGUF'"]),
    # base is the modelfile itself (audit 28)
    ("base is the modelfile", "base: self.yaml\n", ["is not a GGUF file"]),
    # an unknown built-in
    ("unknown builtin", "base: builtin:gpt-17\n", ["unknown built-in", SMOL]),
    # base is a number
    ("base wrong type", "base: 12\n", ["base: Input should be a valid string", "found 12"]),
    # a typo in a top-level key
    ("unknown top-level key", "base: base.gguf\nprofile: {}\n", ["unknown key 'profile'", "did you mean 'profiles'"]),
    # a typo in defaults
    ("unknown defaults key", "base: base.gguf\ndefaults: {max_token: 5}\n", ["'defaults.max_token'", "'max_tokens'"]),
    # temperature given as text
    (
        "temperature not a number",
        "base: base.gguf\ndefaults: {temperature: hot}\n",
        ["defaults.temperature", "valid number", "'hot'"],
    ),
    # `true` is not a temperature (strict: YAML booleans are not numbers)
    ("temperature boolean", "base: base.gguf\ndefaults: {temperature: true}\n", ["defaults.temperature", "number"]),
    # temperature out of range
    ("temperature out of range", "base: base.gguf\ndefaults: {temperature: 9}\n", ["defaults.temperature", "5"]),
    # NaN in defaults
    ("repeat_penalty NaN", "base: base.gguf\ndefaults: {repeat_penalty: .nan}\n", ["defaults.repeat_penalty", "finite"]),
    # max_tokens 0
    ("max_tokens zero", "base: base.gguf\ndefaults: {max_tokens: 0}\n", ["defaults.max_tokens", "greater than"]),
    # n_ctx as a string
    ("n_ctx string", "base: base.gguf\ndefaults: {n_ctx: '2048'}\n", ["defaults.n_ctx", "valid integer"]),
    # merge mode not one of auto/on/off
    ("bad merge", "base: base.gguf\ndefaults: {merge: always}\n", ["defaults.merge", "'auto'", "'always'"]),
    # avs given as a list
    ("avs a list", f"base: base.gguf\navs: [{MED}]\n", ["avs", "valid dictionary"]),
    # an AV file that is not there
    ("AV missing", "base: base.gguf\navs: {medical: gone.gguf}\n", ["avs.medical", "'gone.gguf' not found"]),
    # an AV that is a text file
    ("AV not a GGUF", "base: base.gguf\navs: {medical: notes.txt}\n", ["avs.medical"]),
    # an AV made for another base (SmolLM2's on the tiny llama)
    ("AV for another base", f"base: base.gguf\navs: {{medical: {MED}}}\n", ["avs.medical"]),
    # an AV named `decode` would be read as a profile's decoding mode
    ("AV named decode", f"base: {SMOL}\navs: {{decode: {MED}}}\n", ["avs: an AV may not be named 'decode'"]),
    # the same AV name twice (PyYAML keeps the last one silently)
    (
        "AV name clash",
        f"base: {SMOL}\navs:\n  medical: {MED}\n  medical: {LEG}\n",
        ["duplicate key 'medical'", "line 3", "remove or rename"],
    ),
    # an unknown key inside an AV
    (
        "AV unknown key",
        f"base: {SMOL}\navs:\n  medical: {{path: {MED}, scale: 1}}\n",
        ["unknown key 'avs.medical.scale'", "path, description"],
    ),
    # a profile naming an AV the file does not have
    ("profile unknown AV", smol("profiles: {p: {surgery: 1}}\n"), ["profiles.p", "unknown alignment vector 'surgery'"]),
    # a coefficient outside [-2, 2]
    ("coefficient out of range", smol("profiles: {p: {medical: 5}}\n"), ["profiles.p", "'medical'", "outside [-2, 2]"]),
    # a NaN coefficient
    ("coefficient NaN", smol("profiles: {p: {medical: .nan}}\n"), ["profiles.p.medical", "finite"]),
    # an infinite coefficient
    ("coefficient inf", smol("profiles: {p: {medical: -.inf}}\n"), ["profiles.p.medical", "finite"]),
    # a coefficient written as text
    ("coefficient text", smol("profiles: {p: {medical: high}}\n"), ["profiles.p.medical", "'high'"]),
    # `yes` is a boolean in YAML, not a coefficient
    ("coefficient boolean", smol("profiles: {p: {medical: yes}}\n"), ["profiles.p.medical", "number"]),
    # a profile that is a number instead of a mapping
    ("profile not a mapping", smol("profiles: {p: 1.0}\n"), ["profiles.p", "valid dictionary"]),
    # a profile name YAML reads as a boolean (audit 26)
    ("profile name boolean", smol("profiles: {yes: {medical: 1}}\n"), ["profiles: a name YAML reads as bool", "quote it"]),
    # a decode mode that does not exist
    ("bad decode", smol("profiles: {p: {medical: 1, decode: fast}}\n"), ["profiles.p.decode", "'pad'", "'fast'"]),
    # default_profile not among the profiles
    ("default_profile unknown", smol("profiles: {p: {medical: 1}}\ndefault_profile: q\n"), ["default_profile 'q'", "['p']"]),
    # a baked profile whose GGUF is missing
    ("baked missing", "base: base.gguf\nbaked: {fast: fast.gguf}\n", ["baked.fast", "not found", "avgguf bake"]),
    # a baked profile with the name of a live one
    ("baked clashes", smol("profiles: {p: {medical: 1}}\nbaked: {p: base.gguf}\n"), ["baked.p", "rename one"]),
    # system prompt given as a list
    ("system a list", "base: base.gguf\nsystem: [a, b]\n", ["system", "valid string"]),
    # system_policy not default/enforce
    ("bad system_policy", "base: base.gguf\nsystem_policy: strict\n", ["system_policy", "'enforce'"]),
    # a billion laughs: 10^9 values from a few hundred bytes (audit 19)
    ("alias bomb", bomb(9), ["refused", "billion laughs", "100,000"]),
    # an anchor used inside itself
    ("recursive alias", "base: base.gguf\nx: &a [1, *a]\n", ["refused", "recursive alias"]),
    # an alias that names no anchor
    ("undefined alias", "base: *nowhere\n", ["not valid YAML", "undefined alias"]),
    # nesting far deeper than a modelfile needs
    ("deep nesting", "base: base.gguf\nx: " + "[" * 5000 + "]" * 5000 + "\n", ["refused", "nesting deeper"]),
    # a tab used for indentation
    ("tabs", "base: base.gguf\ndefaults:\n\tmax_tokens: 5\n", ["not valid YAML", "tabs", "spaces"]),
    # base given twice
    ("duplicate top-level key", "base: base.gguf\nbase: other.gguf\n", ["duplicate key 'base'", "line 1"]),
    # two profiles of one name
    ("duplicate profile", smol("profiles:\n  p: {medical: 1}\n  p: {medical: -1}\n"), ["duplicate key 'p'"]),
    # unclosed flow mapping
    ("syntax error", "base: base.gguf\nprofiles: {p: {medical: 1}\n", ["not valid YAML", "line"]),
    # a Python tag (safe loading refuses it)
    ("python tag", "base: !!python/object/apply:os.system ['true']\n", ["not valid YAML", "constructor"]),
    # a list as a mapping key
    ("unhashable key", "base: base.gguf\n? [a, b]\n: 1\n", ["not valid YAML", "unhashable"]),
    # bytes that are not UTF-8
    ("binary garbage", bytes(range(128, 256)) * 8, ["is not a text file", "YAML modelfile"]),
    # a NUL byte in otherwise valid text
    ("NUL byte", "base: base.gguf\x00\n", ["not valid YAML", "#x0000", "remove it"]),
    # far larger than any modelfile
    ("huge file", "# " + "x" * 78 + "\n" + ("#" * 99 + "\n") * 22000, ["MiB", "a modelfile is a short YAML file"]),
    # a huge value in a key that fails validation: the message quotes a short prefix (audit 19)
    (
        "huge value in message",
        "base: base.gguf\ndescription: [" + "aaaa, " * 30000 + "]\n",
        ["description", "valid string", "..."],
    ),
    # more values than any modelfile holds, without aliases
    ("too many values", "base: base.gguf\nx: [" + "1," * 150000 + "]\n", ["refused", "more than 100,000 values"]),
    # unknown profile_decode written by hand as a list (a TypeError in the validator before)
    ("profile_decode list", "base: base.gguf\nprofile_decode: [1]\n", ["profile_decode", "valid dictionary"]),
]


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("badmf")
    spec = Spec("llama")
    write_gguf(root / "base.gguf", spec, to_gguf_tensors(spec, hf_weights(spec)))
    (root / "notes.txt").write_text("just some notes\n")
    return root


def _write(kit: Path, case: str, content) -> Path:
    path = kit / ("self.yaml" if case == "base is the modelfile" else f"{case.replace(' ', '_')}.yaml")
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case,content,words", CASES, ids=[c[0] for c in CASES])
def test_bad_modelfile_one_clear_error(kit, case, content, words):
    path = _write(kit, case, content)
    t0 = time.perf_counter()
    with pytest.raises(ModelfileError) as info:
        load_modelfile(path)
    elapsed = time.perf_counter() - t0
    message = str(info.value)
    assert str(path) in message, message  # where: the file
    for w in words:
        assert w in message, (case, w, message)
    assert len(message) < 1500, (case, len(message))  # one short error, not the expanded input
    assert elapsed < 10, (case, elapsed)


@pytest.mark.parametrize("case,content,words", CASES, ids=[c[0] for c in CASES])
def test_bad_modelfile_through_the_cli(kit, case, content, words, capsys):
    path = _write(kit, case, content)
    assert main(["profiles", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avgguf profiles: error: ") and "Traceback" not in err, err
    assert words[0] in err and err.count("\n") <= 3, err


def test_alias_bomb_is_refused_fast_with_a_short_message(kit):
    """Audit 19: a 1 KB file with 6 levels (10^6 leaves) gave a 7 MB message in 2 s."""
    path = _write(kit, "bomb6", bomb(6).replace("base: base.gguf", "base: 12"))
    t0 = time.perf_counter()
    with pytest.raises(ModelfileError) as info:
        load_modelfile(path)
    assert time.perf_counter() - t0 < 1.0
    assert len(str(info.value)) < 600


def test_small_aliases_and_merge_keys_still_work(kit):
    path = kit / "aliases.yaml"
    path.write_text(
        f"base: {SMOL}\navs:\n  medical: {MED}\n  legal: {LEG}\n"
        "profiles:\n  a: &common {medical: 0.5}\n  b: {<<: *common, legal: 1.0}\n"
    )
    mf = load_modelfile(path)
    assert mf.coefficients("a") == {"medical": 0.5, "legal": 0.0}
    assert mf.coefficients("b") == {"medical": 0.5, "legal": 1.0}


def test_no_home_directory_does_not_break_the_cli(kit, monkeypatch):
    """Audit 28: chat_repl evaluated Path.home() at import, so every command failed without a home."""
    import subprocess
    import sys

    code = (
        "import pathlib, sys\n"
        "def no_home(*a): raise RuntimeError('Could not determine home directory.')\n"
        "pathlib.Path.home = classmethod(no_home)\n"
        "from avgguf.cli import main\n"
        f"sys.exit(main(['profiles', {str(_write(kit, 'home', 'base: base.gguf'))!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    from avgguf.cli import repl as chat_repl

    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert chat_repl.history_file() is None


def test_history_is_bounded():
    from avgguf.cli import repl as chat_repl

    assert 0 < chat_repl.HISTORY_LENGTH <= 10000


SYSTEM = "Answer as a careful physician."


@pytest.mark.parametrize(
    "policy,messages,want",
    [
        # default: the modelfile's system prompt when the client sends none
        (
            "default",
            [{"role": "user", "content": "hi"}],
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
        ),
        # default: a client's system message replaces it (today's behaviour, as llama-server)
        (
            "default",
            [{"role": "system", "content": "be a pirate"}, {"role": "user", "content": "hi"}],
            [{"role": "system", "content": "be a pirate"}, {"role": "user", "content": "hi"}],
        ),
        # enforce: the modelfile's comes first, the client's is appended in the same turn
        (
            "enforce",
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            [{"role": "system", "content": SYSTEM + "\n\nbe brief"}, {"role": "user", "content": "hi"}],
        ),
        # enforce: developer turns and later system turns join it too (one system turn, first)
        (
            "enforce",
            [
                {"role": "user", "content": "hi"},
                {"role": "developer", "content": [{"type": "text", "text": "x"}]},
                {"role": "system", "content": "y"},
            ],
            [{"role": "system", "content": SYSTEM + "\n\nx\n\ny"}, {"role": "user", "content": "hi"}],
        ),
        # enforce without any client system turn: just the modelfile's
        (
            "enforce",
            [{"role": "user", "content": "hi"}],
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
        ),
    ],
)
def test_system_policy(kit, policy, messages, want):
    """Audit 12 (modelfile half): `system_policy: enforce` keeps the operator's system prompt."""
    path = kit / f"sys-{policy}.yaml"
    path.write_text(f"base: base.gguf\nsystem: {SYSTEM}\nsystem_policy: {policy}\n")
    mf = load_modelfile(path)
    before = [dict(m) for m in messages]
    assert mf.system_messages(messages) == want
    assert messages == before  # the caller's list is left as it was
