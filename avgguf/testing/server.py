"""A live server subprocess on 127.0.0.1 for tests and benchmarks: a free port, the process started with
`--port N`, /health polled until it answers 200, and a stop that never leaves the process behind.

    srv = start_server(["serve", "tiny.yaml", "--parallel", "2"], tmp / "serve.log")
    try:
        httpx.post(srv.url + "/v1/chat/completions", json=...)
    finally:
        srv.stop()

Any program that takes `--port` and answers GET /health works (llama-server: `program=()` and its full command
line as `args`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

AVGGUF = (sys.executable, "-m", "avgguf.cli")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


class ServerError(RuntimeError):
    """The server process exited, or did not answer /health in time (the message holds its log's tail)."""


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path | None = None  # its stdout and stderr (None: discarded)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (if it still runs) and wait for the exit status; one still running after `timeout` s is
        killed, and subprocess.TimeoutExpired raised."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far, user + system, all threads (Linux: /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def healthy(url: str) -> bool:
    """Whether GET url/health answers 200 now."""
    try:
        with _DIRECT.open(url + "/health", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0, log: Path | None = None) -> None:
    """Until `url` answers /health; ServerError if `proc` exits first or `timeout` s pass (it is killed then)."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if proc.poll() is not None:
            raise ServerError(f"server exited with status {proc.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ServerError(f"server did not answer {url}/health in {timeout:g} s: {_tail(log)}")
        time.sleep(0.1)


def start_server(
    args: list[str],
    log: Path | None = None,
    *,
    program: tuple[str, ...] = AVGGUF,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> LiveServer:
    """`program + args + --port N` on a free port, its output to `log` (unbuffered), once /health answers."""
    port = free_port()
    out = log.open("w") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [*program, *args, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    finally:
        if log is not None:
            out.close()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout, log)
    return LiveServer(proc, url, log)


def _tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.exists():
        return "(no log kept)"
    return log.read_text(errors="replace")[-chars:]
