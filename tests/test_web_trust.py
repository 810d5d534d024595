"""Issue #20 in a real browser (headless Chromium): `avgguf desktop` hands its page a one-time code that the
page trades for the per-run key, without typing, and that leaves the address bar; a page of another origin
cannot change the server's scales or
write a profile (the CSRF the audit reproduced), even with --allow-write."""

from __future__ import annotations

import http.server
import stat
import threading

import httpx
import pytest

from avgguf.testing.server import start_server
from test_web import CHROMIUM, DRIVER, start, wait

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no browser here: apt-get install chromium chromium-driver (see .ci/run)"
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def desktop(tiny_kit, tmp_path_factory):
    """`avgguf desktop --allow-write` on its default path; the stand-in BROWSER records the URL it opens."""
    root, *_ = tiny_kit
    tmp = tmp_path_factory.mktemp("desk")
    seen = tmp / "url.txt"
    browser = tmp / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {seen}\n')
    browser.chmod(browser.stat().st_mode | stat.S_IEXEC)
    srv = start_server(["desktop", str(root / "tiny.yaml"), "--allow-write"], tmp / "desktop.log", env={"BROWSER": str(browser)})
    try:
        wait(lambda: seen.exists() and seen.read_text().strip(), 60, "the desktop to open the browser")
        yield seen.read_text().strip(), root / "tiny.yaml"
    finally:
        srv.stop()


def test_the_page_trades_its_one_time_code_for_the_key(browser, desktop):
    url, _ = desktop
    browser.get(url)
    wait(lambda: browser.find_elements("css selector", "input[type=range][data-av]"), what="sliders")
    assert "#code=" not in browser.current_url, "the code stayed in the address bar"
    assert not browser.find_element("css selector", "#key-form").is_displayed()  # no key box: desktop handed it
    stored = browser.execute_script("return [sessionStorage.getItem('avgguf-key'), localStorage.getItem('avgguf-key')]")
    assert stored[0] and len(stored[0]) >= 24 and stored[1] is None
    base = url.split("#")[0].rstrip("/")
    assert httpx.get(base + "/avgguf/models", headers={"Authorization": f"Bearer {stored[0]}"}).status_code == 200
    assert httpx.post(base + "/avgguf/session", json={"code": url.split("#code=")[1]}).status_code == 403


@pytest.fixture()
def open_server(tiny_kit, tmp_path):
    """`avgguf serve --allow-write` without a key: the audit's scenario (only the Origin/type rules guard it)."""
    root, *_ = tiny_kit
    modelfile = tmp_path / "open.yaml"
    modelfile.write_text(
        (root / "tiny.yaml")
        .read_text()
        .replace("med/base.gguf", str(root / "med/base.gguf"))
        .replace("medical.gguf", str(root / "medical.gguf"))
        .replace("legal.gguf", str(root / "legal.gguf"))
    )
    proc, url = start(modelfile, "--allow-write")
    yield url, modelfile
    proc.terminate()
    proc.wait(timeout=30)


def test_a_foreign_page_cannot_drive_the_server(browser, open_server, tmp_path):
    """The audit's attack page, served from another origin, POSTs text/plain (no preflight) and JSON (a
    preflight this server never grants) to /lora-adapters and /avgguf/profiles."""
    base, modelfile = open_server
    before = modelfile.read_text()
    scales = httpx.get(base + "/lora-adapters").json()
    (tmp_path / "index.html").write_text(f"""<!doctype html><script>
    const t = "{base}";
    Promise.allSettled([
      fetch(t + "/lora-adapters", {{method: "POST", mode: "no-cors", body: '[{{"id":0,"scale":-2}}]'}}),
      fetch(t + "/avgguf/profiles", {{method: "POST", mode: "no-cors",
        body: JSON.stringify({{model: "tiny", name: "pwned", coefficients: {{medical: -2}}}})}}),
      fetch(t + "/lora-adapters", {{method: "POST", headers: {{"Content-Type": "application/json"}},
        body: '[{{"id":0,"scale":-2}}]'}}),
    ]).then(r => document.title = "done " + r.map(x => x.status).join(","));
    </script>""")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://localhost:{evil.server_address[1]}/index.html")
        wait(lambda: browser.title.startswith("done"), what="the attack page's requests")
    finally:
        evil.shutdown()
    assert httpx.get(base + "/lora-adapters").json() == scales
    assert modelfile.read_text() == before


def test_saving_over_an_existing_profile_asks_first(browser, open_server):
    """Audit 26: the page replaced a profile of the same name without asking. Now it asks; dismissed, the
    modelfile is untouched; accepted, the profile is replaced and the page says so."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    base, modelfile = open_server
    before = modelfile.read_text()
    browser.get(base + "/")
    wait(lambda: browser.find_elements("css selector", "input[type=range][data-av]"), what="sliders")
    browser.execute_script(
        "const r = document.querySelector(`input[type=range][data-av='medical']`);"
        "r.value = -1.5; r.dispatchEvent(new Event('input'));"
    )
    box = browser.find_element("css selector", "#profile-name")
    box.clear()
    box.send_keys("mixed")  # a profile of the modelfile
    for accept in (False, True):
        browser.find_element("css selector", "#save-profile").click()
        alert = WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
        assert "Replace the profile mixed" in alert.text
        alert.accept() if accept else alert.dismiss()
        words = "replaced profile mixed" if accept else "kept as it was"
        wait(lambda: words in browser.find_element("css selector", "#status").text, what=words)
        if not accept:
            assert modelfile.read_text() == before
    assert "medical: -1.5" in modelfile.read_text()


def test_a_key_set_by_hand_gets_a_small_prompt(browser, tiny_kit, tmp_path):
    """`avgguf serve --api-key-file`: the page has no key until the user types it; a wrong one asks again."""
    root, *_ = tiny_kit
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key-for-the-page\n")
    srv = start_server(["serve", str(root / "tiny.yaml"), "--api-key-file", str(key_file)], tmp_path / "key.log")
    try:
        browser.get(srv.url + "/")
        browser.execute_script("sessionStorage.clear()")
        browser.get(srv.url + "/")
        form = browser.find_element("css selector", "#key-form")
        wait(form.is_displayed, what="the key prompt")
        assert "API key" in browser.find_element("css selector", "#status").text
        assert not browser.find_elements("css selector", "input[type=range][data-av]")
        for key, works in (("wrong", False), ("s3cret-key-for-the-page", True)):
            box = browser.find_element("css selector", "#api-key")
            box.clear()
            box.send_keys(key + "\n")
            if works:
                wait(lambda: browser.find_elements("css selector", "input[type=range][data-av]"), what="sliders")
                assert not form.is_displayed()
            else:
                wait(lambda: "API key" in browser.find_element("css selector", "#status").text, what="asked again")
                assert form.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('avgguf-key')") == "s3cret-key-for-the-page"
    finally:
        srv.stop()


def test_the_profile_editor_renames_sets_default_and_deletes(browser, open_server):
    """The page's profile editor (with --allow-write): each change lands in the modelfile (comments and the
    other profiles kept) and in the page's lists."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from avgguf.config.modelfile import load_modelfile

    base, modelfile = open_server
    modelfile.write_text("# keep me\n" + modelfile.read_text())
    browser.get(base + "/")
    wait(lambda: browser.find_elements("css selector", "input[type=range][data-av]"), what="sliders")
    assert browser.find_element("css selector", "#profile-editor").is_displayed()
    status = lambda: browser.find_element("css selector", "#status").text  # noqa: E731
    models = lambda: browser.execute_script("return [...document.querySelectorAll('select#model option')].map(o => o.value)")  # noqa: E731
    Select(browser.find_element("css selector", "#profile-pick")).select_by_value("mixed")
    browser.find_element("css selector", "#profile-rename").click()
    prompt = WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
    prompt.send_keys("blend")
    prompt.accept()
    wait(lambda: status() == "renamed mixed to blend", what="renamed")
    assert "open:blend" in models() and "open:mixed" not in models()
    browser.find_element("css selector", "#profile-default").click()
    wait(lambda: status() == "blend is the default profile", what="default set")
    assert browser.execute_script("return document.querySelector('#profile-pick option[value=blend]').text") == "blend (default)"
    mf = load_modelfile(modelfile)
    assert mf.spec.default_profile == "blend" and mf.spec.profiles["blend"] == {"medical": 0.5, "legal": -1.0}
    Select(browser.find_element("css selector", "#profile-pick")).select_by_value("expert-medical")
    browser.find_element("css selector", "#profile-delete").click()
    WebDriverWait(browser, 10).until(expected_conditions.alert_is_present()).accept()
    wait(lambda: status() == "deleted profile expert-medical", what="deleted")
    assert "open:expert-medical" not in models()
    mf = load_modelfile(modelfile)
    assert list(mf.spec.profiles) == ["blend"] and mf.spec.default_profile == "blend"
    assert modelfile.read_text().startswith("# keep me\n")
    r = httpx.post(base + "/avgguf/profiles/edit", json={"model": "open", "action": "delete", "name": "nope"})
    assert r.status_code == 400 and "not in the modelfile" in r.json()["error"]["message"]
