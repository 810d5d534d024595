"""Issue #13, API fidelity: streamed usage in tokens, sampling fields honoured or refused with a 400, OpenAI
errors on every route, /v1/models/{id}, one access-log line per request."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from avgguf.config.modelfile import load_modelfile
from avgguf.runtime.session import Runtime
from avgguf.server.app import Registry, create_app


@pytest.fixture(scope="module")
def client(tiny_kit):
    root, *_ = tiny_kit
    mf = load_modelfile(root / "tiny.yaml")
    rt = Runtime(mf, fuse="sync")
    yield TestClient(create_app(Registry({"tiny": (mf, rt)})), base_url="http://127.0.0.1")
    rt.close()


BODY = {"model": "tiny:mixed", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}


def stream(client, body) -> list[dict]:
    with client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_streamed_usage_counts_tokens(client):
    whole = client.post("/v1/chat/completions", json=BODY).json()
    events = stream(client, BODY)
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"] > 0
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]


def test_sampling_fields_are_honoured_or_refused(client):
    greedy = client.post("/v1/chat/completions", json=BODY).json()["choices"][0]["message"]["content"]
    sampled = {**BODY, "temperature": 1.5, "seed": 3, "top_k": 1}  # top_k 1 is greedy whatever the temperature
    assert client.post("/v1/chat/completions", json=sampled).json()["choices"][0]["message"]["content"] == greedy

    def answer(body: dict) -> str:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.json()
        return r.json()["choices"][0]["message"]["content"]

    # the defaults spelled out (the modelfile's repeat_penalty 1.1, no presence/frequency penalty) change nothing
    assert answer({**BODY, "repeat_penalty": 1.1, "presence_penalty": 0.0, "frequency_penalty": 0.0}) == greedy
    for field in ({"repeat_penalty": 1.3}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}):
        assert answer({**BODY, **field}) != greedy, field  # each penalty moves the greedy answer
    draw = {**BODY, "temperature": 1.5, "seed": 3}
    assert answer({**draw, "min_p": 0.3}) != answer(draw)  # min_p prunes the tokens a draw may take
    for field, value in (("top_logprobs", 3), ("n_probs", 5), ("n", 2)):
        r = client.post("/v1/chat/completions", json={**BODY, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.json()
    r = client.post("/v1/chat/completions", json={**BODY, "logprobs": 1})  # chat takes a bool, not a count
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ""})
    adds_bos = bool(client.app.state.registry.models["tiny"].runtime.engine.prompt_tokens(""))
    if adds_bos:  # a model adding BOS answers the empty prompt; one without says it is empty
        assert r.status_code == 200, r.json()
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/chat/completions", json={**BODY, "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and "between 0 and 20" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={**BODY, "logprobs": True, "avgguf": {"decode": "pad"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = client.post("/v1/chat/completions", json={**BODY, "top_k": -1})
    assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]


def test_logprobs_are_the_models_own(client, tiny_kit):
    """logprobs in OpenAI's shape, equal to log-softmax of the logits llama.cpp computes for the same prompt and
    coefficients in a separate engine (greedy without penalties: the sampled token is the most likely one)."""
    root, *_ = tiny_kit
    body = {**BODY, "repeat_penalty": 1.0, "logprobs": True, "top_logprobs": 3, "max_tokens": 5}
    r = client.post("/v1/chat/completions", json=body).json()
    entries = r["choices"][0]["logprobs"]["content"]
    assert len(entries) == r["usage"]["completion_tokens"] == 5
    mf = load_modelfile(root / "tiny.yaml")
    from avgguf.runtime.engine import Engine

    eng = Engine(mf.base_path, n_ctx=256, fuse="sync")
    for name, path in mf.av_paths.items():
        eng.load_adapter(name, path)
    eng.set_coefficients(mf.resolver.resolve("mixed"))
    rt = client.app.state.registry.models["tiny"].runtime
    prompt = eng.tokenize(rt.engine.format_chat(rt.with_system(body["messages"])))
    ids = []
    for e in entries:
        z = eng.next_logits(prompt + ids).astype(np.float64)
        lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        ids.append(int(np.argmax(lp)))
        assert e["token"] == eng.detokenize([ids[-1]]).decode("utf-8", errors="replace")
        assert abs(e["logprob"] - lp[ids[-1]]) < 1e-3
        assert [t["token"] for t in e["top_logprobs"]][0] == e["token"] and len(e["top_logprobs"]) == 3
        assert np.allclose([t["logprob"] for t in e["top_logprobs"]], np.sort(lp)[::-1][:3], atol=1e-3)
    eng.close()
    legacy = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0, "logprobs": 2}
    ).json()["choices"][0]["logprobs"]
    assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == len(legacy["top_logprobs"]) == 3
    assert all(len(t) <= 2 for t in legacy["top_logprobs"])


def test_openai_errors_everywhere_and_model_lookup(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.delete("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert client.get("/v1/models/tiny:mixed").json()["id"] == "tiny:mixed"
    r = client.get("/v1/models/tiny:nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_one_access_log_line_per_request(client, capfd):
    client.post("/v1/chat/completions", json=BODY)
    stream(client, BODY)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("access: ")]
    assert len(lines) == 2, lines
    assert "tiny:mixed coefficients=medical=0.5,legal=-1" in lines[0] and "completion_tokens=" in lines[0]
    assert "ms=" in lines[1] and "stream=True" in lines[1]


def test_parallel_slots_answer_as_solo_and_the_queue_is_bounded(tiny_kit):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from avgguf.server.app import Served
    from avgguf.server.protocol import APIError
    from avgguf.testing.server import start_server

    root, *_ = tiny_kit
    srv = start_server(["serve", str(root / "tiny.yaml"), "--parallel", "2"])
    url = srv.url + "/v1/chat/completions"
    try:

        def ask(i: int) -> str:
            body = {
                "model": ["tiny", "tiny:mixed", "tiny:expert-medical"][i % 3],
                "max_tokens": 12,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"question {i}"}],
            }
            return httpx.post(url, json=body, timeout=120).json()["choices"][0]["message"]["content"]

        solo = [ask(i) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, range(8)))
        assert together == solo  # no answer depends on another request or on which slot served it
    finally:
        srv.stop(timeout=10)

    mf = load_modelfile(root / "tiny.yaml")
    rt = Runtime(mf)

    async def queue():
        served = Served(mf, rt, max_queue=1)
        first = await served.acquire()  # the only slot
        waiting = asyncio.create_task(served.acquire())
        await asyncio.sleep(0.01)  # one request waits: the queue is full
        try:
            await served.acquire()
        except APIError as exc:
            assert exc.status == 503 and "--max-queue 1" in exc.message
        else:
            raise AssertionError("a third request must be refused")
        served.pool.put_nowait(first)
        assert await waiting is rt

    try:
        asyncio.run(queue())
    finally:
        rt.close()
