"""The terminal chat: line editing and history (readline), Ctrl-C stops the answer and keeps the chat,
multi-line input, and commands that turn the knobs live."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from avgguf.config.coefficients import describe, parse_assignments
from avgguf.errors import AvggufError
from avgguf.config.modelfile import Modelfile
from avgguf.runtime.pad import check_mode
from avgguf.runtime.session import GenerationRequest, Runtime

HELP = """commands:
  /set NAME=VALUE [NAME=VALUE ...]   change coefficients (e.g. /set medical=0.8 legal=-0.5)
  /profile NAME                      switch to a profile (/profile alone: the default)
  /show                              profile, coefficients, system prompt, turns
  /system TEXT                       set the system prompt (/system alone: back to the modelfile's)
  /decode weights|pad|pad-full       AVs in the weights, or decoding-time alignment (PAD) with the same knobs
  /reset                             clear the conversation (coefficients stay)
  /help                              this list
  /quit                              leave (or Ctrl-D)
input: end a line with \\ to continue it; a line of \"\"\" starts and ends a multi-line message.
Ctrl-C stops the current answer and keeps the chat."""
HISTORY_NAME = ".avgguf_chat_history"
HISTORY_LENGTH = 1000  # lines kept in the history file


def history_file() -> Path | None:
    """~/.avgguf_chat_history, looked up when a chat starts (not at import: commands work without a home
    directory); None where there is no home directory, and then no history is kept."""
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError):
        return None
    return home / HISTORY_NAME if str(home) not in ("", "~") else None


@contextmanager
def stop_on_ctrl_c():
    """Within the block, Ctrl-C sets the yielded event instead of raising inside llama.cpp's generator."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class ChatState:
    modelfile: Modelfile
    profile: str | None
    coefficients: dict[str, float]
    system: str | None = None  # None: the modelfile's system prompt
    history: list[dict] = field(default_factory=list)
    decode: str = "weights"

    @property
    def profile_label(self) -> str:
        name = self.profile or self.modelfile.spec.default_profile
        if name is None:
            return "(none)"
        return name if self.coefficients == self.modelfile.coefficients(name) else f"{name} (modified)"

    def show(self) -> str:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        system = next(
            (m["content"] for m in self.modelfile.system_messages(head) if m["role"] == "system"), "(none)"
        )  # as the model sees it (the modelfile's system_policy applied)
        return (
            f"profile: {self.profile_label}\ncoefficients: {describe(self.coefficients)}\n"
            f"decode: {self.decode}\nsystem: {system}\nturns: {len(self.history) // 2}"
        )


def command(line: str, state: ChatState) -> bool:
    """Run a /command; True means leave the chat."""
    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    mf = state.modelfile
    if cmd in ("/quit", "/exit", "/q", "/bye"):
        return True
    if cmd == "/set":
        if not rest:
            raise AvggufError("usage: /set NAME=VALUE [NAME=VALUE ...]")
        new = {**state.coefficients, **parse_assignments([rest], source="")}
        state.coefficients = mf.resolver.resolve(None, overrides=new, source="/set")
        print(f"[{describe(state.coefficients)}]")
    elif cmd == "/profile":
        state.coefficients = mf.coefficients(rest or None)
        state.profile = rest or None
        print(f"[{state.profile_label}: {describe(state.coefficients)}]")
    elif cmd == "/decode":
        state.decode = check_mode(rest or "weights", "/decode")
        print(f"[decode: {state.decode}]")
    elif cmd == "/show":
        print(state.show())
    elif cmd == "/system":
        state.system = rest or None
        print(f"[system: {rest or 'the modelfile default'}]")
    elif cmd == "/reset":
        state.history = []
        print("[conversation cleared]")
    elif cmd in ("/help", "/?"):
        print(HELP)
    else:
        raise AvggufError(f"unknown command {cmd!r}; /help lists them")
    return False


class LineReader:
    """input() with readline where the terminal has one; plain lines from a pipe otherwise."""

    def __init__(self, stdin: TextIO):
        self.stdin = stdin
        self.interactive = stdin.isatty() and stdin is sys.stdin
        self.readline = None
        self.history = None
        if self.interactive:
            try:
                import readline
            except ImportError:
                return
            self.readline = readline
            readline.set_history_length(HISTORY_LENGTH)
            self.history = history_file()
            if self.history is not None:
                try:
                    readline.read_history_file(self.history)
                except OSError:
                    pass

    def line(self, prompt: str) -> str | None:
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        print(prompt, end="", flush=True)
        text = self.stdin.readline()
        return text.rstrip("\n") if text else None

    def message(self) -> str | None:
        """One message: continuation lines after a trailing backslash, or a \"\"\"-fenced block."""
        first = self.line("> ")
        if first is None or first.strip() != '"""' and not first.endswith("\\"):
            return first
        parts = [] if first.strip() == '"""' else [first[:-1]]
        fenced = first.strip() == '"""'
        while True:
            more = self.line("... ")
            if more is None:
                break
            if fenced and more.strip().endswith('"""'):
                parts.append(more.rstrip()[:-3])
                break
            if not fenced and not more.endswith("\\"):
                parts.append(more)
                break
            parts.append(more if fenced else more[:-1])
        return "\n".join(parts)

    def close(self) -> None:
        if self.readline is not None and self.history is not None:
            try:
                self.readline.write_history_file(self.history)  # truncated to HISTORY_LENGTH lines
            except OSError:
                pass


def fit_history(rt: Runtime, messages: list[dict], max_tokens: int | None) -> list[dict]:
    """Drop the oldest turns until the prompt leaves room for the answer."""
    budget = rt.n_ctx - (max_tokens or rt.modelfile.spec.defaults.max_tokens)
    msgs = list(messages)
    head = [m for m in msgs[:1] if m["role"] == "system"]
    body = msgs[len(head) :]
    while len(body) > 1 and sum(rt.count_tokens(m["content"]) + 8 for m in rt.with_system(head + body)) > budget:
        body = body[2:] if len(body) > 2 else body[1:]
    return head + body


def answer(
    rt: Runtime, state: ChatState, make_request: Callable[[list[dict]], GenerationRequest], stats: bool, out: TextIO = sys.stdout
) -> None:
    """Stream one answer; Ctrl-C ends it early, and what was said so far stays in the history."""
    head = [{"role": "system", "content": state.system}] if state.system is not None else []
    req = make_request(fit_history(rt, head + state.history, None))
    pieces: list[str] = []
    with stop_on_ctrl_c() as stop:
        for piece in rt.stream_chat_text(req, state.coefficients, decode=state.decode):
            pieces.append(piece)
            out.write(piece)
            out.flush()
            if stop.is_set():
                break
    out.write("\n[stopped]\n" if stop.is_set() else "\n")
    state.history.append({"role": "assistant", "content": "".join(pieces)})
    if stats:
        print(rt.stats(decode=state.decode), file=sys.stderr)


def chat_loop(rt: Runtime, state: ChatState, make_request, stats: bool, stdin: TextIO) -> None:
    reader = LineReader(stdin)
    try:
        while True:
            try:
                line = reader.message()
            except KeyboardInterrupt:  # at the prompt: clear the line, stay
                print("^C  (/quit or Ctrl-D to leave)")
                continue
            if line is None:
                print()
                break
            if not line.strip():
                continue
            if line.startswith("/"):
                try:
                    if command(line.strip(), state):
                        break
                except AvggufError as exc:
                    print(f"error: {exc}")
                continue
            state.history.append({"role": "user", "content": line})
            try:
                answer(rt, state, make_request, stats)
            except AvggufError as exc:
                state.history.pop()
                print(f"error: {exc}")
    finally:
        reader.close()
