"""A live `avgguf serve` process on 127.0.0.1, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from avgguf.testing.server import start_server

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_kit, tmp_path_factory):
    root, *_ = tiny_kit
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    srv = start_server(["serve", str(root / "tiny.yaml"), "--api-key", KEY], log)
    yield srv.url
    srv.stop(timeout=10)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, model, content="hello", seed=0, temperature=0.0, max_tokens=8, **extra):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        seed=seed,
        temperature=temperature,
        max_tokens=max_tokens,
        extra_body=extra or None,
    )
    return r.choices[0].message.content


def test_models_list(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"tiny", "tiny:expert-medical", "tiny:mixed"}


def test_profiles_overrides_and_lora_field(client):
    plain = ask(client, "tiny")
    expert = ask(client, "tiny:expert-medical")
    mixed = ask(client, "tiny:mixed")
    assert len({plain, expert, mixed}) == 3, "profiles must steer the output"
    assert ask(client, "tiny", avgguf={"coefficients": {"medical": 0.5, "legal": -1.0}}) == mixed
    assert ask(client, "tiny", lora=[{"id": 0, "scale": 0.5}, {"id": 1, "scale": -1.0}]) == mixed
    # an override on top of a profile, for this request only
    assert ask(client, "tiny:mixed", avgguf={"coefficients": {"medical": 1.0, "legal": 0.0}}) == expert
    assert ask(client, "tiny:mixed") == mixed


def test_usage_and_finish_reason(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    assert r.model == "tiny" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0
    c = client.completions.create(model="tiny:mixed", prompt="the", max_tokens=4, temperature=0)
    # (llama-cpp-python runs past max_tokens to finish a UTF-8 character split over byte tokens, which this
    # tiny vocabulary has plenty of, so only the bookkeeping is checked here)
    assert c.choices[0].text and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_streaming_matches_non_streaming(client):
    full = ask(client, "tiny:mixed", max_tokens=10)
    stream = client.chat.completions.create(
        model="tiny:mixed",
        messages=[{"role": "user", "content": "hello"}],
        seed=0,
        temperature=0,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(parts)
    # llama-cpp-python's stream decoder may drop a multi-byte character split over byte tokens
    assert [c for c in text if c.isascii()] == [c for c in full if c.isascii()]
    assert finish in ("length", "stop")


def test_concurrent_clients_match_solo_answers(client):
    jobs = [
        ("tiny", 1),
        ("tiny:expert-medical", 2),
        ("tiny:mixed", 3),
        ("tiny:expert-medical", 4),
        ("tiny:mixed", 5),
        ("tiny", 6),
        ("tiny:mixed", 1),
        ("tiny:expert-medical", 1),
    ]
    solo = [ask(client, m, seed=s, temperature=0.9) for m, s in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: ask(client, job[0], seed=job[1], temperature=0.9), jobs))
    assert together == solo


# (case, method, path, body or raw bytes, headers, status, words in error.message)
BAD = [
    (
        "unknown model",
        "POST",
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        None,
        404,
        "does not exist",
    ),
    (
        "unknown profile",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny:nope", "messages": [{"role": "user", "content": "x"}]},
        None,
        404,
        "does not exist",
    ),
    (
        "path-like model",
        "POST",
        "/v1/chat/completions",
        {"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]},
        None,
        404,
        "does not exist",
    ),
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', None, 400, "malformed JSON"),
    (
        "wrong type",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
        None,
        400,
        "max_tokens",
    ),
    ("no messages", "POST", "/v1/chat/completions", {"model": "tiny", "messages": []}, None, 400, "messages"),
    (
        "bad role",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
        None,
        400,
        "role",
    ),
    (
        "coefficient out of range",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "avgguf": {"coefficients": {"medical": 9}}},
        None,
        400,
        "outside [-2, 2]",
    ),
    (
        "unknown AV",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "avgguf": {"coefficients": {"tax": 1}}},
        None,
        400,
        "unknown alignment vector 'tax'",
    ),
    (
        "unknown lora id",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "lora": [{"id": 7, "scale": 1}]},
        None,
        400,
        "lora id 7",
    ),
    (
        "max_tokens beyond context",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
        None,
        400,
        "exceeds the context",
    ),
    ("oversized body", "POST", "/v1/chat/completions", b"{" + b" " * (2 << 20) + b"}", None, 413, "over"),
    ("no API key", "GET", "/v1/models", None, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("bad lora-adapters body", "POST", "/lora-adapters", {"id": 0}, None, 400, "JSON list"),
]


@pytest.mark.parametrize("case,method,path,body,headers,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, case, method, path, body, headers, status, words):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    r = httpx.request(method, server + path, content=content, headers=h, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and {"type", "param", "code"} <= set(err)
    assert httpx.get(server + "/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_disconnect_mid_stream_frees_the_model(tiny_kit, tmp_path):
    """The client reads the first piece of an answer of 8000 tokens (about 10 s here, the end token banned),
    then hangs up: the server logs it "cancelled", serves the next request, and stops decoding it: its CPU is
    idle a moment later. --parallel 4 leaves free sequences, so the next answer comes either way; only the
    CPU shows a sequence that goes on decoding for nobody."""
    root, *_ = tiny_kit
    log = tmp_path / "serve.log"
    srv = start_server(["serve", str(root / "tiny.yaml"), "--n-ctx", "8192", "--merge", "off", "--parallel", "4"], log)
    try:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 8000,
            "stream": True,
            "temperature": 1.0,
            "logit_bias": {"2": -100},  # </s>: the answer can only end at max_tokens, or by the cancel
        }
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if '"content"' in line:
                    break  # decoding: hang up
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        time.sleep(0.3)
        before = srv.cpu_seconds()
        time.sleep(1.5)
        busy = srv.cpu_seconds() - before
        assert busy < 0.3, f"the server used {busy:.2f} CPU-s in 1.5 s after its client left: still decoding"
        access = [x for x in srv.output().splitlines() if x.startswith("access:")]
        assert len(access) == 2 and access[0].endswith(" cancelled") and access[1].endswith(" ok"), access
    finally:
        srv.stop()


def test_lora_adapters_endpoint(server, client):
    h = {"Authorization": f"Bearer {KEY}"}
    listed = httpx.get(server + "/lora-adapters", headers=h).json()
    assert [(a["id"], a["name"], a["scale"]) for a in listed] == [(0, "medical", 0.0), (1, "legal", 0.0)]
    mixed = ask(client, "tiny:mixed")
    r = httpx.post(server + "/lora-adapters", headers=h, json=[{"id": 0, "scale": 0.5}, {"id": 1, "scale": -1.0}])
    assert r.status_code == 200 and r.json()[1]["scale"] == -1.0
    try:
        assert ask(client, "tiny") == mixed  # the bare model now runs at the global scales
    finally:
        httpx.post(server + "/lora-adapters", headers=h, json=[])


def test_a_hot_set_moves_to_merged_weights(server, client):
    """The tiny model's base is f32, so `merge: auto` merges: a coefficient set asked for often enough (here
    until it also outnumbers the sets earlier tests made hot) is baked in the background, GET /v1/models/{id}
    lists it, and it answers as it did on adapters."""
    headers = {"Authorization": f"Bearer {KEY}"}
    hot = {"avgguf": {"coefficients": {"medical": 0.25, "legal": 0.75}}}  # a set no other test asks for
    want = {"legal": 0.75, "medical": 0.25}
    before = ask(client, "tiny", content="a hot question", max_tokens=10, **hot)
    for i in range(64):
        assert ask(client, "tiny", content="a hot question", max_tokens=10, **hot) == before, i
        card = httpx.get(server + "/v1/models/tiny", headers=headers, timeout=5).json()["avgguf"]
        if want in card["merged_sets"]:
            break
        if card["merging"] == want:
            time.sleep(0.1)
    assert want in card["merged_sets"]
    assert ask(client, "tiny", content="a hot question", max_tokens=10, **hot) == before
