"""``expertflow serve``: an OpenAI-compatible HTTP server over the serving engine (FastAPI, uvicorn).

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat
template; a plain ``role: content`` one where the tokenizer has none), streaming (server-sent events)
or not, and ``/metrics`` (JSON: hit ratio, bytes copied, queue length, tokens/s).

One worker thread steps the engine; the event loop only validates, submits and relays tokens. A
client that disconnects has its request cancelled. Errors take OpenAI's shape, ``{"error": {"message",
"type", "param", "code"}}``, with the HTTP status that matches (400 bad input, 401 bad key, 404 unknown
model, 413 body too large, 429 queue full). Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from .serving import Engine, EngineError, Request, SamplingParams

__all__ = ["Server", "build_app", "serve"]

log = logging.getLogger(__name__)

#: A chat template for tokenizers that bring none: each message as "role: content" on its own line.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class _Stream:
    """Relays one request's tokens from the worker thread to its handler on the event loop."""

    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # True once the request is done
    sent: int = 0  # output tokens relayed so far


class Server:
    """The engine, its worker thread and the token relays; ``close()`` stops them."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
                 max_tokens_limit: int = 4096) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.started = time.time()
        self._streams: dict[int, _Stream] = {}
        # Held while a request is submitted and registered, and while the worker relays: a request the
        # worker finishes at once (one token) is never relayed before its stream exists.
        self._streams_lock = threading.Lock()
        self._cancels: list[Request] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="expertflow-engine", daemon=True)
        self._worker.start()

    # -- the worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._cancels and not self.engine.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
                cancels, self._cancels = self._cancels, []
            for request in cancels:
                self.engine.cancel(request)
                self._relay(request)
            if self.engine.has_work():
                try:
                    for request in self.engine.step():
                        self._relay(request)
                except Exception:  # the engine isolates failing requests; anything else is logged, not fatal
                    log.exception("engine step failed")
                    if self.engine.shard is not None:  # the ranks are out of step: torchrun stops them all
                        log.critical("a distributed engine cannot go on after a failed pass; exiting")
                        os._exit(1)

    def _relay(self, request: Request) -> None:
        with self._streams_lock:
            stream = self._streams.get(request.id)
            if stream is None:
                return
            stream.sent = len(request.output_ids)
            if request.done:
                self._streams.pop(request.id, None)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, request.done)

    # -- the event loop ---------------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams) -> _Stream:
        loop = asyncio.get_running_loop()
        with self._streams_lock:
            try:
                request = self.engine.submit(ids, params)
            except EngineError as e:
                status = 429 if "queue is full" in str(e) else 400
                raise ApiError(status, str(e), "rate_limit_error" if status == 429 else "invalid_request_error") from None
            stream = self._streams[request.id] = _Stream(request, loop)
        with self._wake:
            self._wake.notify()
        return stream

    def cancel(self, request: Request) -> None:
        with self._wake:
            self._cancels.append(request)
            self._wake.notify()

    def close(self) -> None:
        """Stops the worker, fails what is left and tells every open stream so."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._worker.join(timeout=60)
        if self._worker.is_alive():  # a pass still running: closing the engine under it would race
            log.warning("the engine worker did not stop within 60 s; leaving the engine open")
            return
        self.engine.close()
        with self._streams_lock:
            streams = list(self._streams.values())
        for stream in streams:
            self._relay(stream.request)

    def metrics(self) -> dict:
        stats = self.engine.offload.stats()
        s = self.engine.stats
        elapsed = time.time() - self.started
        return {
            "model": self.model_name, "hit_ratio": stats["hit_ratio"], "bytes_copied": stats["bytes_copied"],
            "queue_length": len(self.engine._waiting), "running": len(self.engine._running),
            "tokens": s["tokens"], "tokens_per_s": s["tokens"] / elapsed if elapsed > 0 else 0.0,
            "decode_batches": s["decode_batches"], "prefill_passes": s["prefill_passes"],
            "activated_pairs_per_batch": s["activated_pairs"] / max(s["decode_batches"], 1),
            "schedule": self.engine.schedule, "policy": stats["policy"], "num_slots": stats["num_slots"],
        }


def _params(body: dict, server: Server, default_max_tokens: int) -> tuple[SamplingParams, list[str]]:
    """Sampling fields of an OpenAI request, checked; and its stop strings."""
    def number(name: str, default: Any, kind: type) -> Any:
        value = body.get(name, default)
        if value is None:
            return default
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ApiError(400, f"'{name}' must be an integer, got {value!r}", param=name)
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ApiError(400, f"'{name}' must be a number, got {value!r}", param=name)
        return value

    max_tokens = number("max_tokens", default_max_tokens, int)
    if "max_completion_tokens" in body:
        max_tokens = number("max_completion_tokens", max_tokens, int)
    if not 1 <= max_tokens <= server.max_tokens_limit:
        raise ApiError(400, f"'max_tokens' must be between 1 and {server.max_tokens_limit}, got {max_tokens}", param="max_tokens")
    if number("n", 1, int) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ApiError(400, f"'seed' must be an integer from 0 to 2**63 - 1, got {seed!r}", param="seed")
    temperature, top_p = number("temperature", 1.0, float), number("top_p", 1.0, float)
    if not 0 <= temperature <= 2:  # OpenAI's range
        raise ApiError(400, f"'temperature' must be between 0 and 2, got {temperature!r}", param="temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p!r}", param="top_p")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed)
    try:
        params.check()
    except EngineError as e:
        raise ApiError(400, str(e)) from None
    return params, stop


def _message(m: Any) -> dict | None:
    """A chat message as {role, content: str}; content given as text parts is joined. None if malformed."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return None
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return None
        content = "".join(p["text"] for p in content)
    return {"role": m["role"], "content": content} if isinstance(content, str) else None


def build_app(server: Server):
    """The FastAPI application over ``server``."""
    async def guard(request: HttpRequest) -> None:
        # A dependency of every route, not an HTTP middleware: Starlette's middleware wrapper hides a
        # client's disconnect from the handler.
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        if server.api_key is not None:
            header = request.headers.get("authorization", "")
            given = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
            if not secrets.compare_digest(given.encode(), server.api_key.encode()):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                               code="invalid_api_key")

    app = FastAPI(title="ExpertFlow", docs_url=None, redoc_url=None, dependencies=[Depends(guard)])

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HttpRequest, e: RequestValidationError):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    async def body_of(request: HttpRequest) -> dict:
        raw = bytearray()
        async for chunk in request.stream():  # counted as it comes: a chunked body has no Content-Length
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(bytes(raw))
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        model = body.get("model")
        if model is not None and model != server.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{server.model_name}'",
                           param="model", code="model_not_found")
        return body

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": int(server.started), "owned_by": "expertflow"}]}

    @app.get("/metrics")
    async def metrics():
        return server.metrics()

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                ids = server.tokenizer(prompt)["input_ids"] if prompt else []
            except Exception:  # e.g. a lone UTF-16 surrogate, which no tokenizer encodes
                raise ApiError(400, "'prompt' cannot be tokenized (is it valid Unicode?)", param="prompt") from None
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")
        params, stop = _params(body, server, default_max_tokens=16)
        return await respond(request, server.submit(ids, params), stop, bool(body.get("stream")), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await body_of(request)
        messages = [_message(m) for m in body.get("messages") or [None]] if isinstance(body.get("messages"), list) else None
        if not messages or any(m is None for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects whose content is text "
                                "(a string or a list of text parts)", param="messages")
        template = server.tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
        try:
            ids = server.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)
        except Exception as e:  # jinja's TemplateError, or the template's own raise_exception
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
        params, stop = _params(body, server, default_max_tokens=256)
        return await respond(request, server.submit(list(ids), params), stop, bool(body.get("stream")), chat=True)

    async def tokens(http: HttpRequest, stream: _Stream, stop: list[str]) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason once done), cancelling the request when the client goes away or a
        stop string appears."""
        request, text, shown = stream.request, "", 0
        checked = time.monotonic()
        try:
            while True:
                try:
                    done = await asyncio.wait_for(stream.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    done = None
                if done is None or time.monotonic() - checked > 1.0:  # while tokens flow too
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        server.cancel(request)
                        return
                    if done is None:
                        continue
                text = server.tokenizer.decode(request.output_ids[: stream.sent], skip_special_tokens=True)
                if not done:
                    # An unfinished multi-byte character decodes as U+FFFD until its last token comes.
                    text = text.rstrip("\ufffd")
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    server.cancel(request)
                    yield text[shown:cut], "stop"
                    return
                # Hold back a tail that may be the start of a stop string.
                hold = max((len(s) - 1 for s in stop), default=0)
                upto = len(text) if done else max(shown, len(text) - hold)
                if done:
                    if request.finish_reason == "error":
                        raise ApiError(500, request.error or "the request failed", "server_error")
                    yield text[shown:], "length" if request.finish_reason == "length" else "stop"
                    return
                if upto > shown:
                    yield text[shown:upto], None
                    shown = upto
        except asyncio.CancelledError:
            server.cancel(request)
            raise

    async def respond(http: HttpRequest, stream: _Stream, stop: list[str], streaming: bool, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        prompt_tokens = len(stream.request.prompt_ids)

        def choice(text: str, reason: str | None, delta: bool, first: bool = True) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            if not delta:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            # As OpenAI streams it: the role in the first chunk only, content while there is some.
            part = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
            return {"index": 0, "delta": part, "finish_reason": reason}

        if not streaming:
            parts, reason = [], None
            async for text, last in tokens(http, stream, stop):
                parts.append(text)
                reason = last
            completion = len(stream.request.output_ids)
            return {"id": rid, "object": kind, "created": created, "model": server.model_name,
                    "choices": [choice("".join(parts), reason, delta=False)],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                              "total_tokens": prompt_tokens + completion}}

        async def events():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            first = True
            try:
                async for text, reason in tokens(http, stream, stop):
                    if text or reason:
                        chunk = {"id": rid, "object": chunk_kind, "created": created, "model": server.model_name,
                                 "choices": [choice(text, reason, delta=True, first=first)]}
                        first = False
                        yield f"data: {json.dumps(chunk)}\n\n"
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), or an OSError that says which."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None
    sock.listen(2048)
    return sock


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch_size: int = 8, schedule: str = "expertflow", max_queue: int = 256, **load) -> None:
    """Loads the model, starts the engine and serves until interrupted. With ``distributed=True``
    (under torchrun) rank 0 serves and the other ranks follow its engine."""
    import uvicorn
    from transformers import AutoTokenizer

    from . import from_pretrained

    # The port first: a busy one is an error before minutes of loading, and port 0 becomes a real one.
    serving_rank = not load.get("distributed") or os.environ.get("RANK", "0") == "0"
    sock = _bind(host, port) if serving_rank else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = from_pretrained(model_path, **load)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    shard = model.expertflow.shard
    if shard is not None and shard.rank != 0:
        try:
            Engine(model, max_batch_size=max_batch_size, schedule=schedule, max_queue=max_queue).follow()
        finally:
            model.expertflow.close()
        return
    server = Server(Engine(model, max_batch_size=max_batch_size, schedule=schedule, max_queue=max_queue), tokenizer,
                    model_name=str(model_path).rstrip("/").split("/")[-1], api_key=api_key)
    assert sock is not None
    log.info("serving %s on http://%s:%d/v1 (%s schedule, batches of %d)%s", server.model_name, host,
             sock.getsockname()[1], schedule, max_batch_size, "" if api_key is None else ", API key required")
    try:
        uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()
        server.close()
        model.expertflow.close()
