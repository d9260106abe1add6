"""`blsp serve` on a tiny saved model, driven by the official `openai` client against a real server
on a free loopback port: chat (plain, streamed, multi-turn, audio parts), transcriptions, batching
across concurrent users, a full queue, timeouts, every kind of bad input, the `blsp serve` command,
and the web page in headless Chromium."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
import torch
import uvicorn

import blsp.batching as batching
from blsp.audio import decode_audio
from blsp.batching import BatchingEngine, Delta, EngineOptions, Failed, Finished, Job, RowSampling
from blsp.cli import main
from blsp.inference import conversation_examples, prompt_length
from blsp.modeling import BlspModel
from blsp.prompts import task_instruction
from blsp.serving import ServeOptions, create_app, listen

from conftest import speak, tone

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "runs" / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
MAX_TOKENS = 12


# ----------------------------------------------------------------------------------------------
# A saved tiny model and a real server on a free loopback port
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tiny_dirs, tmp_path_factory) -> Path:
    model = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"], seed=0)
    with torch.no_grad():
        model.adapter.norm.weight.fill_(1.0)  # so the speech actually moves the answers
    path = tmp_path_factory.mktemp("served") / "adapter"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved_model) -> BlspModel:
    return BlspModel.from_pretrained(saved_model)


class Server:
    """uvicorn in a thread, on a socket bound to a free port before it starts."""

    def __init__(self, app):
        self.app = app
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", **kwargs)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """A raw HTTP request: (status, headers, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read().decode()
            try:
                return resp.status, dict(resp.getheaders()), json.loads(raw)
            except ValueError:
                return resp.status, dict(resp.getheaders()), raw
        finally:
            conn.close()


OPTIONS = ServeOptions(max_batch_size=4, batch_wait_ms=20, max_body_bytes=256 * 1024, max_audio_parts=3,
                       default_max_tokens=16, request_timeout_s=60)


@pytest.fixture(scope="module")
def server(model):
    with Server(create_app(model, OPTIONS)) as s:
        yield s


@contextmanager
def gated_generation(monkeypatch):
    """Generation waits until the returned event is set: the worker is busy for as long as a test needs."""
    gate, running = threading.Event(), threading.Event()
    real = batching.generate_from_examples

    def held(*args, **kwargs):
        running.set()
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(batching, "generate_from_examples", held)
    try:
        yield gate, running
    finally:
        gate.set()


# ----------------------------------------------------------------------------------------------
# Audio and conversations
# ----------------------------------------------------------------------------------------------
def encoded(audio: np.ndarray, fmt: str = "wav") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format=fmt.upper())
    return buf.getvalue()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def as_internal(messages: list[dict]) -> list[dict]:
    """The same conversation as `BlspModel.generate` takes it (audio parts decoded)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "audio", "audio": decode_audio(base64.b64decode(p["input_audio"]["data"]), "x")}
                       if p["type"] == "input_audio" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def direct(model, messages: list[dict], max_tokens: int = MAX_TOKENS) -> str:
    return model.generate(messages=[as_internal(messages)], max_new_tokens=max_tokens)[0]


def speech_question(seconds: float = 1.2, freq: float = 400.0, text: str = "please transcribe the following audio"):
    return [{"role": "user", "content": [{"type": "text", "text": text}, audio_part(encoded(tone(seconds, freq)))]}]


# ----------------------------------------------------------------------------------------------
# Chat completions
# ----------------------------------------------------------------------------------------------
def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["blsp"]
    status, _, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "blsp"
    assert health["max_batch_size"] == 4


def test_chat_with_audio_answers_as_the_model_does(server, model):
    messages = speech_question()
    reply = server.client().chat.completions.create(model="blsp", messages=messages, max_tokens=MAX_TOKENS)
    answer = reply.choices[0].message
    assert answer.role == "assistant"
    assert answer.content == direct(model, messages)
    assert reply.choices[0].finish_reason in ("stop", "length")
    (example,) = conversation_examples(model, [as_internal(messages)])
    assert reply.usage.prompt_tokens == prompt_length(model, example)
    assert 1 <= reply.usage.completion_tokens <= MAX_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == MAX_TOKENS
    # the speech matters: another clip, another answer
    other = server.client().chat.completions.create(model="blsp", messages=speech_question(2.3, 700),
                                                    max_tokens=MAX_TOKENS)
    assert other.choices[0].message.content != answer.content


def test_streaming_sends_the_same_answer_chunk_by_chunk(server, model):
    messages = speech_question(1.7, 520)
    plain = server.client().chat.completions.create(model="blsp", messages=messages, max_tokens=MAX_TOKENS)
    chunks = list(server.client().chat.completions.create(
        model="blsp", messages=messages, max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content == direct(model, messages)
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_multi_turn_with_system_prompt_and_several_formats(server, model):
    flac = encoded(tone(1.0, 300), "flac")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "what is this"}, audio_part(flac, "flac")]},
        {"role": "assistant", "content": "the quick brown fox"},
        {"role": "user", "content": [audio_part(encoded(tone(0.8, 610)), "wav"), {"type": "text", "text": "and this"}]},
    ]
    reply = server.client().chat.completions.create(model="blsp", messages=messages, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == direct(model, messages)
    # mp3 too (lossy: only that it is decoded and answered)
    mp3 = encoded(tone(1.5, 440), "mp3")
    reply = server.client().chat.completions.create(
        model="blsp", messages=[{"role": "user", "content": [audio_part(mp3, "mp3")]}], max_tokens=4)
    assert reply.choices[0].message.content is not None
    # text only is a chat too
    text_only = [{"role": "user", "content": "hello world"}]
    reply = server.client().chat.completions.create(model="blsp", messages=text_only, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == direct(model, text_only)


def test_max_tokens_and_stop_are_honoured(server, model):
    messages = speech_question(2.0, 350)
    client = server.client()
    short = client.chat.completions.create(model="blsp", messages=messages, max_tokens=3)
    assert short.usage.completion_tokens <= 3
    full = direct(model, messages, max_tokens=40)
    assert short.choices[0].message.content == direct(model, messages, max_tokens=3)
    if short.usage.completion_tokens == 3:
        assert short.choices[0].finish_reason == "length"
    long = client.chat.completions.create(model="blsp", messages=messages, max_completion_tokens=40)
    assert long.choices[0].message.content == full
    # a stop string from the middle of the answer: the answer ends just before it
    words = full.split()
    assert len(words) >= 3, full
    stop = words[len(words) // 2]
    expected = full[: full.find(stop)].rstrip()
    stopped = client.chat.completions.create(model="blsp", messages=messages, max_tokens=40, stop=[stop, "zzzz"])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="blsp", messages=messages, max_tokens=40, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_temperature_and_top_p_sample(server, model):
    messages = speech_question(1.4, 480)
    client = server.client()
    greedy = direct(model, messages, max_tokens=20)
    sampled = {client.chat.completions.create(model="blsp", messages=messages, max_tokens=20, temperature=2.0,
                                              top_p=1.0).choices[0].message.content for _ in range(3)}
    assert sampled != {greedy}  # it does sample
    # top_p=0 keeps only the most likely token: greedy whatever the temperature
    narrow = client.chat.completions.create(model="blsp", messages=messages, max_tokens=20, temperature=1.5, top_p=0.0)
    assert narrow.choices[0].message.content == greedy


def test_row_sampling_keeps_each_rows_settings():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = RowSampling([0.0, 1.0, 1.0], [1.0, 0.7, 1.0])(None, scores)
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False]  # greedy row: the argmax alone
    # softmax(1, 3, 2, 0) = 0.09, 0.67, 0.24, 0.03: the two best cover 0.7
    assert torch.isfinite(out[1]).tolist() == [False, True, True, False]
    torch.testing.assert_close(out[2], scores[2])  # temperature 1, top_p 1: untouched


# ----------------------------------------------------------------------------------------------
# Transcriptions
# ----------------------------------------------------------------------------------------------
def test_transcriptions_use_the_transcribe_instruction(server, model, tmp_path):
    wav = speak("hello world", tmp_path / "hello.wav")
    client = server.client()
    with open(wav, "rb") as f:
        result = client.audio.transcriptions.create(model="blsp", file=f)
    expected = model.generate(audio=str(wav), instruction=task_instruction("transcribe"),
                              max_new_tokens=OPTIONS.default_max_tokens)[0]
    assert result.text == expected
    with open(wav, "rb") as f:
        text = client.audio.transcriptions.create(model="blsp", file=f, response_format="text")
    assert text.strip() == expected
    with open(wav, "rb") as f, pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-1", file=f)
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.transcriptions.create(model="blsp", file=("empty.wav", b""))
    assert err.value.body["code"] == "invalid_audio"


# ----------------------------------------------------------------------------------------------
# Batching, the bounded queue, the timeout
# ----------------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_and_answered_as_alone(model):
    conversations = [speech_question(0.7 + 0.4 * k, 300 + 90 * k) for k in range(4)]
    expected = [direct(model, c) for c in conversations]
    options = ServeOptions(max_batch_size=4, batch_wait_ms=500)  # long enough for all four to meet
    with Server(create_app(model, options)) as s:
        barrier, answers = threading.Barrier(4), [None] * 4

        def ask(k):
            client = s.client()
            barrier.wait()
            if k == 3:  # a streamed request shares the batch with plain ones
                stream = client.chat.completions.create(model="blsp", messages=conversations[k],
                                                        max_tokens=MAX_TOKENS, stream=True)
                answers[k] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                answers[k] = client.chat.completions.create(model="blsp", messages=conversations[k],
                                                            max_tokens=MAX_TOKENS).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        _, _, health = s.request("GET", "/health")
    assert answers == expected
    assert health["largest_batch"] > 1, health
    assert health["requests"] == 4 and health["batches"] < 4


def test_clips_of_different_lengths_in_batches_of_one_are_all_answered(model):
    """The encoding stage takes jobs round robin and sends each on when its clip is encoded: one
    finishing behind another whose clip is longer was once compared field by field (numpy arrays)
    on its way out, which ended the stage and left every later request hanging."""
    conversations = [speech_question(0.5 + 0.6 * k, 300 + 90 * k) for k in range(3)]
    expected = [direct(model, c) for c in conversations]
    with Server(create_app(model, ServeOptions(max_batch_size=1))) as s:
        for _ in range(2):  # the stage still serves after a first round
            answers = [None] * 3

            def ask(k):
                answers[k] = s.client().chat.completions.create(
                    model="blsp", messages=conversations[k], max_tokens=MAX_TOKENS, timeout=60).choices[0].message.content

            threads = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            assert answers == expected


def test_a_batch_waits_for_the_clients_the_last_one_answered(model):
    engine = BatchingEngine(model, EngineOptions(max_batch_size=8, batch_wait_s=0.01, max_batch_wait_s=5.0))

    def job():
        return Job([{"role": "user", "content": "hi"}], lambda event: None, deadline=time.monotonic() + 60)

    def late(n, after, arriving=False):
        if arriving:  # received at once, submitted once its audio is decoded, as the handlers do
            with engine.arrival():
                time.sleep(after)
                engine.submit(job())
            return
        time.sleep(after)
        for _ in range(n):
            engine.submit(job())

    # idle server: a lone request does not wait for company beyond the short window
    engine.submit(job())
    started = time.monotonic()
    assert len(engine._gather()) == 1 and time.monotonic() - started < 1.0
    # a batch of 3 just ended: its clients are expected back, two of them a little later
    engine._last_batch = (3, time.monotonic())
    engine.submit(job())
    threading.Thread(target=late, args=(2, 0.3)).start()
    assert len(engine._gather()) == 3
    # a request already being received is waited for as well
    engine._last_batch = (0, 0.0)
    engine.submit(job())
    arriving = threading.Thread(target=late, args=(1, 0.3, True))
    arriving.start()
    while not engine._arriving:
        time.sleep(0.001)
    started = time.monotonic()
    assert len(engine._gather()) == 2 and time.monotonic() - started < 4.0


def test_a_full_queue_answers_503_and_the_server_recovers(model, monkeypatch):
    options = ServeOptions(max_batch_size=1, max_queue=1, batch_wait_ms=0)
    with gated_generation(monkeypatch) as (gate, running), Server(create_app(model, options)) as s:
        results = {}

        def ask(name):
            reply = s.client().chat.completions.create(model="blsp", messages=speech_question(), max_tokens=4)
            results[name] = reply.choices[0].message.content

        first = threading.Thread(target=ask, args=("first",))
        first.start()
        assert running.wait(30)  # the first request is being generated
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        deadline = time.monotonic() + 30
        while s.engine.queued() < 1:  # the second waits in the queue, which is now full
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as err:
            s.client(max_retries=0).chat.completions.create(model="blsp", messages=speech_question(), max_tokens=4)
        assert err.value.status_code == 503
        assert err.value.body["code"] == "server_busy" and err.value.response.headers["retry-after"] == "1"
        gate.set()
        first.join(60)
        second.join(60)
        assert set(results) == {"first", "second"}
        assert s.client().chat.completions.create(model="blsp", messages=speech_question(), max_tokens=4).choices


def test_a_request_over_the_timeout_gets_504(model, monkeypatch):
    options = ServeOptions(request_timeout_s=0.5)
    with gated_generation(monkeypatch) as (gate, running), Server(create_app(model, options)) as s:
        client = s.client(max_retries=0)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="blsp", messages=speech_question(), max_tokens=4)
        assert err.value.status_code == 504 and err.value.body["code"] == "timeout"
        assert time.monotonic() - started < 10
        gate.set()
        # the timed-out row is dropped at its first step; the next request is served
        reply = client.chat.completions.create(model="blsp", messages=speech_question(), max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_clip_the_encoder_refuses_fails_alone_in_its_batch(model):
    engine = BatchingEngine(model, EngineOptions(default_max_tokens=4))
    events = {"good": [], "bad": []}

    def job(name, audio):
        return Job([{"role": "user", "content": [{"type": "audio", "audio": audio}]}], events[name].append,
                   deadline=time.monotonic() + 60)

    # 100 samples: under one mel frame (the HTTP layer refuses such clips before they get here)
    engine.run_batch([job("good", tone(1.0)), job("bad", np.zeros(100, np.float32))])
    assert isinstance(events["good"][-1], Finished)
    assert isinstance(events["bad"][-1], Failed) and events["bad"][-1].error.status == 400
    assert engine.stats.snapshot()["requests"] == 1


def test_a_row_whose_client_went_away_stops_and_the_batch_goes_on(model):
    engine = BatchingEngine(model, EngineOptions())
    gone, staying = [], []

    def leave_after_first_delta(event):
        gone.append(event)
        if isinstance(event, Delta):
            leaving.cancelled.set()  # as the SSE stream does when its client disconnects

    conversation = as_internal(speech_question())
    leaving = Job(conversation, leave_after_first_delta, deadline=time.monotonic() + 60, max_tokens=200)
    other = Job(as_internal(speech_question()), staying.append, deadline=time.monotonic() + 60, max_tokens=MAX_TOKENS)
    engine.run_batch([leaving, other])
    assert sum(isinstance(e, Delta) for e in gone) == 1 and not any(isinstance(e, Finished) for e in gone)
    assert isinstance(staying[-1], Finished) and staying[-1].text == direct(model, speech_question())


# ----------------------------------------------------------------------------------------------
# Bad input: a 4xx with OpenAI's error body, and the server keeps serving
# ----------------------------------------------------------------------------------------------
def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)
BAD_REQUESTS = {
    # name: (request body, status, code, words in the message)
    "invalid_base64": ({"messages": _user({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}})},
                       400, "invalid_base64", "not valid base64"),
    "undecodable_audio": ({"messages": _user(audio_part(np.random.default_rng(0).bytes(3000)))},
                          400, "invalid_audio", "cannot decode audio"),
    "empty_audio_data": ({"messages": _user(audio_part(b""))}, 400, "invalid_audio", "empty"),
    "audio_without_samples": ({"messages": _user(audio_part(encoded(np.zeros(0, np.float32))))},
                              400, "invalid_audio", "no audio samples"),
    "audio_too_short": ({"messages": _user(audio_part(encoded(np.zeros(50, np.float32))))},
                        400, "invalid_audio", "too short"),
    "unknown_format": ({"messages": _user({"type": "input_audio", "input_audio": {"data": "", "format": "ogg"}})},
                       400, "invalid_request", "messages[0].content[0].input_audio.format: Input should be"),
    "unknown_model": ({"model": "gpt-4o", "messages": _user({"type": "text", "text": "hi"})},
                      404, "model_not_found", "gpt-4o"),
    "too_many_audio_parts": ({"messages": _user(*[audio_part(encoded(tone(0.3)))] * 4)},
                             400, "too_many_audio_parts", "at most 3"),
    "longer_than_the_context": ({"messages": _user({"type": "text", "text": LONG_TEXT})},
                                400, "context_length_exceeded", "context window of 512"),
    "max_tokens_beyond_the_context": ({"messages": _user({"type": "text", "text": "hi"}), "max_tokens": 600},
                                      400, "context_length_exceeded", "max_tokens 600"),
    "audio_in_an_assistant_message": ({"messages": [{"role": "assistant", "content": [audio_part(encoded(tone(0.5)))]}]},
                                      400, None, "only taken in user messages"),
    "unknown_part_type": ({"messages": _user({"type": "image_url", "image_url": {"url": "x"}})},
                          400, "invalid_request", "messages[0].content[0]: Input tag 'image_url'"),
    "no_messages": ({"messages": []}, 400, "invalid_request", "messages"),
    "n_above_one": ({"messages": _user({"type": "text", "text": "hi"}), "n": 2}, 400, "invalid_request", "n"),
    "too_many_stops": ({"messages": _user({"type": "text", "text": "hi"}), "stop": list("abcde")},
                       400, None, "at most 4 stop"),
    "body_over_the_limit": ({"messages": _user(audio_part(encoded(tone(9.0))))},
                            413, "request_too_large", "over the server's limit"),
}


def assert_openai_error(body: dict, code: str | None, words: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert words in body["error"]["message"], body


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server, kind):
    request, status, code, words = BAD_REQUESTS[kind]
    body = {"model": "blsp", "max_tokens": 4, **request}
    got, _, answer = server.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                                    {"Content-Type": "application/json"})
    assert got == status, answer
    assert_openai_error(answer, code, words)
    # the official client sees the same error
    with pytest.raises(openai.APIStatusError) as err:
        server.client(max_retries=0).chat.completions.create(**body)
    assert err.value.status_code == status and err.value.body["code"] == code
    reply = server.client().chat.completions.create(model="blsp", messages=speech_question(), max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_malformed_requests_get_openai_errors(server):
    status, _, body = server.request("POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json", body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, _, body = server.request("GET", "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    # a chunked body (no Content-Length) over the limit is refused as well
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    big = (b"x" * 65536 for _ in range(8))
    conn.request("POST", "/v1/chat/completions", body=big, encode_chunked=True,
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert server.request("GET", "/health")[0] == 200


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> tuple[re.Match, list[str]]:
    """The first line of the process's output that matches; a reader thread keeps it from blocking."""
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
            if re.search(pattern, line):
                found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), "".join(lines)
    return next(m for m in map(lambda l: re.search(pattern, l), lines) if m), lines


def test_blsp_serve_command_serves_until_interrupted(saved_model, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "blsp.cli", "serve", "--model", str(saved_model), "--port", "0",
                             "--served-model-name", "tiny"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        match, lines = wait_for_line(proc, r"on http://127\.0\.0\.1:(\d+)/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{match[1]}/v1", api_key="unused")
        # The socket listens before uvicorn serves: early connections wait in its backlog.
        assert [m.id for m in client.models.list()] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=speech_question(), max_tokens=3)
        assert reply.choices[0].message.role == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0, "".join(lines)


def test_blsp_serve_refuses_a_missing_model_and_a_taken_port(tmp_path, capsys, saved_model):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "not a blsp checkpoint" in capsys.readouterr().err
    taken = listen("127.0.0.1", 0)
    taken.listen()
    try:
        assert main(["serve", "--model", str(saved_model), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert err.startswith("blsp: error: cannot listen on 127.0.0.1:") and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# The web page in headless Chromium
# ----------------------------------------------------------------------------------------------
def test_web_page_uploads_records_and_streams_a_conversation(server, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    upload = speak("hello world", tmp_path / "hello.wav")
    microphone = speak("what is the weather like", tmp_path / "mic.wav", voice="kal")
    answers = "[data-testid=msg-assistant][data-state=done]"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}",
        ])
        try:
            page = browser.new_context(permissions=["microphone"]).new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            # turn 1: an uploaded file and a picked task
            page.select_option("[data-testid=task]", "transcribe")
            assert page.input_value("[data-testid=instruction]") == task_instruction("transcribe")
            page.set_input_files("[data-testid=file]", str(upload))
            page.wait_for_selector("#pending.ready")
            page.click("[data-testid=send]")
            page.wait_for_selector(answers, timeout=60_000)
            # turn 2: a recording from the (fake) microphone and a typed instruction
            page.select_option("[data-testid=task]", "")
            page.fill("[data-testid=instruction]", "what is this")
            page.click("[data-testid=record]")
            page.wait_for_timeout(1500)
            page.click("[data-testid=record]")
            page.wait_for_selector("#pending.ready", timeout=30_000)
            page.click("[data-testid=send]")
            page.wait_for_function(f"document.querySelectorAll('{answers}').length == 2", timeout=60_000)
            shown = page.locator(answers).all_inner_texts()
            history = page.evaluate("window.blspChat.history")
            page.screenshot(path=str(tmp_path / "serving-page.png"), full_page=True)
        finally:
            browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "serving-page.png", ARTIFACTS / "serving-page.png")
    assert not errors
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    first, second = history[0]["content"], history[2]["content"]
    assert first[0] == {"type": "text", "text": task_instruction("transcribe")}
    assert [p["type"] for p in second] == ["text", "input_audio"] and second[1]["input_audio"]["format"] == "wav"
    recorded = decode_audio(base64.b64decode(second[1]["input_audio"]["data"]), "recording")
    assert len(recorded) > 16000 * 0.5 and np.abs(recorded).max() > 0.01  # about 1.5 s of real signal
    # what the page streamed is what the API answers to the same conversation
    client = server.client()
    for k, text in zip((1, 3), shown):
        reply = client.chat.completions.create(model="blsp", messages=history[:k], max_tokens=128)
        assert reply.choices[0].message.content == text == history[k]["content"]


# ----------------------------------------------------------------------------------------------
# The load test
# ----------------------------------------------------------------------------------------------
def test_load_test_runs_both_modes_and_loses_no_request(saved_model, tmp_path):
    out = tmp_path / "serve_load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--model", str(saved_model), "--clients", "3",
         "--duration", "2", "--max-tokens", "4", "--max-batch-size", "3", "--min-speedup", "0", "--output", str(out)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    modes = report["modes"]
    for mode in modes.values():
        assert mode["completed"] > 0 and mode["failed"] == 0 and mode["lost"] == 0, mode
        assert mode["latency_p50_s"] <= mode["latency_p99_s"] and mode["ttft_p50_s"] <= mode["latency_p99_s"]
    assert set(modes["one_at_a_time"]["server_batches"]) == {"1"}
    assert report["speedup_requests_per_s"] > 0 and report["passed"]
    assert "batched / one at a time" in proc.stdout
