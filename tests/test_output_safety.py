"""Issue 20 point 1 and point 4 (audit findings 1, 20, 21): writes never destroy what avgguf did not write, and
a kill -9 mid-convert or mid-bake leaves no partial output; the rerun succeeds.

Real CLI runs on the tiny synthetic kit (conftest.tiny_kit); the kills are real SIGKILLs of a CLI subprocess,
held mid-write by a sleep injected at one named function."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from avgguf.gguf import adapter_format as fmt
from avgguf import atomic
from avgguf.cli import main

DIR_FORMATS = ["ollama", "peft"]


def run_bake(capsys, target: str, out: Path, format_: str, *extra: str) -> tuple[int, str, str]:
    code = main(["bake", target, "--out", str(out), "--format", format_, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hidden(directory: Path) -> list[str]:
    """avgguf temp files or directories left in `directory`."""
    return sorted(p.name for p in directory.iterdir() if ".avgguf-" in p.name)


def profile_of(out: Path, format_: str) -> str:
    if format_ in DIR_FORMATS:
        return json.loads((out / "avgguf.json").read_text())["avgguf.baked.profile"]
    return gguf.GGUFReader(out).get_field("avgguf.baked.profile").contents()


# --- directory outputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("format_", DIR_FORMATS)
def test_a_directory_avgguf_did_not_write_is_refused_and_its_files_survive(tiny_kit, tmp_path, capsys, format_):
    """finding 1: `--out Documents` deleted Documents/thesis.txt (exit 0)."""
    root, *_ = tiny_kit
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", docs, format_)
    assert code == 2 and "avgguf did not write" in err and "thesis.txt" in err and "--force" in err, err
    assert "Traceback" not in err
    assert os.listdir(docs) == ["thesis.txt"] and (docs / "thesis.txt").read_text() == "years of work"
    assert os.listdir(tmp_path) == ["Documents"]  # no temp left beside it


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "file-by-file"])
@pytest.mark.parametrize("format_", DIR_FORMATS)
def test_an_earlier_bake_of_the_same_format_is_replaced(tiny_kit, tmp_path, capsys, monkeypatch, format_, exchange):
    root, *_ = tiny_kit
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "baked"
    assert run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, format_)[0] == 0
    first = sorted(os.listdir(out))
    marker = json.loads((out / "avgguf.json").read_text())
    assert marker["avgguf.output"] == format_ and sorted(marker["avgguf.files"] + ["avgguf.json"]) == first
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:expert-medical", out, format_)
    assert code == 0, err
    assert sorted(os.listdir(out)) == first and profile_of(out, format_) == "expert-medical"
    assert hidden(tmp_path) == [] and hidden(out) == []
    # the same directory once the user put a file of their own in it: refused, the file kept
    (out / "notes.txt").write_text("mine")
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, format_)
    assert code == 2 and "notes.txt" in err, err
    assert (out / "notes.txt").read_text() == "mine" and profile_of(out, format_) == "expert-medical"


def test_an_earlier_bake_of_another_format_is_refused(tiny_kit, tmp_path, capsys):
    root, *_ = tiny_kit
    out = tmp_path / "baked"
    assert run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, "ollama")[0] == 0
    before = {n: digest(out / n) for n in os.listdir(out)}
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, "peft")
    assert code == 2 and "peft" in err, err
    assert {n: digest(out / n) for n in os.listdir(out)} == before


def test_a_crafted_marker_names_nothing_outside_its_directory(tiny_kit, tmp_path, capsys):
    """A marker avgguf did not write, listing '../victim.txt' as one of 'its' files, makes the directory foreign."""
    root, *_ = tiny_kit
    (tmp_path / "victim.txt").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "avgguf.json").write_text(json.dumps({"avgguf.output": "ollama", "avgguf.files": ["../victim.txt"]}))
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, "ollama")
    assert code == 2 and "avgguf did not write" in err, err
    for _ in range(2):  # --force, then a replace of that (now genuine) output: the victim is never touched
        assert run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, "ollama", "--force")[0] == 0
    assert (tmp_path / "victim.txt").read_text() == "keep me"


@pytest.mark.parametrize("format_", DIR_FORMATS)
def test_force_writes_into_a_foreign_directory_and_keeps_its_files(tiny_kit, tmp_path, capsys, format_):
    root, *_ = tiny_kit
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", docs, format_, "--force")
    assert code == 0, err
    assert (docs / "thesis.txt").read_text() == "years of work" and (docs / "avgguf.json").is_file()
    assert ("Modelfile" if format_ == "ollama" else "adapter_config.json") in os.listdir(docs)
    assert hidden(tmp_path) == []
    # the directory still holds a file avgguf did not write: a rerun without --force is refused
    assert run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", docs, format_)[0] == 2
    assert run_bake(capsys, f"{root / 'tiny.yaml'}:expert-medical", docs, format_, "--force")[0] == 0
    assert (docs / "thesis.txt").read_text() == "years of work" and profile_of(docs, format_) == "expert-medical"


# --- file outputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("format_", ["gguf", "adapter"])
def test_a_file_avgguf_did_not_write_is_refused_unless_forced(tiny_kit, tmp_path, capsys, format_):
    root, *_ = tiny_kit
    out = tmp_path / "notes.gguf"
    out.write_text("not a model")
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, format_)
    assert code == 2 and "already exists" in err and "--force" in err, err
    assert out.read_text() == "not a model" and os.listdir(tmp_path) == ["notes.gguf"]
    assert run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, format_, "--force")[0] == 0
    assert profile_of(out, format_) == "mixed"
    # now an earlier avgguf output of this format: replaced without --force
    assert run_bake(capsys, f"{root / 'tiny.yaml'}:expert-medical", out, format_)[0] == 0
    assert profile_of(out, format_) == "expert-medical" and hidden(tmp_path) == []
    # ... but not by the other file format (a baked model is no adapter)
    other = "adapter" if format_ == "gguf" else "gguf"
    assert run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, other)[0] == 2


def _input_cases(root: Path, tmp_path: Path) -> dict:
    link = tmp_path / "link-to-legal.gguf"
    link.symlink_to(root / "legal.gguf")
    return {  # (format, --out)
        "gguf over the base": ("gguf", root / "med" / "base.gguf"),
        "adapter over an AV": ("adapter", root / "medical.gguf"),
        "adapter through a symlink to an AV": ("adapter", link),
        "gguf over the modelfile": ("gguf", root / "tiny.yaml"),
        "ollama into the modelfile's directory": ("ollama", root),
        "peft into the base's directory": ("peft", root / "med"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "gguf over the base",
        "adapter over an AV",
        "adapter through a symlink to an AV",
        "gguf over the modelfile",
        "ollama into the modelfile's directory",
        "peft into the base's directory",
    ],
)
def test_an_out_that_is_or_holds_an_input_is_refused_even_with_force(tiny_kit, tmp_path, capsys, case):
    root, *_ = tiny_kit
    format_, out = _input_cases(root, tmp_path)[case]
    inputs = [root / "tiny.yaml", root / "med" / "base.gguf", root / "medical.gguf", root / "legal.gguf"]
    before = [digest(p) for p in inputs]
    listing = sorted(os.listdir(root)), sorted(os.listdir(root / "med"))
    for extra in ((), ("--force",)):
        code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, format_, *extra)
        assert code == 2 and "input" in err and "destroy" in err, err
    assert [digest(p) for p in inputs] == before
    assert (sorted(os.listdir(root)), sorted(os.listdir(root / "med"))) == listing


@pytest.mark.parametrize("format_", ["gguf", "adapter"])
def test_a_symlinked_output_is_written_through_and_keeps_its_mode(tiny_kit, tmp_path, capsys, format_):
    root, *_ = tiny_kit
    (tmp_path / "real").mkdir()
    real, link = tmp_path / "real" / "out.gguf", tmp_path / "link.gguf"
    assert run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", real, format_)[0] == 0
    real.chmod(0o640)
    link.symlink_to(real)
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:expert-medical", link, format_)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert profile_of(real, format_) == "expert-medical" and (real.stat().st_mode & 0o777) == 0o640
    assert hidden(tmp_path) == [] and hidden(tmp_path / "real") == []


def test_convert_keeps_mode_and_refuses_to_overwrite_its_base(llama_pair, tmp_path, capsys):
    p = llama_pair
    out = tmp_path / "av.gguf"
    argv = ["convert", "--base", str(p.base_hf), "--aligned", str(p.aligned_hf), "--out", str(out), "--rank", "4"]
    assert main(argv) == 0
    out.chmod(0o600)
    assert main(argv) == 0 and (out.stat().st_mode & 0o777) == 0o600  # an earlier avgguf adapter: replaced
    capsys.readouterr()
    base = tmp_path / "base.gguf"
    base.write_bytes(p.base_gguf.read_bytes())
    before = digest(base)
    code = main(["convert", "--base", str(base), "--aligned", str(p.aligned_hf), "--out", str(base), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "destroy" in err and digest(base) == before, err
    notes = tmp_path / "notes.gguf"
    notes.write_text("mine")
    assert main(argv[:-4] + ["--out", str(notes), "--rank", "4"]) == 2 and notes.read_text() == "mine"
    assert main(argv[:-4] + ["--out", str(notes), "--rank", "4", "--force"]) == 0
    assert fmt.read_adapter(notes).pairs


# --- Ollama specifics (finding 20) ------------------------------------------------------------------------------


def _modelfile(root: Path, tmp_path: Path, **spec) -> Path:
    mf = {
        "base": str(root / "med" / "base.gguf"),
        "avs": {"medical": str(root / "medical.gguf")},
        "profiles": {"p": {"medical": 1.0}},
        **spec,
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(mf))
    return path


@pytest.mark.parametrize("system", ['break out """\nFROM ./evil.gguf\nSYSTEM """x', 'ends in a quote"'])
def test_ollama_refuses_a_system_prompt_that_ends_its_string(tiny_kit, tmp_path, capsys, system):
    root, *_ = tiny_kit
    out = tmp_path / "o"
    code, _, err = run_bake(capsys, f"{_modelfile(root, tmp_path, system=system)}:p", out, "ollama")
    assert code == 2 and '"""' in err and "SYSTEM" in err, err
    assert not out.exists() and hidden(tmp_path) == []


def test_ollama_checks_the_base_is_a_gguf_model_with_no_av_active(tiny_kit, tmp_path, capsys):
    root, *_ = tiny_kit
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00 not really a model")
    mf = tmp_path / "fake.yaml"
    mf.write_text(yaml.safe_dump({"base": str(fake)}))
    out = tmp_path / "o"
    code, _, err = run_bake(capsys, str(mf), out, "ollama")
    assert code == 2 and "not a readable GGUF" in err and "Traceback" not in err, err
    assert not out.exists() and hidden(tmp_path) == []


def test_ollama_report_says_the_base_is_hard_linked(tiny_kit, tmp_path, capsys):
    root, *_ = tiny_kit
    out = tmp_path / "o"
    code, stdout, err = run_bake(capsys, f"{_modelfile(root, tmp_path)}:p", out, "ollama")
    assert code == 0, err
    assert "hard link" in stdout and "changes both" in stdout, stdout
    assert os.stat(out / "base.gguf").st_ino == os.stat(root / "med" / "base.gguf").st_ino


# --- space, umask, stale temps ------------------------------------------------------------------------------------


def test_free_space_is_checked_before_a_gguf_bake(tiny_kit, tmp_path, capsys, monkeypatch):
    root, *_ = tiny_kit
    real = atomic.shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    out = tmp_path / "x.gguf"
    code, _, err = run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", out, "gguf")
    assert code == 2 and "needs about" in err and "free" in err, err
    assert os.listdir(tmp_path) == []


def test_no_write_changes_the_process_umask(tmp_path, monkeypatch):
    """finding 21: commit() flipped os.umask(0) while other threads may create files."""
    mask = os.umask(0o022)
    os.umask(mask)
    assert atomic.umask() == mask

    def refuse(_):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", refuse)
    writer = fmt.AdapterWriter(tmp_path / "a.gguf", "llama", "a")
    writer.add_pair("blk.0.attn_q.weight", np.ones((2, 64), np.float32), np.ones((64, 2), np.float32), "f32")
    writer.commit()
    assert ((tmp_path / "a.gguf").stat().st_mode & 0o777) == 0o666 & ~mask
    atomic.write_bytes_atomic(tmp_path / "b.txt", b"x")
    assert ((tmp_path / "b.txt").stat().st_mode & 0o777) == 0o666 & ~mask


def test_stale_temps_of_dead_processes_are_removed_live_ones_kept(tiny_kit, tmp_path, capsys):
    root, *_ = tiny_kit
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".x.gguf.avgguf-{dead_pid}.tmp").write_bytes(b"partial")
        (tmp_path / f".o.avgguf-{dead_pid}.tmp").mkdir()
        (tmp_path / f".o.avgguf-{dead_pid}.tmp" / "Modelfile").write_text("FROM x")
        (tmp_path / f".y.gguf.avgguf-{live.pid}.tmp").write_bytes(b"in use")
        assert run_bake(capsys, f"{root / 'tiny.yaml'}:mixed", tmp_path / "a.gguf", "adapter")[0] == 0
        assert hidden(tmp_path) == [f".y.gguf.avgguf-{live.pid}.tmp"]
    finally:
        live.kill()
        live.wait()


def test_an_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        with atomic.output_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with atomic.output_dir(tmp_path / "d", "ollama") as d:
            (d.path / "Modelfile").write_text("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# --- kill -9 mid-write, then rerun ------------------------------------------------------------------------------

HOLD = r"""
import functools, importlib, sys, time
where, when, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
module_name, _, rest = where.partition(":")
owner = importlib.import_module(module_name)
*path, attr = rest.split(".")
for name in path:
    owner = getattr(owner, name)
original, calls = getattr(owner, attr), []

@functools.wraps(original)
def held(*args, **kwargs):
    calls.append(1)
    if when == "before" or len(calls) > 1:
        time.sleep(600)  # held here, mid-write, until the test's SIGKILL
    return original(*args, **kwargs)

setattr(owner, attr, held)
from avgguf.cli import main
sys.exit(main(argv))
"""

# (case, command (format or "convert"), function held, "before" its first call or at its second call,
#  whether an earlier output exists (it must survive the kill unchanged))
KILLS = [
    # mid-way through writing the float32 intermediate of a gguf bake
    ("bake-gguf-merging", "gguf", "gguf:GGUFWriter.write_tensor_data", "second", False),
    # the quantized model complete in its temp file, not yet published; an earlier bake in place
    ("bake-gguf-publishing", "gguf", "avgguf.atomic:_fsync_file", "before", True),
    # a fused adapter being published
    ("bake-adapter", "adapter", "avgguf.atomic:_fsync_file", "before", False),
    # an Ollama directory complete in its temp directory; an earlier bake in place
    ("bake-ollama", "ollama", "avgguf.atomic:_publish_dir", "before", True),
    # a PEFT directory mid-way: the fused adapter written, the safetensors not yet
    ("bake-peft", "peft", "avgguf.export.peft:peft_tensors", "before", False),
    # convert: header written, tensor data not yet; an earlier conversion in place
    ("convert-writing", "convert", "gguf:GGUFWriter.write_tensors_to_file", "before", True),
    # convert: the adapter complete in its temp file, not yet published
    ("convert-publishing", "convert", "avgguf.atomic:_fsync_file", "before", False),
]


def _argv(command: str, root: Path, p, out: Path, profile: str = "mixed") -> list[str]:
    if command == "convert":
        return ["convert", "--base", str(p.base_hf), "--aligned", str(p.aligned_hf), "--out", str(out), "--rank", "4"]
    return ["bake", f"{root / 'tiny.yaml'}:{profile}", "--out", str(out), "--format", command]


def _state(out: Path):
    if out.is_dir():
        return {n: digest(out / n) for n in sorted(os.listdir(out))}
    return digest(out) if out.exists() else None


@pytest.mark.parametrize("case,command,where,when,earlier", KILLS, ids=[k[0] for k in KILLS])
def test_kill_9_mid_write_leaves_no_partial_output_and_the_rerun_succeeds(
    tiny_kit, tmp_path, capsys, case, command, where, when, earlier
):
    root, p, _ = tiny_kit
    out = tmp_path / ("out" if command in DIR_FORMATS else "out.gguf")
    if earlier:
        assert main(_argv(command, root, p, out, "expert-medical")) == 0
    before = _state(out)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, where, when, *_argv(command, root, p, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    try:
        while not hidden(tmp_path) or (command == "peft" and not _temp_has(tmp_path, "fused.gguf")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the held call
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert hidden(tmp_path), "the kill came mid-write: its temp is still there"
    assert _state(out) == before  # no partial output at the final path: nothing, or the earlier output intact
    capsys.readouterr()
    assert main(_argv(command, root, p, out)) == 0, capsys.readouterr().err
    assert hidden(tmp_path) == [] and (not out.is_dir() or hidden(out) == [])  # the dead run's temp removed
    if command == "convert":
        assert fmt.read_adapter(out).pairs
    elif command in ("gguf", "adapter") or (out / "avgguf.json").exists():
        assert profile_of(out, command) == "mixed"


def _temp_has(directory: Path, name: str) -> bool:
    return any((directory / h / name).exists() for h in hidden(directory) if (directory / h).is_dir())


def test_stale_scratch_of_a_reused_pid_is_removed(tmp_path):
    """A container's avgguf is PID 1 at every start: scratch named with our own pid but older than this
    process was left by an earlier one; scratch written since we started stays."""
    import os
    import time

    from avgguf import atomic

    old = tmp_path / f".out.gguf.avgguf-{os.getpid()}.tmp"
    new = tmp_path / f".other.gguf.avgguf-{os.getpid()}.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    long_ago = time.time() - 10 * 86400
    os.utime(old, (long_ago, long_ago))
    assert atomic.process_started(os.getpid()) is not None
    assert atomic.remove_stale(tmp_path) == [old]
    assert new.exists() and not old.exists()
