"""Issue #13, API fidelity: streamed usage in tokens, sampling fields honoured or refused with a 400, OpenAI
errors on every route, /v1/models/{id}, one access-log line per request."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from avgguf.modelfile import load_modelfile
from avgguf.runtime import Runtime
from avgguf.server import Registry, create_app


@pytest.fixture(scope="module")
def client(tiny_kit):
    root, *_ = tiny_kit
    mf = load_modelfile(root / "tiny.yaml")
    rt = Runtime(mf, fuse="sync")
    yield TestClient(create_app(Registry({"tiny": (mf, rt)})))
    rt.close()


BODY = {"model": "tiny:mixed", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
        "temperature": 0}


def stream(client, body) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as r:
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
    for field in ({"repeat_penalty": 1.3}, {"min_p": 0.1}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}):
        assert client.post("/v1/chat/completions", json={**BODY, **field}).status_code == 200, field
    for field, value in (("logprobs", True), ("top_logprobs", 3), ("n_probs", 5), ("n", 2)):
        r = client.post("/v1/chat/completions", json={**BODY, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.json()
    r = client.post("/v1/chat/completions", json={**BODY, "top_k": -1})
    assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]


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
