"""Every command of README.md and docs/*.md, run as written.

A block is marked by an HTML comment on the line right before its fence (docs/development.md has the table):

    <!-- test: NAME [cwd=repo|demo|knob] [stdin="..."] [expect="..."] [status=N] [until="..."] [while=NAME]
               [browser] [converter] [ci] [file=PATH] [timeout=S] -->
    <!-- output: NAME [lines="REGEX"] [prompt="> "] -->     (before a ```console block quoting a real run)

Every ```bash, ```python and ```console block must carry one; pages run in PAGES order (later blocks use
files earlier ones wrote). The README's "Your fine-tune as a knob" runs in `knob`: a directory holding the
names the README uses, made from tiny models (a llama with SmolLM2's tokenizer, its full fine-tune, a real
PEFT LoRA of it, fine-tune.gguf). `pip install` steps are checked, not run (there is no network here).
"""

from __future__ import annotations

import ast
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + [
    f"docs/{p}.md"
    for p in (
        "convert",
        "run-chat",
        "desktop",
        "serve",
        "bake",
        "modelfile",
        "pad",
        "eval-tune",
        "python-api",
        "troubleshooting",
        "security",
        "development",
        "performance",
    )
]
PAGES += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if str(p.relative_to(ROOT)) not in PAGES)
MARKED = {"bash", "sh", "shell", "python", "console"}  # fences that must carry a marker
CONVERTER = os.environ.get("AVGGUF_HF_CONVERTER", "")
SERVER_PORT = 8080  # the documented default: the server blocks run as written
TIMEOUT = 300


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    kind: str  # test | output | none
    name: str = ""
    opts: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.name or self.line}"


def parse_marker(comment: str) -> tuple[str, str, dict]:
    m = re.fullmatch(r"<!--\s*(test|output):\s*(.*?)\s*-->", comment.strip())
    if not m:
        return "none", "", {}
    words = shlex.split(m.group(2))
    opts: dict = {}
    for w in words[1:]:
        key, eq, value = w.partition("=")
        opts[key] = value.encode().decode("unicode_escape") if eq else True
    return m.group(1), words[0], opts


def blocks(page: str) -> list[Block]:
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, ticks, lang = i, fence.group(1), fence.group(2)
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i])
            i += 1
        i += 1
        kind, name, opts = parse_marker(lines[start - 1]) if start else ("none", "", {})
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n", kind, name, opts))
    return out


ALL = [b for page in PAGES for b in blocks(page)]
RUNNABLE = [b for b in ALL if b.kind == "test"]
BY_NAME = {b.name: b for b in RUNNABLE}
RESULTS: dict[str, subprocess.CompletedProcess | str] = {}  # block name -> its run (or why not)


# --- the documents themselves ---------------------------------------------------------------------------


def test_every_command_block_is_marked():
    unmarked = [f"{b.page}:{b.line} ```{b.lang}" for b in ALL if b.lang in MARKED and b.kind == "none"]
    assert not unmarked, f"shell/python/console blocks without a <!-- test: --> or <!-- output: --> marker: {unmarked}"
    wrong = [f"{b.page}:{b.line}" for b in ALL if b.kind == "output" and b.lang != "console"]
    wrong += [f"{b.page}:{b.line}" for b in ALL if b.kind == "test" and b.lang == "console"]
    assert not wrong, f"output markers go on ```console blocks, test markers on the others: {wrong}"
    names = [b.name for b in RUNNABLE]
    assert len(names) == len(set(names)), f"block names repeat: {sorted(n for n in names if names.count(n) > 1)}"
    for b in ALL:
        for ref in (b.opts.get("while"), b.name if b.kind == "output" else None):
            assert ref is None or ref in BY_NAME, f"{b.id}: no block named {ref!r}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines; the reference lives in docs/"


def test_performance_page_is_generated():
    r = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_headline_figures_come_from_bench_results():
    """Every number of the README's headline table is a string of some bench/results/*.md file."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- headline:", 1)[1].split("<!-- /headline -->", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|") and "---" not in line][1:]
    assert len(rows) >= 3, "the README's headline table is empty: run python bench/report.py"
    results = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "bench" / "results").glob("*.md"))
    for row in rows:
        measured = row.split("|")[2:4]  # the avgguf and baseline columns
        for number in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:%|/\d+)?", " ".join(measured)):
            if number in ("16", "10", "1", "0"):  # option values in the labels (rank 16, --max-size 10MB, 1 / 0)
                continue
            assert number in results, f"headline figure {number} ({row[:60]}...) is in no bench/results/*.md file"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation but '-' dropped, spaces to '-'."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


def test_links_resolve():
    """Every relative link of README.md and docs/ names a file that exists (and a heading there, after #)."""
    broken = []
    for page in PAGES:
        text = re.sub(r"(`+).*?\1", "", (ROOT / page).read_text(encoding="utf-8"))  # not inside code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, frag = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            if not file.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif frag and file.suffix == ".md" and frag not in anchors(file):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, broken


def code_messages() -> list[str]:
    """Every string constant of the package (f-strings with … for their fields) and argparse's messages."""
    out = []

    def text(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
        return None

    files = [*ROOT.glob("avgguf/**/*.py"), *ROOT.glob("converters/*.py")]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                parts = [text(node.left), text(node.right)]
                if all(parts):
                    out.append("".join(parts))
            t = text(node)
            if t:
                out.append(t)
    import argparse

    source = Path(argparse.__file__).read_text(encoding="utf-8")
    found = re.findall(r"_\('([^']+)'\)", source) + [
        m for pair in re.findall(r"ngettext\('([^']+)',\s*'([^']+)'", source) for m in pair
    ]
    out += [re.sub(r"%(\(\w+\))?[sd]", "…", m) for m in found]
    return out


def fits(quoted: str, messages: list[str]) -> bool:
    """The quoted message's literal pieces (between …; numbers are values) appear in order in one message
    of the code; else, for a message assembled from several strings, each of its clauses is text of the
    code. A leading "argument --FLAG: " is argparse's prefix."""
    quoted = re.sub(r"^argument -[-\w]+: ", "", quoted)
    quoted = re.sub(r"-?\d+(?:\.\d+)?", "…", quoted)
    pieces = [p for p in quoted.split("…") if p.strip(" ()[],.;:'~")]
    for m in messages:
        at = 0
        for piece in pieces:
            at = m.find(piece, at)
            if at < 0:
                break
            at += len(piece)
        else:
            return True
    corpus = "\n".join(messages)
    clauses = [c.strip(" ()[],.;:'~?") for p in pieces for c in re.split(r"; |\(|\)", p)]
    return all(c in corpus for c in clauses if len(c) >= 4)


def test_troubleshooting_quotes_real_messages():
    messages = code_messages()
    page = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    quoted, header = [], None
    for line in page.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if header is None:
            header = cells[0]
            continue
        if header == "message" and not set(cells[0]) <= set("-| "):
            quoted += [m.group(2).strip() for m in re.finditer(r"(`+)(.+?)\1", cells[0])]
    assert len(quoted) > 30
    missing = [q for q in quoted if not fits(q, messages)]
    assert not missing, f"docs/troubleshooting.md quotes messages the code does not print: {missing}"


# --- working directories --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """HOME for the commands (chat history, caches), and the stand-in browser that records what it opens."""
    home = tmp_path_factory.mktemp("home")
    browser = home / "browser"
    browser.write_text('#!/bin/sh\necho "browser opened: $1"\n')
    browser.chmod(0o755)
    return home


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """A copy of modelfiles/ (the AVs linked) with data/ beside it: commands that write (bake, tune) stay here."""
    root = tmp_path_factory.mktemp("demo")
    (root / "modelfiles").mkdir()
    for p in (ROOT / "modelfiles").glob("*.yaml"):
        shutil.copy(p, root / "modelfiles" / p.name)
    (root / "modelfiles" / "avs").symlink_to(ROOT / "modelfiles" / "avs")
    (root / "data").symlink_to(ROOT / "data")
    return root


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def real_converter() -> str | None:
    """Why llama.cpp's converter cannot run here, or None when it can."""
    if not Path(CONVERTER).is_file():
        return "AVGGUF_HF_CONVERTER does not name llama.cpp's convert_hf_to_gguf.py"
    if not has_module("sentencepiece"):
        return "llama.cpp's converter needs sentencepiece, which is not installed (the README's extras line installs it)"
    return None


def smollm2_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer (with its chat template) from the embedded GGUF, as a fine-tune directory holds it."""
    from transformers import AutoTokenizer

    from avgguf.config.builtin import builtin_path

    gguf = builtin_path("smollm2-135m-instruct")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


@pytest.fixture(scope="session")
def knob(tmp_path_factory) -> Path:
    """path/to/base-model, path/to/fine-tune, path/to/lora-adapter and fine-tune.gguf, from a tiny llama with
    SmolLM2's vocabulary; base.gguf is made by the README's own converter line (or substituted there)."""
    import numpy as np

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from avgguf.testing.synthetic import Delta, Spec, hf_weights, random_delta, to_gguf_tensors, write_gguf, write_hf

    root = tmp_path_factory.mktemp("knob")
    spec = Spec("llama", tied=True, n_vocab=49152)  # SmolLM2's tokenizer, so llama.cpp's converter takes it
    w = hf_weights(spec)
    delta = random_delta(spec, w, seed=1, include_norms=False).tensors
    delta.pop("model.embed_tokens.weight")  # as most fine-tunes: the (tied) embedding frozen
    tok = root / "tokenizer"
    smollm2_tokenizer(tok)
    for name, weights in (("base-model", w), ("fine-tune", Delta(delta).applied_to(w))):
        d = write_hf(root / "path" / "to" / name, spec, weights)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}, indent=1))
        for f in tok.iterdir():
            shutil.copy(f, d / f.name)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "path" / "to" / "base-model")
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    )
    peft.get_peft_model(model, lora).save_pretrained(root / "path" / "to" / "lora-adapter")
    if real_converter() is None:
        (root / "llama.cpp").symlink_to(Path(CONVERTER).parent)
        convert = [sys.executable, "llama.cpp/convert_hf_to_gguf.py", "path/to/fine-tune", "--outtype", "f16"]
        subprocess.run([*convert, "--outfile", "fine-tune.gguf"], cwd=root, check=True, capture_output=True)
    else:
        aligned = Delta(delta).applied_to(w)
        write_gguf(root / "fine-tune.gguf", spec, to_gguf_tensors(spec, aligned), dtype=np.float16)
        write_gguf(root / ".base.gguf", spec, to_gguf_tensors(spec, w), dtype=np.float16)
    return root


# --- running a block ------------------------------------------------------------------------------------


def env_for(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVGGUF_") or k == "AVGGUF_HF_CONVERTER"}
    env.update(HOME=str(home), BROWSER=str(home / "browser"), PYTHONUNBUFFERED="1", NO_COLOR="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def pip_checked(script: str) -> tuple[str, list[str]]:
    """The script without its `pip install` steps, and what was checked of them: the extras exist in
    pyproject.toml, and a pinned torch lies in the extras' range."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    torch_range = next(Requirement(r).specifier for r in extras["convert"] if r.startswith("torch"))
    checked, kept = [], []
    for line in script.replace("\\\n", " ").splitlines():
        if "pip install" not in line:
            kept.append(line)
            continue
        steps = []
        for step in line.split(" && "):
            words = shlex.split(step)
            while words and re.fullmatch(r"\w+=.*", words[0]):
                words = words[1:]
            if words[:2] != ["pip", "install"]:
                steps.append(step)
                continue
            for word in words[2:]:
                if word == ".":
                    checked.append("this project (pyproject.toml)")
                for extra in re.findall(r"\.\[([\w,-]+)\]", word):
                    for name in extra.split(","):
                        assert name in extras, f"{step!r}: pyproject.toml has no extra {name!r}"
                        checked.append(f"extra {name}")
                pin = re.fullmatch(r"torch==(\S+)", word)
                if pin:
                    assert Version(pin.group(1)) in torch_range, f"{step!r}: torch {pin.group(1)} outside {torch_range}"
                    checked.append(f"torch {pin.group(1)} in {torch_range}")
        if steps:
            kept.append(" && ".join(steps))
    return "\n".join(kept) + "\n", checked


def command_of(block: Block, cwd: Path) -> list[str]:
    if block.lang == "python":
        script = cwd / f".docs-{block.name}.py"
        script.write_text(block.text)
        return [sys.executable, str(script)]
    return ["bash", "-e", "-o", "pipefail", "-c", block.text]


def check_output(block: Block, r: subprocess.CompletedProcess) -> None:
    out = r.stdout
    assert r.returncode == int(block.opts.get("status", 0)), f"{block.id}: exit status {r.returncode}\n{out[-4000:]}"
    if "expect" in block.opts:
        assert block.opts["expect"] in out, f"{block.id}: {block.opts['expect']!r} not in the output:\n{out[-4000:]}"


def run_block(block: Block, cwd: Path, home: Path, script: str | None = None) -> subprocess.CompletedProcess:
    cmd = command_of(block, cwd) if script is None else ["bash", "-e", "-o", "pipefail", "-c", script]
    t0 = time.perf_counter()
    r = subprocess.run(
        cmd,
        cwd=cwd,
        env=env_for(home),
        input=block.opts.get("stdin", ""),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=int(block.opts.get("timeout", TIMEOUT)),
    )
    r.seconds = time.perf_counter() - t0
    if os.environ.get("AVGGUF_DOCS_SHOW"):  # AVGGUF_DOCS_SHOW=1 pytest -s tests/test_docs.py: each block's output
        print(f"\n=== {block.id} ({r.seconds:.1f} s, exit {r.returncode})\n{r.stdout}")
    return r


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def directory(block: Block, request) -> Path:
    where = block.opts.get("cwd", "repo")
    return ROOT if where == "repo" else request.getfixturevalue(where)


def run_server(block: Block, request, home: Path) -> None:
    """Start the block, wait for its text (or its browser), run its `while` blocks, then Ctrl-C it."""
    cwd = directory(block, request)
    if "avgguf serve" in block.text:
        deadline = time.monotonic() + 60
        while not port_free(SERVER_PORT) and time.monotonic() < deadline:
            time.sleep(1)  # a server of an earlier block still closing
        assert port_free(SERVER_PORT), f"{block.id}: port {SERVER_PORT} is taken by another process"
    log = home / f"{block.name}.log"
    until = "browser opened: " if "browser" in block.opts else block.opts["until"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command_of(block, cwd), cwd=cwd, env=env_for(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + int(block.opts.get("timeout", TIMEOUT))
        while until not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert until in text, f"{block.id}: {until!r} did not appear (exit status {proc.poll()}):\n{text[-4000:]}"
        if "browser" in block.opts:
            url = re.search(r"browser opened: (\S+)", text).group(1)
            assert "#code=" in url, f"{block.id}: the page opened without its one-time code: {url}"
            with urllib.request.urlopen(url.split("#")[0], timeout=30) as page:
                assert page.status == 200 and b"<html" in page.read().lower(), f"{block.id}: {url} is not the chat page"
        for other in RUNNABLE:
            if other.opts.get("while") == block.name:
                RESULTS[other.name] = run_block(other, directory(other, request), home)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
    assert status == 0, f"{block.id}: exit status {status} after Ctrl-C:\n{log.read_text()[-4000:]}"


DONE: set[str] = set()  # blocks run (or checked) in this session


def execute(block: Block, request, home: Path) -> None:
    """Run one block as its marker says (a skip for the converter line where llama.cpp's script is absent)."""
    cwd = directory(block, request)
    DONE.add(block.name)
    if "file" in block.opts:
        target = cwd / block.opts["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text)
        return
    if "ci" in block.opts:
        ci = (ROOT / ".ci" / "run").read_text()
        assert block.text.strip() in ci.splitlines(), f"{block.id}: .ci/run does not run {block.text.strip()!r}"
        pip_checked(block.text)
        return
    if "converter" in block.opts:
        why = real_converter()
        if why is not None:
            shutil.copy(cwd / ".base.gguf", cwd / "base.gguf")
            pytest.skip(f"{why}: base.gguf is the tiny model's GGUF written by avgguf.testing.synthetic instead")
    script = None
    if "pip install" in block.text:
        script, checked = pip_checked(block.text)
        assert checked, f"{block.id}: a pip step names no extra or pinned torch to check"
        if not script.strip():
            return
    if "until" in block.opts or "browser" in block.opts:
        run_server(block, request, home)
        return
    r = run_block(block, cwd, home, script)
    RESULTS[block.name] = r
    check_output(block, r)


def catch_up(block: Block, request, home: Path) -> None:
    """Run the blocks before this one in its working directory that have not run (a `-k` selection): later
    blocks use the files earlier ones made."""
    where = block.opts.get("cwd", "repo")
    if where == "repo":
        return
    for earlier in RUNNABLE[: RUNNABLE.index(block)]:
        servers = "until" in earlier.opts or "browser" in earlier.opts or "while" in earlier.opts
        if earlier.opts.get("cwd", "repo") == where and earlier.name not in DONE and not servers:
            try:
                execute(earlier, request, home)
            except pytest.skip.Exception:
                pass


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block(block: Block, request, home):
    if "while" in block.opts:
        r = RESULTS.get(block.name)
        assert r is not None, f"{block.id}: its server block {block.opts['while']!r} did not run (select it too)"
        check_output(block, r)
        return
    catch_up(block, request, home)
    execute(block, request, home)


def console_lines(block: Block) -> tuple[list[str], list[str]]:
    """A console block's `$ ` commands and its other lines (typed chat input dropped with `prompt`)."""
    commands, lines = [], []
    prompt = block.opts.get("prompt")
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append(line[2:].strip())
        elif prompt and line.startswith(prompt):
            continue
        else:
            lines.append(line.rstrip())
    return commands, lines


OUTPUTS = [b for b in ALL if b.kind == "output"]


@pytest.mark.parametrize("block", OUTPUTS, ids=[f"{b.page}:{b.line}:{b.name}" for b in OUTPUTS])
def test_console_output_is_real(block: Block):
    """A ```console block quotes a real run: its command is one of block NAME's, its lines appear in order."""
    source = BY_NAME[block.name]
    commands, want = console_lines(block)
    steps = [s.strip() for line in source.text.splitlines() for s in line.split(" && ")]
    for c in commands:
        assert c in steps, f"{block.page}:{block.line}: `$ {c}` is not a command of block {block.name!r}"
    r = RESULTS.get(block.name)
    if r is None:
        pytest.skip(f"block {block.name!r} did not run")
    got = [line.rstrip() for line in r.stdout.splitlines()]
    if block.opts.get("prompt"):
        p = block.opts["prompt"]
        got = [re.sub(f"^(?:{re.escape(p.strip())} ?)+", "", line) for line in got]
    if "lines" in block.opts:
        keep = re.compile(block.opts["lines"])
        want, got = [x for x in want if keep.search(x)], [x for x in got if keep.search(x)]
    want = [x for x in want if x.strip()]
    at = 0
    for line in want:
        try:
            at = got.index(line, at) + 1
        except ValueError:
            tail = "\n".join(got[-40:])
            pytest.fail(f"{block.page}:{block.line}: {line!r} is not in block {block.name!r}'s output (in order):\n{tail}")


def test_http_client_available():
    """The server blocks use curl, as the docs do."""
    assert shutil.which("curl"), "curl is needed for the docs' server examples"
    assert http.client  # (the stdlib client fetches the desktop page)
