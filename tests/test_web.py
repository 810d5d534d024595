"""Issue #12: the desktop chat page, driven in a real headless browser (Debian chromium + chromedriver via
selenium) against a live `avgguf serve` on the embedded SmolLM2 with the three demo AVs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from avgguf.testing.server import start_server

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no browser here: apt-get install chromium chromium-driver (see .ci/run)"
)


def start(modelfile: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`avgguf serve MODELFILE EXTRA...` on a free port (its output beside the modelfile: MODELFILE.log)."""
    srv = start_server(["serve", str(modelfile), *extra], modelfile.with_suffix(".log"))
    return srv.proc, srv.url


@pytest.fixture(scope="module")
def modelfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web") / "desk.yaml"
    avs = {n: str(ROOT / "modelfiles" / "avs" / f"{n}.gguf") for n in ("medical", "legal", "financial")}
    path.write_text(
        "# a modelfile for the browser test; its comments must survive saving a profile\n"
        + yaml.safe_dump(
            {
                "base": "builtin:smollm2-135m-instruct",
                "avs": avs,
                "profiles": {"expert-medical": {"medical": 1.0}},
                "defaults": {"max_tokens": 160, "temperature": 0.0, "seed": 0, "n_ctx": 1024},
            },
            sort_keys=False,
        )
    )
    return path


@pytest.fixture(scope="module")
def server(modelfile):
    proc, url = start(modelfile, "--allow-write")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def wait(predicate, timeout: float = 60.0, what: str = "condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def open_page(browser, url, fresh: bool = True):
    """The page with its sliders; `fresh`: in a new conversation (the page reopens the last one it kept)."""
    browser.get(url)
    wait(lambda: browser.find_elements("css selector", "input[type=range][data-av]"), what="sliders")
    if fresh:
        browser.find_element("css selector", "button#new-chat").click()


def set_slider(browser, name: str, value: float) -> None:
    browser.execute_script(
        "const r = document.querySelector(`input[type=range][data-av='${arguments[0]}']`);"
        "r.value = arguments[1]; r.dispatchEvent(new Event('input'));",
        name,
        value,
    )


def ask(browser, text: str) -> None:
    box = browser.find_element("css selector", "textarea#prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element("css selector", "button#send").click()


def done(browser) -> bool:
    return browser.find_element("css selector", "button#send").is_enabled() and not browser.find_elements(
        "css selector", ".message.assistant.streaming"
    )


def answers(browser):
    return browser.find_elements("css selector", ".message.assistant")


def test_sliders_steer_the_next_answer(browser, server):
    open_page(browser, server)
    names = [e.get_attribute("data-av") for e in browser.find_elements("css selector", "input[type=range][data-av]")]
    assert names == ["medical", "legal", "financial"]
    assert browser.find_element("css selector", "select#model").get_attribute("value") == "desk"
    question = "I have had a headache for three days. What should I do?"
    ask(browser, question)
    wait(lambda: done(browser) and answers(browser), what="first answer")
    first = answers(browser)[-1]
    first_coefs = json.loads(first.get_attribute("data-coefficients"))
    first_text = first.find_element("css selector", ".text").text
    set_slider(browser, "medical", -2)
    set_slider(browser, "legal", 1.5)
    browser.find_element("css selector", "button#reset").click()  # same question, fresh conversation
    ask(browser, question)
    wait(lambda: done(browser) and answers(browser), what="second answer")
    second = answers(browser)[-1]
    assert first_coefs == {"medical": 0, "legal": 0, "financial": 0}
    assert json.loads(second.get_attribute("data-coefficients")) == {"medical": -2, "legal": 1.5, "financial": 0}
    assert first_text and first_text != second.find_element("css selector", ".text").text
    shot = os.environ.get("AVGGUF_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)


def test_streaming_and_stop(browser, server):
    open_page(browser, server)
    ask(browser, "Write a long essay about the history of medicine.")
    streaming = wait(
        lambda: [
            e
            for e in browser.find_elements("css selector", ".message.assistant.streaming")
            if e.find_element("css selector", ".text").text.strip()
        ],
        what="streamed text",
    )
    partial = streaming[0].find_element("css selector", ".text").text
    browser.find_element("css selector", "button#stop").click()
    wait(lambda: done(browser), what="stop")
    last = answers(browser)[-1]
    assert last.get_attribute("data-stopped") == "true"
    assert browser.find_element("css selector", "#status").text == "stopped"
    assert len(last.find_element("css selector", ".text").text) >= len(partial) > 0
    ask(browser, "Thanks. One more sentence?")  # the page and the server go on after a stop
    wait(lambda: done(browser) and len(answers(browser)) == 2, what="answer after stop")


def test_compare_shows_two_answers(browser, server):
    open_page(browser, server)
    set_slider(browser, "medical", 1.5)
    browser.find_element("css selector", "#compare").click()
    ask(browser, "Is it safe to take ibuprofen every day?")
    wait(
        lambda: (
            done(browser)
            and len(browser.find_elements("css selector", ".compare .message.assistant")) == 2
            and all(
                e.find_elements("css selector", ".meta")
                for e in browser.find_elements("css selector", ".compare .message.assistant")
            )
        ),
        what="compare",
    )
    a, b = browser.find_elements("css selector", ".compare .message.assistant")
    assert json.loads(a.get_attribute("data-coefficients"))["medical"] == 1.5
    assert json.loads(b.get_attribute("data-coefficients")) == {"medical": 0, "legal": 0, "financial": 0}


def test_html_in_a_message_stays_text(browser, server):
    open_page(browser, server)
    evil = "<b>bold</b><img src=x onerror=\"document.title='pwned'\">"
    ask(browser, evil)
    wait(lambda: done(browser) and answers(browser), what="answer")
    user = browser.find_elements("css selector", ".message.user")[-1]
    assert user.find_element("css selector", ".text").text == evil
    assert not browser.find_elements("css selector", "#messages b, #messages img")
    assert browser.title != "pwned"


def test_save_as_profile(browser, server, modelfile):
    open_page(browser, server)
    set_slider(browser, "legal", -0.5)
    set_slider(browser, "financial", 0.75)
    browser.find_element("css selector", "#profile-name").send_keys("from-the-page")
    browser.find_element("css selector", "#save-profile").click()
    wait(lambda: browser.find_element("css selector", "#status").text == "saved profile from-the-page", what="saved")
    listed = subprocess.run(
        [sys.executable, "-m", "avgguf.cli", "profiles", str(modelfile)], capture_output=True, text=True, check=False
    )
    assert "from-the-page" in listed.stdout and "legal=-0.5 financial=0.75" in listed.stdout, listed.stdout
    assert modelfile.read_text().startswith("# a modelfile for the browser test")  # comments kept
    options = [o.get_attribute("value") for o in browser.find_elements("css selector", "select#model option")]
    assert "desk:from-the-page" in options


def test_save_is_refused_without_allow_write(modelfile, tmp_path):
    copy = tmp_path / "ro.yaml"
    copy.write_text(modelfile.read_text())
    proc, url = start(copy)
    try:
        r = httpx.post(url + "/avgguf/profiles", json={"model": "ro", "name": "x", "coefficients": {"medical": 1}})
        assert r.status_code == 403 and "--allow-write" in r.json()["error"]["message"]
        r = httpx.post(url + "/avgguf/profiles/edit", json={"model": "ro", "action": "delete", "name": "expert-medical"})
        assert r.status_code == 403 and "--allow-write" in r.json()["error"]["message"]
        assert copy.read_text() == modelfile.read_text()  # untouched
    finally:
        proc.terminate()
        proc.wait(timeout=10)
