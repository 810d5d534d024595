"""Regenerate the chat page's screenshots in docs/ (docs/desktop.md shows them): `avgguf serve` on the demo
modelfile (the embedded SmolLM2 and its three AVs, greedy so the pictures repeat), driven in headless
Chromium like tests/test_web_chat.py drives it.

    python docs/make_screenshots.py            # writes docs/desktop-{chat,sweep,dark,400px}.png

Needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver) and selenium."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avgguf.testing.server import start_server  # noqa: E402

DOCS = ROOT / "docs"
QUESTION = "I have had a headache for three days. What should I do?"
CODE_QUESTION = "Write a Python function that adds two numbers. Put the code in a markdown code block."


def modelfile(tmp: Path) -> Path:
    spec = yaml.safe_load((ROOT / "modelfiles" / "demo.yaml").read_text())
    spec["avs"] = {n: {**av, "path": str(ROOT / "modelfiles" / av["path"])} for n, av in spec["avs"].items()}
    spec["defaults"] = {**spec["defaults"], "temperature": 0.0, "max_tokens": 96}
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def driver(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def until(predicate, timeout: float = 180.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError("the page did not get there in time")


def idle(b) -> bool:
    return b.find_element("css selector", "#send").is_enabled() and not b.find_elements("css selector", ".streaming")


def ask(b, text: str) -> None:
    box = b.find_element("css selector", "#prompt")
    box.clear()
    box.send_keys(text)
    b.find_element("css selector", "#send").click()
    time.sleep(0.3)
    until(lambda: idle(b))


def slider(b, name: str, value: float) -> None:
    b.execute_script(
        "const r = document.querySelector(`input[type=range][data-av='${arguments[0]}']`);"
        "r.value = arguments[1]; r.dispatchEvent(new Event('input'));",
        name,
        value,
    )


def fresh(b, url: str) -> None:
    b.get(url)
    b.execute_script("localStorage.clear()")
    b.get(url)
    until(lambda: b.find_elements("css selector", "input[type=range][data-av]"))


def chat_views(url: str) -> None:
    b = driver(1280, 860)
    try:
        fresh(b, url)
        slider(b, "medical", 1)
        ask(b, QUESTION)
        ask(b, CODE_QUESTION)
        if b.execute_script("return avgguf.state.judge"):  # the level judge's reading under each answer
            until(lambda: len(b.find_elements("css selector", ".message.assistant[data-level]")) == 2)
        b.save_screenshot(str(DOCS / "desktop-chat.png"))
        b.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        b.save_screenshot(str(DOCS / "desktop-dark.png"))
        b.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]})
        b.find_element("css selector", "#new-chat").click()
        b.find_element("css selector", "#sweep").click()
        ask(b, QUESTION)
        if b.execute_script("return avgguf.state.judge"):
            until(lambda: len(b.find_elements("css selector", ".sweep .message.assistant[data-level]")) == 5)
        b.execute_script("document.querySelector('.sweep').previousElementSibling.scrollIntoView({block: 'start'})")
        b.save_screenshot(str(DOCS / "desktop-sweep.png"))
    finally:
        b.quit()


def narrow_view(url: str) -> None:
    b = driver(400, 860)
    try:
        fresh(b, url)
        ask(b, "Give me a short list of three fruits.")
        b.save_screenshot(str(DOCS / "desktop-400px.png"))
    finally:
        b.quit()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        mf = modelfile(Path(tmp))
        srv = start_server(["serve", str(mf), "--parallel", "5"], Path(tmp) / "serve.log")
        try:
            chat_views(srv.url + "/")
            narrow_view(srv.url + "/")
        finally:
            srv.stop()
    for name in ("chat", "dark", "sweep", "400px"):
        print(f"wrote docs/desktop-{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
