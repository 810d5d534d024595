"""The per-surface half of bench/robustness.py: the test suite's bad-input and fault tables, run by pytest
(each case asserts one clear error: what, where, expected vs found, the fix; never a traceback, a 500 or a
signal), tallied per surface from pytest's JUnit report."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# surface -> (test file, -k expression or None): the tables and faults that belong to it
HTTP_BAD = "bad_request or chunked or declared or half_sent or hostile_grammars"
HONEST = "constrained or logit_bias or allows_no or weight_zero or run_with_pad or forge or metadata"
SURFACES = {
    "HTTP API (bad requests, bodies, headers, grammars)": ("tests/test_server_trust.py", HTTP_BAD),
    "API honesty (constraints, PAD at weight 0, no forged turns)": ("tests/test_server_trust.py", HONEST),
    "HTTP faults (leaving clients, SIGTERM, desktop, keys)": (
        "tests/test_server_trust.py",
        f"not ({HTTP_BAD}) and not ({HONEST})",
    ),
    "browser (CSRF page, key handoff)": ("tests/test_web_trust.py", None),
    "modelfile YAML": ("tests/test_modelfile_errors.py", None),
    "profile saves": ("tests/test_profile_save.py", None),
    "adapter GGUF": ("tests/test_adapter_validation.py", None),
    "CLI arguments": ("tests/test_cli_errors.py", None),
    "outputs (bake/convert writes, kill -9)": ("tests/test_output_safety.py", None),
    "scheduler (stops, cancels, scratch, fallbacks)": ("tests/test_scheduler_guards.py", None),
}


def run_surface(path: str, expr: str | None) -> tuple[int, int, int, list[str]]:
    """(tried, clear, skipped, names of the cases that were not answered clearly)."""
    if not (ROOT / path).exists():
        return 0, 0, 0, [f"{path} missing"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, f"--junitxml={report}"]
        subprocess.run(cmd + (["-k", expr] if expr else []), cwd=ROOT, capture_output=True, text=True)
        cases = ET.parse(report).getroot().iter("testcase")
        tried = clear = skipped = 0
        bad = []
        for case in cases:
            tried += 1
            if case.find("skipped") is not None:
                skipped += 1
            elif case.find("failure") is None and case.find("error") is None:
                clear += 1
            else:
                bad.append(case.get("name"))
    return tried, clear, skipped, bad


def case_table() -> None:
    print(f"| {'surface':<60} | tried | clear error / handled | skipped | not handled |")
    print(f"|{'-' * 62}|------:|----------------------:|--------:|-------------|")
    for surface, (path, expr) in SURFACES.items():
        tried, clear, skipped, bad = run_surface(path, expr)
        print(f"| {surface:<60} | {tried:5d} | {clear:21d} | {skipped:7d} | {', '.join(bad) or '-'} |", flush=True)
