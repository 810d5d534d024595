"""Issue #24: the chat page's comforts in a real headless Chromium against a live `avgguf serve` on the
embedded SmolLM2 with the three demo AVs: sanitized markdown with highlighted code, XSS payloads inert,
conversations kept in the browser (reload, rename, delete, export, import), regenerate / edit / copy / stop,
tokens/s and the context gauge, keyboard use, dark mode, an axe-core scan, 400 px width, the sweep view."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from test_web import CHROMIUM, DRIVER, ROOT, answers, ask, done, set_slider, start, wait

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no browser here: apt-get install chromium chromium-driver (see .ci/run)"
)
AXE = Path(__file__).parent / "vendor" / "axe.min.js"  # axe-core, vendored for this test only (MPL-2.0)
DEMO = {"medical": 0, "legal": 0, "financial": 0}


@pytest.fixture(scope="module")
def modelfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.yaml"
    avs = {n: str(ROOT / "modelfiles" / "avs" / f"{n}.gguf") for n in ("medical", "legal", "financial")}
    defaults = {"max_tokens": 64, "temperature": 0.0, "seed": 0, "n_ctx": 1024}
    path.write_text(yaml.safe_dump({"base": "builtin:smollm2-135m-instruct", "avs": avs, "defaults": defaults}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def server(modelfile):
    proc, url = start(
        modelfile, "--parallel", "5", *os.environ.get("AVGGUF_WEB_SERVE", "").split()
    )  # the sweep's 5 answers decode together
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


def css(browser, sel):
    return browser.find_elements("css selector", sel)


def fresh(browser, url):
    """The page with no kept conversations."""
    browser.get(url)
    browser.execute_script("localStorage.clear(); sessionStorage.clear()")
    browser.get(url)
    wait(lambda: css(browser, "input[type=range][data-av]"), what="sliders")


def answer(browser, text, n=1):
    ask(browser, text)
    wait(
        lambda: done(browser) and len(answers(browser)) >= n and answers(browser)[-1].get_attribute("data-decode"), what="answer"
    )
    return answers(browser)[-1]


XSS = [
    "<img src=x onerror=\"document.title='pwned'\">",
    "[click me](javascript:document.title='pwned')",
    "<a href=\"javascript:document.title='pwned'\">raw link</a>",
    "<script>document.title='pwned'</script><iframe srcdoc=\"<script>parent.document.title='pwned'</script>\"></iframe>",
    "<div onmouseover=\"document.title='pwned'\">hover</div> <svg onload=\"document.title='pwned'\"></svg>",
    "![img](x\" onerror=\"document.title='pwned')",
]


DANGER = """const t = document.createElement('template'); t.innerHTML = avgguf.renderMarkdown(arguments[0]);
const els = [...t.content.querySelectorAll('*')];
return els.filter(e => /^(img|script|iframe|svg|object|embed|style)$/i.test(e.tagName)).map(e => e.tagName).concat(
  els.flatMap(e => [...e.attributes].filter(a => /^on/i.test(a.name) || /^\\s*javascript:/i.test(a.value))
                                    .map(a => e.tagName + ' ' + a.name)))"""


def assert_inert(browser):
    for a in css(browser, "#messages a"):
        a.click() if a.is_displayed() else None
    time.sleep(0.3)
    bad = ", ".join(
        "#messages " + sel
        for sel in ("img", "script", "iframe", "svg", "[onerror]", "[onload]", "[onmouseover]", "a[href^=javascript]")
    )
    assert not css(browser, bad)
    assert browser.title == "avgguf chat"
    assert len(browser.window_handles) == 1


def test_markdown_renders_with_highlighted_code(browser, server):
    fresh(browser, server)
    html = browser.execute_script(
        "return avgguf.renderMarkdown(arguments[0])",
        "# Title\n\n**bold** and `x`\n\n- one\n- two\n\n```python\ndef f(x):\n    return x + 1\n```\n\n[docs](https://example.org)",
    )
    assert "<strong>bold</strong>" in html and "<li>one</li>" in html
    assert '<code class="hljs language-python">' in html and '<span class="hljs-keyword">def</span>' in html
    assert 'rel="noopener noreferrer"' in html and 'target="_blank"' in html
    # end to end: the model's answer goes through the same renderer
    last = answer(browser, "Write a Python function that adds two numbers. Put the code in a markdown code block.")
    raw = browser.execute_script("return avgguf.state.conv.turns[1].content")
    assert "```" in raw, raw
    assert last.find_elements("css selector", "pre code.hljs span[class^=hljs-]"), last.get_attribute("innerHTML")


def test_xss_in_model_output_and_user_input_stays_inert(browser, server):
    fresh(browser, server)
    for payload in XSS:  # what the renderer makes of each, parsed: no handler, no javascript: URL, no active tag
        found = browser.execute_script(DANGER, payload)
        assert found == [], (payload, found)
    # model output: a conversation whose answers hold the payloads, rendered by the page as it renders answers
    turns = []
    for payload in XSS:
        turns += [
            {"role": "user", "content": payload},
            {"role": "assistant", "content": "sure: " + payload, "coefficients": DEMO},
        ]
    browser.execute_script("avgguf.importText(arguments[0])", json.dumps({"title": "xss", "turns": turns}))
    wait(lambda: len(answers(browser)) == len(XSS), what="the imported answers")
    assert "onerror" in css(browser, ".message.user .text")[0].text  # the user's text shown as typed
    assert "raw link" in answers(browser)[2].text  # the raw HTML shown as text
    assert_inert(browser)
    browser.refresh()  # the kept conversation renders the same way after a reload
    wait(lambda: len(answers(browser)) == len(XSS), what="the answers after a reload")
    assert_inert(browser)
    browser.find_element("css selector", "#new-chat").click()
    answer(browser, "Repeat exactly: " + XSS[0] + " " + XSS[1])  # user input end to end
    assert_inert(browser)


def test_history_survives_a_reload_and_is_managed(browser, server, tmp_path):
    fresh(browser, server)
    set_slider(browser, "legal", 1)
    first = answer(browser, "Name one planet.")
    coefs, text = first.get_attribute("data-coefficients"), first.find_element("css selector", ".text").text
    entries = css(browser, "#conversations li[data-conversation-id]")
    assert len(entries) == 1 and "Name one planet." in entries[0].text
    cid = entries[0].get_attribute("data-conversation-id")
    browser.refresh()
    wait(lambda: answers(browser), what="the kept answer")
    assert answers(browser)[0].get_attribute("data-coefficients") == coefs
    assert json.loads(coefs) == {**DEMO, "legal": 1}
    assert answers(browser)[0].find_element("css selector", ".text").text == text
    assert css(browser, ".message.user .text")[0].text == "Name one planet."
    assert css(browser, f"#conversations li[data-conversation-id='{cid}'] button[aria-current=true]")
    # rename
    browser.find_element("css selector", "#rename-chat").click()
    prompt = browser.switch_to.alert
    prompt.send_keys("planets")
    prompt.accept()
    wait(lambda: css(browser, f"li[data-conversation-id='{cid}']")[0].text == "planets", what="renamed")
    # export, delete, import
    exported = browser.execute_script("return avgguf.exportJSON()")
    md = browser.execute_script("return avgguf.exportMarkdown()")
    assert md.startswith("# planets") and "## user\n\nName one planet." in md and "legal=1" in md
    assert json.loads(exported)["turns"][1]["content"] == browser.execute_script("return avgguf.state.conv.turns[1].content")
    browser.find_element("css selector", "#delete-chat").click()
    browser.switch_to.alert.accept()
    wait(lambda: not css(browser, "#conversations li") and not answers(browser), what="deleted")
    (tmp_path / "planets.json").write_text(exported)
    browser.find_element("css selector", "#import").send_keys(str(tmp_path / "planets.json"))
    wait(lambda: css(browser, f"li[data-conversation-id='{cid}']") and answers(browser), what="imported")
    assert answers(browser)[0].find_element("css selector", ".text").text == text
    browser.find_element("css selector", "#new-chat").click()  # an empty chat is not listed; the old one still is
    assert not answers(browser) and len(css(browser, "#conversations li")) == 1
    css(browser, "#conversations li button")[0].click()
    wait(lambda: answers(browser), what="reopened")


def test_regenerate_edit_copy_stop_and_usage(browser, server):
    fresh(browser, server)
    first = answer(browser, "What is the capital of France?")
    meta = first.find_element("css selector", ".meta").text
    assert "tokens" in meta and "tok/s" in meta, meta
    gauge = browser.find_element("css selector", "#usage")
    used = int(gauge.get_attribute("data-used"))
    assert gauge.get_attribute("data-n-ctx") == "1024" and 0 < used < 1024 and f"context {used} / 1024" in gauge.text
    # copy: what the page hands to the clipboard is the answer's markdown
    browser.execute_script("navigator.clipboard.writeText = (t) => { window.copied = t; return Promise.resolve(); }")
    first.find_element("css selector", "button[aria-label='copy this answer']").click()
    wait(lambda: browser.find_element("css selector", "#status").text == "copied", what="copied")
    assert browser.execute_script("return window.copied") == browser.execute_script("return avgguf.state.conv.turns[1].content")
    # regenerate under other knobs: still one answer, made with the new coefficients
    set_slider(browser, "medical", -1.5)
    first.find_element("css selector", "button[aria-label='regenerate this answer']").click()
    wait(lambda: done(browser) and answers(browser) and answers(browser)[0].get_attribute("data-decode"), what="regenerated")
    assert len(answers(browser)) == 1 and json.loads(answers(browser)[0].get_attribute("data-coefficients"))["medical"] == -1.5
    # edit the question and send it again: the turns after it go
    css(browser, ".message.user button[aria-label^='edit']")[0].click()
    area = browser.find_element("css selector", ".message.user textarea")
    area.clear()
    area.send_keys("What is the capital of Italy?")
    browser.find_element("css selector", ".message.user button[aria-label='send the edited message']").click()
    wait(lambda: done(browser) and answers(browser) and answers(browser)[0].get_attribute("data-decode"), what="edited answer")
    turns = browser.execute_script("return avgguf.state.conv.turns")
    assert [t["role"] for t in turns] == ["user", "assistant"] and turns[0]["content"] == "What is the capital of Italy?"
    assert css(browser, ".message.user .text")[0].text == "What is the capital of Italy?"
    # stop with Esc
    ask(browser, "Write a long essay about the history of medicine.")
    wait(lambda: [e for e in css(browser, ".message.assistant.streaming") if e.text.strip()], what="streaming")
    browser.find_element("css selector", "textarea#prompt").send_keys("\ue00c")  # Escape
    wait(lambda: done(browser) and len(answers(browser)) == 2, what="stopped")
    assert answers(browser)[-1].get_attribute("data-stopped") == "true"
    # a new chat while an answer streams: the answer stops and stays with its own conversation
    cid = browser.execute_script("return avgguf.state.conv.id")
    ask(browser, "Write another long essay, about the history of law.")
    wait(lambda: [e for e in css(browser, ".message.assistant.streaming") if e.text.strip()], what="streaming")
    browser.find_element("css selector", "#new-chat").click()
    wait(lambda: done(browser), what="stopped by the new chat")
    assert not answers(browser) and browser.execute_script("return avgguf.state.conv.turns.length") == 0
    kept = browser.execute_script("return JSON.parse(localStorage.getItem('avgguf-conversations'))[arguments[0]].turns", cid)
    assert [t["role"] for t in kept] == ["user", "assistant"] * 3 and kept[-1]["stopped"] and kept[-1]["content"]


def test_keyboard_reaches_every_control(browser, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    fresh(browser, server)
    browser.find_element("css selector", "#help-toggle").click()
    slider = browser.find_element("css selector", "input[type=range][data-av=medical]")
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert float(slider.get_attribute("value")) == pytest.approx(0.1)
    assert browser.find_element("css selector", "input[data-av-number=medical]").get_attribute("value") == "0.1"
    slider.send_keys(Keys.PAGE_DOWN)
    assert float(slider.get_attribute("value")) == pytest.approx(-0.3)
    ActionChains(browser).send_keys("/").perform()
    assert browser.switch_to.active_element.get_attribute("id") == "prompt"
    answer(browser, "Hi")
    ActionChains(browser).key_down(Keys.CONTROL).key_down(Keys.SHIFT).send_keys("o").key_up(Keys.SHIFT).key_up(
        Keys.CONTROL
    ).perform()
    wait(lambda: not answers(browser), what="new chat by Ctrl+Shift+O")
    browser.find_element("css selector", "body").click()
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ESCAPE).key_up(Keys.SHIFT).perform()
    assert browser.switch_to.active_element.get_attribute("id") == "prompt"
    answer(browser, "Hello again")  # now there are message buttons too
    controls = browser.execute_script(
        "return [...document.querySelectorAll('button, input, select, textarea')]"
        ".filter(e => !e.disabled && e.offsetParent !== null).map(e => e.outerHTML.slice(0, 80))"
    )
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    reached = set()
    for _ in range(len(controls) + 10):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.add(browser.execute_script("return document.activeElement.outerHTML.slice(0, 80)"))
    assert set(controls) <= reached, set(controls) - reached


def scan(browser):
    browser.execute_script(AXE.read_text())
    result = browser.execute_async_script("const done = arguments[0]; axe.run(document).then(r => done(r.violations))")
    return [
        (v["id"], v["impact"], [n["html"][:80] for n in v["nodes"][:3]]) for v in result if v["impact"] in ("serious", "critical")
    ]


def dark(browser, on: bool):
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark" if on else "light"}]}
    )


def test_dark_light_and_axe_scan(browser, server):
    fresh(browser, server)
    browser.execute_script(
        "avgguf.importText(arguments[0])",
        json.dumps(
            {
                "turns": [
                    {"role": "user", "content": "Show code"},
                    {
                        "role": "assistant",
                        "content": "Here:\n\n```python\nprint('hi')  # x\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |",
                        "coefficients": {"medical": "<b>1</b>", "legal": 0.5},  # imported: only numbers kept
                        "level": "<img src=x onerror=alert(1)>",  # not a level: dropped
                    },
                ]
            }
        ),
    )
    wait(lambda: answers(browser), what="the imported answer")
    assert json.loads(answers(browser)[0].get_attribute("data-coefficients")) == {"legal": 0.5}
    assert answers(browser)[0].get_attribute("data-level") is None
    bg = "return getComputedStyle(document.body).backgroundColor"
    try:
        for on, want in ((False, "rgb(247, 247, 248)"), (True, "rgb(22, 23, 26)")):
            dark(browser, on)
            assert browser.execute_script(bg) == want
            assert scan(browser) == [], f"axe ({'dark' if on else 'light'})"
    finally:
        dark(browser, False)


def test_usable_at_400px(browser, server, tmp_path):
    fresh(browser, server)
    try:
        browser.set_window_size(400, 860)
        wait(lambda: browser.execute_script("return innerWidth") <= 400, what="400 px")
        answer(browser, "Give me a short list of three fruits.")
        browser.execute_script(
            "avgguf.importText(arguments[0])",
            json.dumps(
                {
                    "turns": [
                        {"role": "user", "content": "a_very_long_word_without_spaces_" * 6},
                        {"role": "assistant", "content": "```\n" + "x = 1; " * 40 + "\n```", "coefficients": DEMO},
                    ]
                }
            ),
        )
        wait(lambda: answers(browser), what="the imported answer")
        shot = tmp_path / "chat-400px.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"\n400 px screenshot: {shot}")
        wide = browser.execute_script("return [document.documentElement.scrollWidth, innerWidth]")
        assert wide[0] <= wide[1], f"horizontal overflow at 400 px: {wide}"
        assert browser.find_element("css selector", "textarea#prompt").is_displayed()
        assert scan(browser) == []
    finally:
        browser.set_window_size(1280, 860)


def test_sweep_streams_one_answer_per_value(browser, server):
    fresh(browser, server)
    values = [-2, -1, 0, 1, 2]
    question = "I have had a headache for three days. What should I do?"
    judged = browser.execute_script("return avgguf.state.judge")
    answer(browser, question)  # warm: the judge trained, the prompt path run once
    if judged:
        wait(lambda: answers(browser)[-1].get_attribute("data-level"), 120, "the judge's level")
    browser.find_element("css selector", "#new-chat").click()
    t0 = time.time()
    answer(browser, question)
    one = time.time() - t0
    one_tokens = browser.execute_script("return avgguf.state.conv.turns[1].usage.completion")
    if judged:
        wait(lambda: answers(browser)[-1].get_attribute("data-level"), 120, "the judge's level")
    browser.find_element("css selector", "#new-chat").click()
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("css selector", "#sweep-knob")).select_by_value("medical")
    browser.find_element("css selector", "#sweep").click()
    box = browser.find_element("css selector", "#sweep-values")
    box.clear()
    box.send_keys(", ".join(map(str, values)))
    t0 = time.time()
    ask(browser, question)
    streaming = "return [...document.querySelectorAll('.sweep .message.streaming')].filter(e => e.textContent.trim()).length"
    wait(lambda: browser.execute_script(streaming) >= 3, what="the answers streaming at once")
    wait(lambda: done(browser) and len(css(browser, ".sweep .message.assistant[data-decode]")) == 5, what="the sweep")
    five = time.time() - t0
    got = [json.loads(e.get_attribute("data-coefficients")) for e in css(browser, ".sweep .message.assistant")]
    assert got == [{**DEMO, "medical": v} for v in values]
    texts = [e.find_element("css selector", ".text").text for e in css(browser, ".sweep .message.assistant")]
    assert all(texts) and len(set(texts)) > 1
    tokens = browser.execute_script("return avgguf.state.conv.turns[1].answers.map(a => a.usage.completion)")
    if judged:  # each answer of the sweep gets its level too
        wait(lambda: len(css(browser, ".sweep .message.assistant[data-level]")) == 5, 120, "the sweep's levels")
    print(
        f"\nsweep of {len(values)} values: {five:.2f} s ({tokens} tokens); one answer: {one:.2f} s ({one_tokens} tokens);"
        f" ratio {five / one:.2f}"
    )
    browser.refresh()  # the sweep is kept with the conversation
    wait(lambda: len(css(browser, ".sweep .message.assistant")) == 5, what="the kept sweep")


def test_page_weight_and_no_remote_assets(server):
    """Everything the page loads comes from the package (offline), and weighs <= 300 KB together."""
    import re

    import httpx

    html = httpx.get(server + "/").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/") for a in assets), assets
    sizes = {a: len(httpx.get(server + a).content) for a in assets}
    assert all(sizes.values()), sizes
    total = len(html.encode()) + sum(sizes.values())
    print(f"\npage weight: {total / 1024:.1f} KB ({len(assets)} files)")
    assert total <= 300 * 1024, sizes
    for name in ("app.js", "style.css"):
        assert not re.search(r"https?://", httpx.get(server + "/static/" + name).text), name
    assert httpx.get(server + "/static/vendor/nope.js").status_code == 404
    assert httpx.get(server + "/static/../web.py").status_code == 404


def test_each_finished_answer_gets_the_judges_level(browser, server):
    """data-level on each answer: the level judge's reading (avgguf.eval.answer_judge, as `eval --generate`),
    the same as the judge gives in this process for the same domain, question and answer."""
    pytest.importorskip("sklearn")
    answer_judge = pytest.importorskip("avgguf.eval.answer_judge")
    import httpx

    fresh(browser, server)
    set_slider(browser, "medical", 1.5)
    question = "I have had a headache for three days. What should I do?"
    last = answer(browser, question)
    level = wait(lambda: last.get_attribute("data-level"), 120, "the judge's level")
    assert level in answer_judge.LEVELS
    assert last.find_element("css selector", ".level").text.startswith("level: " + level)
    content = browser.execute_script("return avgguf.state.conv.turns[1].content")
    want = answer_judge.judge_answers([{"domain": "medical", "query": question, "answer": content}])[0]
    assert level == want["level"]
    kept = browser.execute_script("return avgguf.state.conv.turns[1]")
    assert kept["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    browser.refresh()  # the level is kept with the conversation
    wait(lambda: answers(browser) and answers(browser)[0].get_attribute("data-level") == level, what="the kept level")
    bad = httpx.post(server + "/avgguf/judge", json={"rows": [{"domain": "medical", "query": "q"}]})
    assert bad.status_code == 400 and "answer" in bad.text


def test_a_control_vector_is_a_slider_like_any_av(browser, tmp_path):
    """A modelfile mixing a LoRA AV and a control vector: both are sliders (the vector marked "control vector"),
    and the vector's value steers the answer and is recorded in data-coefficients like an AV's."""
    import numpy as np

    from avgguf.gguf.control_vector import write_control_vector

    rng = np.random.default_rng(0)
    tone = write_control_vector(
        tmp_path / "tone.gguf", {il: rng.normal(0, 0.6, 576).astype(np.float32) for il in range(1, 30)}, "llama"
    )
    path = tmp_path / "mixed.yaml"
    avs = {"medical": str(ROOT / "modelfiles" / "avs" / "medical.gguf"), "tone": str(tone)}
    spec = {"base": "builtin:smollm2-135m-instruct", "avs": avs, "defaults": {"max_tokens": 24, "temperature": 0.0}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc, url = start(path)
    try:
        fresh(browser, url)
        kinds = {e.get_attribute("data-av"): e.get_attribute("data-kind") for e in css(browser, "input[type=range][data-av]")}
        assert kinds == {"medical": "LoRA", "tone": "control vector"}
        assert "control vector" in browser.find_element("css selector", "label[for='av-tone']").text
        question = "I have had a headache for three days. What should I do?"
        plain = answer(browser, question)
        set_slider(browser, "tone", 2)
        steered = answer(browser, question, 2)
        assert json.loads(steered.get_attribute("data-coefficients")) == {"medical": 0, "tone": 2}
        assert json.loads(plain.get_attribute("data-coefficients")) == {"medical": 0, "tone": 0}
        assert steered.find_element("css selector", ".text").text != plain.find_element("css selector", ".text").text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
