"""Saving a profile into a modelfile (issue 20, audit findings 10 and 26): through symlinks, owner/mode kept,
durable, under a lock across processes, never silently wrong, YAML-special names quoted, "replaced" reported;
the server's route off the event loop, updating only the saved profile in memory, without re-reading the GGUFs."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from avgguf.config.modelfile import ModelfileError, load_modelfile
from avgguf.testing.synthetic import Spec, hf_weights, to_gguf_tensors, write_gguf

ROOT = Path(__file__).resolve().parent.parent
AVS = ROOT / "modelfiles" / "avs"
HEAD = f"base: builtin:smollm2-135m-instruct\navs:\n  medical: {AVS / 'medical.gguf'}\n  legal: {AVS / 'legal.gguf'}\n"


def save(mf, name, coefs, decode=None):
    from avgguf.config.profile_save import save_profile

    return save_profile(mf, name, coefs, decode)


@pytest.fixture()
def folder(tmp_path) -> Path:
    return tmp_path


def write(folder: Path, text: str, name: str = "m.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    spec = Spec("llama")
    path = tmp_path_factory.mktemp("base") / "base.gguf"
    write_gguf(path, spec, to_gguf_tensors(spec, hf_weights(spec)))
    return path


def test_symlinked_modelfile_keeps_the_link_and_writes_the_target(folder):
    """Audit 10: the link was replaced by a plain file and the target left unchanged."""
    real = folder / "dotfiles"
    real.mkdir()
    target = write(real, HEAD + "profiles:\n  a: {medical: 1.0}\n", "demo.yaml")
    os.chmod(target, 0o640)
    link = folder / "demo.yaml"
    link.symlink_to(target)
    save(load_modelfile(link), "new", {"legal": 0.5})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert "new:" in target.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert not [p for p in list(folder.iterdir()) + list(real.iterdir()) if p.name.startswith(".")]  # no temp left


def test_a_column_0_comment_inside_profiles_does_not_end_the_block(folder):
    """Audit 10: the entry went above the comment, the old one stayed below it and won (a silent wrong save)."""
    path = write(
        folder, HEAD + "profiles:\n  a: {medical: 1.0}\n# --- team profiles ---\n  b: {legal: 1.0}\ndefaults:\n  max_tokens: 5\n"
    )
    save(load_modelfile(path), "b", {"legal": -0.5}, "pad")
    mf = load_modelfile(path)
    assert mf.coefficients("b") == {"medical": 0.0, "legal": -0.5} and mf.decode_mode("b") == "pad"
    text = path.read_text()
    assert text.count("b:") == 1 and "# --- team profiles ---" in text
    assert mf.spec.defaults.max_tokens == 5


def test_a_new_profile_goes_after_the_last_entry_and_keeps_comments_in_place(folder):
    path = write(folder, HEAD + "profiles:\n  a: {medical: 1.0}   # mine\n\n# --- generation ---\ndefaults:\n  max_tokens: 5\n")
    save(load_modelfile(path), "c", {"medical": 0.25})
    lines = path.read_text().splitlines()
    assert lines[lines.index("  a: {medical: 1.0}   # mine") + 1].startswith("  c: {")
    assert lines[-4:] == ["", "# --- generation ---", "defaults:", "  max_tokens: 5"]


def test_a_block_style_entry_is_replaced_whole_and_crlf_kept(folder):
    path = folder / "m.yaml"
    text = HEAD + "profiles:\n  a:\n    medical: 1.0\n    # why\n    legal: 0.5\n\n  b: {medical: 1}\n"
    path.write_bytes(text.replace("\n", "\r\n").encode())
    assert save(load_modelfile(path), "a", {"legal": -1}).replaced is True
    raw = path.read_bytes()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # every line still ends in CRLF
    mf = load_modelfile(path)
    assert mf.coefficients("a") == {"medical": 0.0, "legal": -1.0} and mf.coefficients("b")["medical"] == 1.0
    assert b"\r\n\r\n  b: {medical: 1}" in raw  # the blank line before b stays


def test_flow_style_empty_profiles_keeps_its_comment(folder):
    """Audit 10: `profiles: {}  # add yours here` lost its comment."""
    path = write(folder, HEAD + "profiles: {}  # add yours here\ndefaults: {max_tokens: 5}\n")
    save(load_modelfile(path), "p", {"medical": 1})
    text = path.read_text()
    assert "# add yours here" in text
    assert load_modelfile(path).coefficients("p") == {"medical": 1.0, "legal": 0.0}


def test_flow_style_profiles_with_entries_is_refused_clearly(folder):
    path = write(folder, HEAD + "profiles: {a: {medical: 1}}\n")
    before = path.read_text()
    with pytest.raises(ModelfileError, match="flow style"):
        save(load_modelfile(path), "p", {"medical": 1})
    assert path.read_text() == before


@pytest.mark.parametrize("name", ["yes", "on", "null", "123", "0x1F", "1_000", "true", "NO", "1.5", "1e3"])
def test_yaml_special_profile_names_are_quoted(folder, name):
    """Audit 26: refused with a message naming a temp file and a mangled key."""
    path = write(folder, HEAD + "profiles:\n  a: {medical: 1.0}\n")
    saved = save(load_modelfile(path), name, {"medical": 0.5})
    mf = load_modelfile(path)
    assert mf.coefficients(name) == {"medical": 0.5, "legal": 0.0}
    assert saved.replaced is False
    # saving it again finds the quoted entry and replaces it
    again = save(mf, name, {"medical": -0.5})
    assert again.replaced is True and load_modelfile(path).coefficients(name)["medical"] == -0.5
    entries = [ln for ln in path.read_text().splitlines() if ln.lstrip().startswith((f'"{name}":', f"{name}:"))]
    assert len(entries) == 1, entries
    assert yaml.safe_load(path.read_text())["profiles"][name]["medical"] == -0.5  # plain YAML reads it as text too


def test_replaced_is_reported(folder):
    """Audit 26: an existing profile was overwritten without saying so."""
    path = write(folder, HEAD + "profiles:\n  a: {medical: 1.0}\n")
    assert save(load_modelfile(path), "a", {"medical": 0.5}).replaced is True
    assert save(load_modelfile(path), "b", {"medical": 0.5}).replaced is False


def test_errors_name_the_modelfile_not_a_temp_file(folder):
    path = write(folder, HEAD + "profiles:\n  a: {medical: 1.0}\n")
    mf = load_modelfile(path)
    path.write_text(path.read_text() + "defaults: {max_token: 3}\n")  # broken on disk since it was loaded
    with pytest.raises(ModelfileError) as info:
        save(mf, "b", {"medical": 1})
    assert str(path) in str(info.value) and ".tmp" not in str(info.value) and ".avgguf-" not in str(info.value)
    assert "max_token" in str(info.value)
    with pytest.raises(ModelfileError, match="letters, digits"):
        save(mf, "bad name!", {"medical": 1})


def test_coefficients_are_written_exactly(folder):
    path = write(folder, HEAD)
    coefs = {"medical": 0.1234567891234, "legal": 1e-05}
    save(load_modelfile(path), "exact", coefs)
    assert load_modelfile(path).coefficients("exact") == coefs


def test_a_write_that_does_not_read_back_is_undone(folder, monkeypatch):
    """After writing, the file is read back; a difference restores the old text and raises."""
    from avgguf.config import profile_save

    path = write(folder, HEAD + "profiles:\n  a: {medical: 1.0}\n")
    before = path.read_bytes()
    real = profile_save.write_bytes_atomic
    calls = []

    def corrupting(target, data, mode=None):
        calls.append(data)
        real(target, data.replace(b"legal: 0.0", b"legal: 1.0") if len(calls) == 1 else data, mode)

    monkeypatch.setattr(profile_save, "write_bytes_atomic", corrupting)
    with pytest.raises(ModelfileError, match="did not read back as written"):
        save(load_modelfile(path), "b", {"medical": 0.5})
    assert path.read_bytes() == before


SAVER = """
import sys, time
from avgguf.config.modelfile import load_modelfile
from avgguf.config.profile_save import save_profile
path, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mf = load_modelfile(path)
for i in range(n):
    save_profile(mf, f"{prefix}{i}", {"medical": i / 100} if mf.av_paths else {})
print("done", flush=True)
"""


def _saver(path: Path, prefix: str, n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path), prefix, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_save_waits_for_another_process_holding_the_lock(folder, tiny_base):
    """Audit 10: read-modify-write without a lock across processes (two desktops, tune, an editor)."""
    path = write(folder, f"base: {tiny_base}\n")
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = _saver(path, "p", 1)
        time.sleep(3.0)
        assert proc.poll() is None, proc.communicate()  # waiting for the lock
        assert "p0" not in path.read_text()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "done" in out, err
    assert "p0" in path.read_text()


def test_two_processes_saving_at_once_lose_nothing(folder, tiny_base):
    """Several savers at once: every save lands, and none sees another's write during its own read-back
    (a lock on the file alone let a newcomer lock the file a save had just renamed into place: that save's
    read-back then failed and it restored the old text, losing the newcomer's profile)."""
    path = write(folder, f"base: {tiny_base}\n")  # no AVs: empty profiles, the same read-modify-write
    procs = [_saver(path, f"w{k}-", 20) for k in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    names = set(load_modelfile(path).spec.profiles)
    assert names == {f"w{k}-{i}" for k in range(4) for i in range(20)}, sorted(names)


# --- the server route ---------------------------------------------------------------------------------------


def _app(mf):
    from fastapi import FastAPI

    from avgguf.server.web import web

    from avgguf.server.protocol import APIError, error_response

    app = FastAPI()
    app.include_router(web)
    app.add_exception_handler(APIError, lambda _, e: error_response(e.status, e.message, e.param, e.code, e.type))
    served = SimpleNamespace(modelfile=mf)
    app.state.registry = SimpleNamespace(allow_write=True, models={mf.name: served})
    return app, served


async def _post(app, body: dict, **extra):
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.post("/avgguf/profiles", json=body, headers={"Origin": "http://127.0.0.1"}, **extra)


def _demo_copy(folder: Path) -> Path:
    shutil.copytree(ROOT / "modelfiles", folder / "modelfiles", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return folder / "modelfiles" / "demo.yaml"


def test_server_save_is_fast_and_updates_only_that_profile_in_memory(folder):
    """Audit 10: each save parsed the base GGUF twice (~6 s of frozen event loop) and swapped in the whole file
    from disk, unrelated edits (a new system prompt, a new AV) included."""
    path = _demo_copy(folder)
    mf = load_modelfile(path)  # as `avgguf serve` does at start
    app, served = _app(mf)
    path.write_text(path.read_text().replace("description: ", "system: edited on disk meanwhile\ndescription: ", 1))
    t0 = time.perf_counter()
    r = asyncio.run(_post(app, {"model": "demo", "name": "gentle", "coefficients": {"medical": 0.25}, "decode": "pad"}))
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    assert r.json()["replaced"] is True and r.json()["coefficients"]["medical"] == 0.25
    assert elapsed < 1.0, elapsed
    live = served.modelfile
    assert live.spec.system is None  # the on-disk edit is not applied to the running server
    assert live.coefficients("gentle") == {"medical": 0.25, "legal": 0.0, "financial": 0.0}
    assert live.decode_mode("gentle") == "pad"
    assert live.coefficients("expert-all") == mf.coefficients("expert-all")
    disk = load_modelfile(path)
    assert disk.spec.system == "edited on disk meanwhile" and disk.coefficients("gentle")["medical"] == 0.25


def test_server_save_runs_off_the_event_loop(folder, tiny_base):
    """While one save waits (here for another process's lock), the server answers other requests."""
    path = write(folder, f"base: {tiny_base}\n")
    app, _ = _app(load_modelfile(path))

    async def scenario():
        import httpx

        with open(path, "rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            pending = asyncio.create_task(_post(app, {"model": "m", "name": "x", "coefficients": {}}))
            await asyncio.sleep(0.5)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                t0 = time.perf_counter()
                knobs = await asyncio.wait_for(client.get("/avgguf/models"), 5)
                answered = time.perf_counter() - t0
            assert not pending.done()
        return knobs, answered, await pending

    knobs, answered, saved = asyncio.run(scenario())
    assert knobs.status_code == 200 and answered < 1.0
    assert saved.status_code == 200 and saved.json()["saved"] == "x", saved.text


def test_an_unwritable_file_is_a_clear_error(folder, monkeypatch):
    from avgguf.config import profile_save

    path = write(folder, HEAD)
    before = path.read_text()

    def refused(target, data, mode=None):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(profile_save, "write_bytes_atomic", refused)
    with pytest.raises(ModelfileError, match="could not save profile 'p': Permission denied.*writable"):
        save(load_modelfile(path), "p", {"medical": 1})
    assert path.read_text() == before


def test_server_save_error_is_a_400_naming_the_modelfile(folder):
    path = write(folder, HEAD + "profiles:\n  a: {medical: 1.0}\n")
    app, _ = _app(load_modelfile(path))
    r = asyncio.run(_post(app, {"model": "m", "name": "b", "coefficients": {"surgery": 1}}))
    assert r.status_code == 400 and "surgery" in r.json()["error"]["message"], r.text
    assert "Traceback" not in r.text
    assert yaml.safe_load(path.read_text())["profiles"] == {"a": {"medical": 1.0}}
