"""The server's application in-process (FastAPI's TestClient) with the engine's sampler scripted, for
cases a live model cannot be steered into: multi-byte characters split across tokens, a request that
finishes on its first token while another runs, a temperature that overflows, bodies without length."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import expertflow as ef  # noqa: E402
from expertflow.cli import BUNDLED_MODEL  # noqa: E402


@pytest.fixture(autouse=True)
def host_backend(monkeypatch):
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")


@pytest.fixture(scope="module")
def served():
    from transformers import AutoTokenizer

    from expertflow.server import Server, build_app

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    model = ef.from_pretrained(BUNDLED_MODEL, policy="lru", expert_slots="50%", dtype="float32", progress=False)
    server = Server(ef.Engine(model, max_batch_size=4), tokenizer, "tiny-mixtral")
    with TestClient(build_app(server)) as client:
        yield server, client, tokenizer
    server.close()
    model.expertflow.close()


def script(server, monkeypatch, tokens_for):
    """Makes the engine's sampler answer ``tokens_for(request)[len(output)]``."""
    monkeypatch.setattr(server.engine, "_sample", lambda r, logits: tokens_for(r)[len(r.output_ids)])


def stream_text(client, body) -> tuple[str, list[dict]]:
    chunks = []
    with client.stream("POST", "/v1/chat/completions" if "messages" in body else "/v1/completions",
                       json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    if "messages" in body:
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks
    return "".join(c["choices"][0]["text"] for c in chunks), chunks


def test_multibyte_characters_split_across_tokens(served, monkeypatch):
    server, client, tokenizer = served
    text = "a 😀 b é!"
    ids = tokenizer(text)["input_ids"]
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(len(ids)))  # the case is real
    script(server, monkeypatch, lambda r: ids)
    body = {"prompt": "x", "max_tokens": len(ids), "temperature": 0}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == text
    streamed, _ = stream_text(client, body)
    assert streamed == text


def test_chat_stream_names_the_role_once(served, monkeypatch):
    server, client, tokenizer = served
    ids = tokenizer("one two")["input_ids"]
    script(server, monkeypatch, lambda r: ids)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    text, chunks = stream_text(client, {"messages": messages, "max_tokens": len(ids), "temperature": 0})
    assert text == "one two"
    assert [("role" in c["choices"][0]["delta"]) for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_request_done_on_its_first_token_while_another_runs(served, monkeypatch):
    """The worker may prefill and finish a request before its handler registers it: the reply must
    still come (submission is slowed here to widen that window)."""
    server, client, _ = served
    submit = server.engine.submit

    def slow_submit(*args, **kwargs):
        request = submit(*args, **kwargs)
        time.sleep(0.3)
        return request

    monkeypatch.setattr(server.engine, "submit", slow_submit)
    background = threading.Thread(target=lambda: client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 40,
                                                                                      "temperature": 0}))
    background.start()
    time.sleep(0.2)
    answer = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "temperature": 0})
    background.join(timeout=120)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 1
    assert not server._streams


def test_a_tiny_temperature_fails_nothing(served):
    _, client, _ = served
    replies = []
    threads = [threading.Thread(target=lambda t=t: replies.append(client.post(
        "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 6, "temperature": t}))) for t in (0, 1e-40, 0, 0.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.status_code for r in replies] == [200] * 4
    assert all(r.json()["choices"][0]["finish_reason"] in ("length", "stop") for r in replies)


@pytest.mark.parametrize("body,message", [
    ({"prompt": "x", "seed": 10**30}, "'seed' must be an integer from 0 to 2**63 - 1"),
    ({"prompt": "x", "temperature": 10**400}, "'temperature' must be between 0 and 2"),
    ({"prompt": "x", "stream": "no"}, "'stream' must be true or false"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "'stop' must be a string or a list of at most 4"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "'messages' must be a non-empty list"),
])
def test_bad_fields_are_400s_in_openais_shape(served, body, message):
    _, client, _ = served
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = client.post(path, content=json.dumps(body).encode() if "temperature" in body and body["temperature"] > 2 else None,
                        json=None if "temperature" in body and body["temperature"] > 2 else body,
                        headers={"content-type": "application/json"})
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]


def test_a_chat_template_that_refuses_is_a_400(served, monkeypatch):
    _, client, tokenizer = served
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert reply.status_code == 400 and "roles must alternate" in reply.json()["error"]["message"]


def test_a_chunked_body_is_bounded_too(served):
    _, client, _ = served

    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    reply = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "larger than" in reply.json()["error"]["message"]


def test_close_tells_open_streams():
    """Server.close() fails what is left and relays it, so no handler waits forever."""
    from transformers import AutoTokenizer

    from expertflow.server import Server

    model = ef.from_pretrained(BUNDLED_MODEL, policy="lru", expert_slots="50%", progress=False)
    server = Server(ef.Engine(model, max_batch_size=1), AutoTokenizer.from_pretrained(BUNDLED_MODEL), "tiny-mixtral")

    async def scenario():
        streams = [server.submit([5, 6], ef.SamplingParams(max_new_tokens=500)) for _ in range(3)]
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, server.close)
        finished = []
        for s in streams:
            while not await asyncio.wait_for(s.queue.get(), timeout=10):  # token events, then done
                pass
            finished.append(s.request.finish_reason)
        return finished

    try:
        assert asyncio.run(scenario()) == ["error"] * 3
    finally:
        model.expertflow.close()


def test_unknown_paths_and_methods_and_untokenizable_prompts(served):
    _, client, _ = served
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        reply = client.request(method, path)
        assert reply.status_code == status and "message" in reply.json()["error"]
    reply = client.post("/v1/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}',
                        headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "cannot be tokenized" in reply.json()["error"]["message"]
