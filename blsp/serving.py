"""`blsp serve`: an OpenAI-compatible HTTP API over a BLSP model, and a web page to talk to it.

    POST /v1/chat/completions      OpenAI chat; user messages may carry `input_audio` parts
    POST /v1/audio/transcriptions  OpenAI's multipart upload; the transcribe instruction
    GET  /v1/models, GET /health   the served model; liveness, queue and batch counts
    GET  /                         the web page (blsp/static/index.html)

Generation runs in `blsp.batching` (one thread, requests batched; another encodes the speech);
this module turns HTTP requests into jobs and job events into OpenAI responses, and keeps hostile
input from costing more than a bounded amount: bodies have a size and a time limit, audio is
measured from its header before it is decoded, text before it is tokenised, and both happen in the
request's own thread, off the generation thread. Who may call is checked before a body is read:
the Host header (against DNS rebinding), a browser page's origin (CORS is off unless asked for)
and, when the server has one, the API key. Every refusal is an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}` with a 4xx (or 503/504) status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Annotated, AsyncIterator, Callable, Literal, Union
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from .audio import AudioError, decode_audio, encoded_duration
from .batching import (BatchingEngine, Delta, EngineOptions, Failed, Finished, Job, ServingError, Started,
                       timeout_error)
from .errors import BlspError
from .prompts import TASK_INSTRUCTIONS, task_instruction, text_part


API_KEY_ENV = "BLSP_API_KEY"  # where `blsp serve` reads its API key when --api-key is not given
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Decoded clips at their own sample rate are the largest buffers a request holds while it is
# prepared: this many are decoded at a time, whatever the number of requests being prepared.
DECODING_SLOTS = 2
DISCONNECT_POLL_S = 0.25  # how often a request waiting for its answer looks whether its client left


@dataclass(frozen=True)
class ServeOptions:
    model_name: str = "blsp"  # the id clients pass as `model`
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64  # requests being prepared or waiting; more are answered 503
    max_body_bytes: int = 25 * 2**20  # OpenAI's upload limit; base64 audio counts as sent
    body_timeout_s: float = 60.0  # to receive the whole body; a slower upload is answered 408
    max_audio_parts: int = 8  # in one conversation
    max_audio_seconds: float = 300.0  # per clip, read from its header before a sample is decoded
    max_request_audio_seconds: float = 300.0  # all the clips of one request together
    max_prompt_tokens: int | None = None  # text and speech vectors; None: the LLM's context window
    request_timeout_s: float = 120.0  # from arrival to the last token, queueing included
    default_max_tokens: int = 256  # when a request gives no max_tokens
    api_key: str | None = None  # when set, /v1 takes `Authorization: Bearer KEY` only
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host header names answered; "*": any
    cors_origins: tuple[str, ...] = ()  # other origins whose pages may call the API; "*": any
    docs: bool = False  # serve /docs, /redoc and /openapi.json

    def engine_options(self) -> EngineOptions:
        return EngineOptions(max_batch_size=self.max_batch_size, batch_wait_s=self.batch_wait_ms / 1000,
                             max_queue=self.max_queue, default_max_tokens=self.default_max_tokens,
                             max_prompt_tokens=self.max_prompt_tokens)


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host names a server bound to `host` answers by default: loopback names and `host` itself;
    any name when bound to every interface (the names clients use there are not known here)."""
    if host in ("0.0.0.0", "::", ""):
        return ("*",)
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, host.strip("[]").lower())))


def api_key_from(flag: str | None) -> str | None:
    """--api-key, else $BLSP_API_KEY (which keeps the key out of the process list); empty: none."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return key or None


# ----------------------------------------------------------------------------------------------
# The request schema (the subset of OpenAI's the model can honour)
# ----------------------------------------------------------------------------------------------
class InputAudio(BaseModel):
    data: str
    format: Literal["wav", "mp3", "flac"]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextPart, AudioPart], Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Omitted means greedy, as `blsp generate` (OpenAI's default is 1).
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


# ----------------------------------------------------------------------------------------------
# Request -> conversation (content parts as blsp.inference takes them)
# ----------------------------------------------------------------------------------------------
class AudioBudget:
    """A request's audio, measured before any of it is decoded.

    Every clip's length is read from its header (`admit`), and the request is refused when one
    clip is over the per-clip limit or all of them over the per-request one; only then are the
    clips decoded (`decode`), a few at a time across all requests (`slots`).
    """

    def __init__(self, options: ServeOptions, slots: threading.Semaphore | None = None):
        self.options = options
        self.seconds = 0.0  # admitted so far
        self.slots = slots or threading.BoundedSemaphore(DECODING_SLOTS)

    def admit(self, data: bytes, label: str) -> bytes:
        if not data:
            raise ServingError(400, f"{label}: the audio is empty", code="invalid_audio", param=label)
        try:
            seconds = encoded_duration(data, label)
        except AudioError as err:
            raise ServingError(400, str(err), code="invalid_audio", param=label) from None
        per_clip, per_request = self.options.max_audio_seconds, self.options.max_request_audio_seconds
        if seconds > per_clip:
            raise ServingError(400, f"{label}: the audio is {seconds:.0f} s long; at most {per_clip:.0f} s per clip",
                               code="audio_too_long", param=label)
        if self.seconds + seconds > per_request:
            raise ServingError(400, f"{label}: with it the request's audio is {self.seconds + seconds:.0f} s long; "
                                    f"at most {per_request:.0f} s per request", code="audio_too_long", param="messages")
        self.seconds += seconds
        return data

    def decode(self, data: bytes, label: str) -> object:
        """16 kHz mono waveform of an admitted clip; any refusal is a 400 naming `label`."""
        try:
            with self.slots:
                return decode_audio(data, label, max_seconds=self.options.max_audio_seconds)
        except AudioError as err:
            raise ServingError(400, str(err), code="invalid_audio", param=label) from None


def _audio_bytes(part: AudioPart, label: str) -> bytes:
    try:
        return base64.b64decode(part.input_audio.data, validate=True)
    except (binascii.Error, ValueError):
        raise ServingError(400, f"{label}: input_audio.data is not valid base64", code="invalid_base64",
                           param=f"{label}.input_audio.data") from None


def to_conversation(messages: list[Message], options: ServeOptions, slots: threading.Semaphore | None = None
                    ) -> list[dict]:
    """The conversation as `blsp.inference` takes it: every clip measured first, then decoded."""
    n_audio = sum(isinstance(p, AudioPart) for m in messages if isinstance(m.content, list) for p in m.content)
    if n_audio > options.max_audio_parts:
        raise ServingError(400, f"the conversation has {n_audio} audio parts; at most {options.max_audio_parts}",
                           code="too_many_audio_parts", param="messages")
    budget = AudioBudget(options, slots)
    roles = ["system" if m.role == "developer" else m.role for m in messages]
    clips = {}  # (message, part) -> the clip's bytes, admitted
    for i, (message, role) in enumerate(zip(messages, roles)):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if isinstance(part, AudioPart):
                label = f"messages[{i}].content[{j}]"
                if role != "user":
                    raise ServingError(400, f"{label}: audio parts are only taken in user messages", param=label)
                clips[i, j] = budget.admit(_audio_bytes(part, label), label)
    conversation = []
    for i, (message, role) in enumerate(zip(messages, roles)):
        content = message.content if message.content is not None else ""
        if isinstance(content, list):
            content = [text_part(p.text) if isinstance(p, TextPart) else
                       {"type": "audio", "audio": budget.decode(clips[i, j], f"messages[{i}].content[{j}]")}
                       for j, p in enumerate(content)]
        conversation.append({"role": role, "content": content})
    return conversation


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ServingError(400, "at most 4 stop sequences", param="stop")
    return tuple(s for s in stops if s)


# ----------------------------------------------------------------------------------------------
# Jobs seen from the event loop
# ----------------------------------------------------------------------------------------------
class JobHandle:
    """A submitted job's events, delivered from the engine's threads into this event loop.

    The deadline runs from the request's arrival: decoding, tokenising and encoding count. While
    no event comes, a request answered as a whole looks every `DISCONNECT_POLL_S` whether its client
    left (a stream learns it from Starlette), so that nobody's job is encoded or generated for nothing.
    """

    def __init__(self, request: Request, watch_disconnect: bool = True, **job_args):
        self.request, self.watch_disconnect = request, watch_disconnect
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        timeout = request.app.state.options.request_timeout_s
        self.job = Job(conversation=[], emit=self._emit, deadline=time.monotonic() + timeout, **job_args)

    def _emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down): nobody to tell
            pass

    async def next(self):
        while True:
            # The engine enforces the deadline; this backstop covers a job stuck behind a long batch.
            remaining = self.job.deadline - time.monotonic() + 1.0
            if remaining <= 0:
                self.cancel()
                return Failed(timeout_error())
            wait = min(remaining, DISCONNECT_POLL_S) if self.watch_disconnect else remaining
            try:
                return await asyncio.wait_for(self.events.get(), wait)
            except asyncio.TimeoutError:
                if self.watch_disconnect and await self.request.is_disconnected():
                    self.cancel()
                    return Failed(ServingError(499, "the client closed the connection", code="client_closed"))

    async def first(self) -> Started:
        event = await self.next()
        if isinstance(event, Failed):
            raise event.error
        return event

    async def until_finished(self) -> Finished:
        while True:
            event = await self.next()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                return event

    def cancel(self) -> None:
        self.job.cancelled.set()


async def submit(handle: JobHandle, conversation: Callable[[], list[dict]]) -> JobHandle:
    """Prepare the job in a worker thread (its audio decoded, its prompt tokenised, each within its
    limits) and hand it to the engine. A full server refuses it (503) before any of that work."""
    engine = handle.request.app.state.engine
    job = handle.job

    def prepare() -> None:
        job.conversation = conversation()
        engine.prepare(job)
        if job.expired():
            raise timeout_error()

    with engine.arrival():
        await run_in_threadpool(prepare)
        engine.submit(job)
    return handle


async def started(handle: JobHandle) -> JobHandle:
    """Wait until the job is in a batch; its refusal is raised here, before any response starts."""
    try:
        await handle.first()
    except BaseException:
        handle.cancel()
        raise
    return handle


# ----------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------
def _check_model(name: str, options: ServeOptions) -> None:
    if name != options.model_name:
        raise ServingError(404, f"the model {name!r} does not exist; this server serves {options.model_name!r}",
                           code="model_not_found", param="model")


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def chat_completions(body: ChatRequest, request: Request) -> Response:
    state = request.app.state
    options: ServeOptions = state.options
    _check_model(body.model, options)
    stop = _stops(body.stop)
    handle = JobHandle(request, watch_disconnect=not body.stream,
                       max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature or 0.0,
                       top_p=1.0 if body.top_p is None else body.top_p, stop=stop)
    await submit(handle, lambda: to_conversation(body.messages, options, state.decoding_slots))
    await started(handle)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.model_name}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(handle, meta, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = await handle.until_finished()
    return JSONResponse({
        **meta, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                     "finish_reason": done.finish_reason, "logprobs": None}],
        "usage": _usage(done),
    })


def _sse_data(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _sse(handle: JobHandle, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role chunk, content deltas, a finish chunk, usage, `[DONE]`."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return _sse_data({**meta, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await handle.next()
            if isinstance(event, Delta):
                yield chunk({"content": event.text})
            elif isinstance(event, Finished):
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield _sse_data({**meta, "object": "chat.completion.chunk", "choices": [],
                                     "usage": _usage(event)})
                break
            elif isinstance(event, Failed):  # the status is sent already; OpenAI clients raise on this
                yield _sse_data(event.error.body())
                break
        yield _sse_data("[DONE]")
    finally:
        handle.cancel()  # a client that went away frees its row at the next step


async def transcriptions(
    request: Request,
    file: UploadFile = File(...),
    model: str = Form(...),
    response_format: Literal["json", "text"] = Form("json"),
    temperature: float = Form(0.0, ge=0, le=1),
    language: str | None = Form(None),  # accepted for compatibility; the instruction asks for English
    prompt: str | None = Form(None),  # accepted for compatibility; not used
) -> Response:
    state = request.app.state
    options: ServeOptions = state.options
    _check_model(model, options)
    data = await file.read()
    handle = JobHandle(request, temperature=temperature)

    def conversation() -> list[dict]:
        budget = AudioBudget(options, state.decoding_slots)
        wav = budget.decode(budget.admit(data, "file"), "file")
        return [{"role": "user", "content": [text_part(task_instruction("transcribe")),
                                             {"type": "audio", "audio": wav}]}]

    await submit(handle, conversation)
    done = await (await started(handle)).until_finished()
    if response_format == "text":
        return PlainTextResponse(done.text)
    return JSONResponse({"text": done.text, "usage": {
        "type": "tokens", "input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens}})


async def list_models(request: Request) -> dict:
    state = request.app.state
    return {"object": "list", "data": [
        {"id": state.options.model_name, "object": "model", "created": state.started, "owned_by": "blsp"}]}


async def health(request: Request) -> dict:
    state = request.app.state
    return {"status": "ok", "model": state.options.model_name, "queued": state.engine.queued(),
            "max_queue": state.options.max_queue, "max_batch_size": state.options.max_batch_size,
            **state.engine.stats.snapshot()}


@lru_cache(maxsize=1)
def page_html() -> str:
    """The web page, with the task table the CLI uses (so the page offers the same tasks)."""
    html = resources.files("blsp").joinpath("static/index.html").read_text(encoding="utf-8")
    tasks = {name: task_instruction(name) for name in TASK_INSTRUCTIONS}
    return html.replace("__BLSP_TASKS__", json.dumps(tasks).replace("<", "\\u003c"))


async def index() -> HTMLResponse:
    return HTMLResponse(page_html())


# ----------------------------------------------------------------------------------------------
# Errors and the body limit
# ----------------------------------------------------------------------------------------------
def _error(status: int, message: str, code: str | None = None, param: str | None = None,
           type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(ServingError(status, message, code, param, type).body(), status_code=status)


async def _serving_error(_: Request, err: ServingError) -> JSONResponse:
    response = JSONResponse(err.body(), status_code=err.status)
    if err.status == 503:
        response.headers["Retry-After"] = "1"
    return response


def _param(loc: tuple) -> str | None:
    """pydantic's error location as `messages[0].content[1].input_audio.format`: without "body",
    union member labels, and the repeated tag of a tagged union."""
    param, last = "", None
    for item in loc:
        if item == "body" and not param or isinstance(item, str) and "[" in item or item == last:
            continue
        param += f"[{item}]" if isinstance(item, int) else f".{item}" if param else str(item)
        last = item
    return param or None


async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    # Of a union's alternatives, the deepest error says what is wrong (not "should be a string").
    worst = max(err.errors(), key=lambda e: len(e.get("loc", ())))
    if worst.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {worst.get('ctx', {}).get('error', worst['msg'])}",
                      code="invalid_json")
    param = _param(tuple(worst.get("loc", ())))
    return _error(400, f"{param}: {worst['msg']}" if param else worst["msg"], code="invalid_request", param=param)


async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)


async def _internal_error(_: Request, err: Exception) -> JSONResponse:
    return _error(500, "internal server error", type="server_error")


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, whether or not they declare their length,
    and bodies not received within `timeout_s` with 408 (uvicorn has no such limit: a client that
    sends half a body would hold its connection and its request for ever).

    The body is read here in full (FastAPI would read it all anyway) and handed on from memory;
    after it, `receive` is the server's again, so streaming responses still see a disconnect.
    """

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                return await self._too_slow(scope, receive, send)
            if message["type"] != "http.request":  # the client left before sending it all
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = _error(413, f"the request body is over the server's limit of {self.max_bytes} bytes",
                          code="request_too_large")
        response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)

    async def _too_slow(self, scope, receive, send):
        response = _error(408, f"the request body did not arrive within the server's {self.timeout_s:g} s",
                          code="request_timeout")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class Guard:
    """Who may call, checked from the headers before a body is read.

    - The Host header must name this server (`allowed_hosts`): a page whose own name an attacker
      re-points at 127.0.0.1 (DNS rebinding) sends its own name, and is refused (400 `invalid_host`).
    - A browser page of another origin may not call at all unless its origin is in `cors_origins`
      (403 `origin_not_allowed`): without this a page anywhere could make its visitors' browsers
      post audio to the API (a multipart form needs no CORS preflight), though it could not read
      the answer. Clients other than browsers send no Origin header and are not concerned.
    - With an API key, every route but the page and /health needs `Authorization: Bearer KEY`, as
      OpenAI's clients send it (401 `invalid_api_key`).
    """

    OPEN = {("GET", "/"), ("GET", "/health")}

    def __init__(self, app, options: ServeOptions):
        self.app = app
        self.allowed_hosts = tuple(h.strip("[]").lower() for h in options.allowed_hosts)
        self.cors_origins = tuple(o.rstrip("/").lower() for o in options.cors_origins)
        self.api_key = options.api_key.encode() if options.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope, Headers(scope=scope))
            if refusal is not None:
                return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope, headers: Headers) -> Response | None:
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return _error(400, f"this server does not answer to the host name {host!r} (see --allowed-hosts)",
                          code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return _error(403, f"requests from web pages of {origin} are not allowed (see --cors-origins)",
                          code="origin_not_allowed")
        if self.api_key is not None and (scope["method"], scope["path"]) not in self.OPEN:
            if not self.key_given(headers.get("authorization", "")):
                response = _error(401, "a valid API key is needed: send `Authorization: Bearer KEY`",
                                  code="invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return None

    def host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        return any(a == "*" or a == name or (a.startswith("*.") and name.endswith(a[1:]))
                   for a in self.allowed_hosts)

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        return origin != "null" and urlsplit(origin).netloc == host.lower()  # the page this server serves

    def key_given(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`, `Example.com:80` -> `example.com`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


# ----------------------------------------------------------------------------------------------
# The app and the server
# ----------------------------------------------------------------------------------------------
def create_app(model, options: ServeOptions = ServeOptions()) -> FastAPI:
    engine = BatchingEngine(model, options.engine_options())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    docs = {} if options.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="blsp", summary="BLSP speech chat, OpenAI-compatible", lifespan=lifespan, **docs)
    app.state.options, app.state.engine, app.state.started = options, engine, int(time.time())
    app.state.decoding_slots = threading.BoundedSemaphore(DECODING_SLOTS)
    # The last added runs first: CORS (preflights answered), then who may call, then the body.
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes, timeout_s=options.body_timeout_s)
    app.add_middleware(Guard, options=options)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/audio/transcriptions", transcriptions, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    return app


def listen(host: str, port: int) -> socket.socket:
    """Bind first, so a taken port is a one-line error before minutes of model loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise BlspError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def run_server(model_dir: str, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
               strict: bool = True, log_level: str = "info") -> int:
    import uvicorn

    from .distributed import DistInfo, default_device
    from .modeling import BlspModel

    sock = listen(host, port)
    try:
        model = BlspModel.from_pretrained(model_dir, strict=strict)
        model.to(default_device(DistInfo()))
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(create_app(model, options), log_level=log_level))
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"blsp serve: {options.model_name!r} on http://{bound_host}:{bound_port}/ "
          f"(API under /v1, batches of up to {options.max_batch_size})", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass
    print("blsp serve: stopped", flush=True)
    return 0
