"""The OpenAI-compatible server in a subprocess, driven by the official openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer(request: urllib.request.Request) -> tuple[int, dict]:
    """(HTTP status, JSON body), error statuses included."""
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, key: str | None = KEY) -> tuple[int, dict]:
    return answer(urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {}))


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    return answer(urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {KEY}",
                                                                  "Content-Type": "application/json"}))


def announce_body(base: str, nbytes: int) -> tuple[int, dict]:
    """Sends only the headers of a POST whose body would be ``nbytes`` long, and reads the answer."""
    import http.client
    from urllib.parse import urlparse

    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    for name, value in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"), ("Content-Length", str(nbytes))):
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    try:
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def start_server(*args: str, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """``expertflow serve ARGS`` (host backend) on a free port, once it answers: (process, base URL)."""
    port = free_port()
    env = {**os.environ, "EXPERTFLOW_BACKEND": "host"}
    proc = subprocess.Popen([sys.executable, "-m", "expertflow.cli", "serve", "--port", str(port), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if get(f"{base}/v1/models")[0] == 200:
                return proc, base
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stdout.read()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server():
    # fp32: greedy tokens do not depend on which requests share a batch.
    proc, base = start_server("--api-key", KEY, "--expert-slots", "50%", "--dtype", "float32", "--max-batch-size", "4")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny-mixtral"]


def test_concurrent_streams_with_a_bad_request_among_them(client):
    prompts = ["ROMEO:", "The json module", "JULIET:", "def main", "import os", "First Citizen:"]
    streamed: dict[str, str] = {}
    errors: list[Exception] = []

    def stream(prompt: str) -> None:
        chunks = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        streamed[prompt] = "".join(c.choices[0].text for c in chunks)

    def bad() -> None:
        try:
            client.completions.create(model="tiny-mixtral", prompt="x", max_tokens=0)
        except openai.BadRequestError as e:
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(errors) == 1 and errors[0].status_code == 400
    assert "'max_tokens' must be between 1 and" in errors[0].body["message"]
    for prompt in prompts:  # each stream equals the same request made alone, not streamed
        alone = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=12, temperature=0)
        assert streamed[prompt] == alone.choices[0].text and alone.choices[0].text
        assert alone.usage.completion_tokens <= 12


def test_chat_and_its_stream(client):
    messages = [{"role": "user", "content": "Speak of the sea."}]
    whole = client.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason in ("length", "stop")
    parts = client.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == whole.choices[0].message.content


def test_stop_strings_and_seeds(client):
    full = client.completions.create(model="tiny-mixtral", prompt="ROMEO:", max_tokens=24, temperature=0).choices[0].text
    stop = full.strip()[3:6]
    cut = client.completions.create(model="tiny-mixtral", prompt="ROMEO:", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model="tiny-mixtral", prompt="JULIET:", max_tokens=10, temperature=1.0, top_p=0.9,
                                      seed=11).choices[0].text for _ in range(2))
    assert a == b


def test_errors_take_openais_shape(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny-mixtral", prompt=[5, 10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        client.chat.completions.create(model="tiny-mixtral", messages=[], max_tokens=2)
    status, body = post_raw(f"{server}/v1/completions", b"{not json")
    assert status == 400 and body["error"]["message"] == "the request body is not valid JSON"
    status, body = announce_body(server, 2 << 20)  # refused on its Content-Length, before it is read
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert get(f"{server}/v1/models")[0] == 200  # still up


def test_a_client_that_goes_away_frees_its_request(server, client):
    stream = client.completions.create(model="tiny-mixtral", prompt="ROMEO:", max_tokens=100, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 30
    while get(f"{server}/metrics")[1]["running"] and time.time() < deadline:
        time.sleep(0.2)
    status, metrics = get(f"{server}/metrics")
    assert status == 200 and metrics["running"] == 0 and metrics["queue_length"] == 0
    assert metrics["tokens"] > 0 and 0 <= metrics["hit_ratio"] <= 1 and metrics["bytes_copied"] >= 0
