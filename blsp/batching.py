"""Generation for many concurrent users: a bounded queue, gathered into batches, run by one thread.

A request's audio is encoded by a thread of its own (one 30 s piece per request in each encoder
batch, so that minutes of one request's audio do not hold the others), and requests arriving
within a few milliseconds of each other (and all that queued up while the previous batch ran)
are generated in one `generate` call, left padded (`generate_from_examples`); padding never
changes an answer, so a request gets the same text alone or in a batch. Each row keeps its own
limits inside the shared call: its token budget, stop strings, temperature and top-p, its
deadline, and whether its client went away.

Nothing here knows about HTTP: a job reports `Started`, `Delta`, `Finished` or `Failed` events
through a callback, and errors carry the HTTP status and the OpenAI error code they map to.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .audio import split_for_encoder
from .errors import BlspError
from .features import encode_waveforms
from .inference import (_as_waveform, context_window, conversation_examples, generate_from_examples, prompt_length,
                        split_conversation)
from .processing import Example
from .prompts import AudioSlot, Piece

log = logging.getLogger(__name__)


class ServingError(BlspError):
    """A request the server refuses or could not finish, with its HTTP status and OpenAI error code."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def timeout_error() -> ServingError:
    return ServingError(504, "the request did not finish within the server's per-request timeout",
                        code="timeout", type="timeout_error")


def encoding_error() -> ServingError:
    """What a request is answered when a bug in the encoding stage fails it (logged with its traceback)."""
    return ServingError(500, "internal error while encoding the audio", type="server_error")


# ----------------------------------------------------------------------------------------------
# Jobs and their events
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" | "length", as OpenAI's
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: ServingError


Event = Union[Started, Delta, Finished, Failed]


@dataclass(eq=False)  # a request is itself: compared by identity, never field by field (its clips are arrays)
class Job:
    """One request: a conversation (content parts as `blsp.inference` takes them) and its decoding.

    `max_tokens=None` lets the answer take what the context window leaves, up to the engine's
    default. `temperature=0` is greedy. `emit` is called from the engine's thread.
    """

    conversation: list[dict]
    emit: Callable[[Event], None]
    deadline: float  # time.monotonic() by which the answer must be done
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by `BatchingEngine.prepare` in the request's own thread: the rendered prompt and the 16 kHz
    # clips of its audio slots; then by the encoding stage: the example to generate from.
    prompt: list[Piece] | None = None
    clips: list[np.ndarray] = field(default_factory=list)
    example: Example | None = None

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) > self.deadline


@dataclass(frozen=True)
class EngineOptions:
    max_batch_size: int = 8
    batch_wait_s: float = 0.01  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting beyond the running batch; more are refused (503)
    default_max_tokens: int = 256
    # ... and up to this long while requests are arriving (received, audio being decoded) or fewer
    # have come than the batch that just finished held: under load, the clients a batch answered
    # send again within tens of milliseconds, and a batch started without them leaves them to run
    # in a small batch of their own after it (measured with 8 clients on 2 cores: batches of 1 to 8
    # with the fixed wait alone, all of 8 with this).
    max_batch_wait_s: float = 0.25
    # Prompt tokens (text and speech vectors) a request may take; None: the LLM's context window.
    max_prompt_tokens: int | None = None


# ----------------------------------------------------------------------------------------------
# Per-row control inside one `generate` call
# ----------------------------------------------------------------------------------------------
class RowSampling(LogitsProcessor):
    """Each row's own temperature and top-p; a row with temperature 0 keeps only its argmax.

    `generate` applies one temperature to a whole batch; with this processor (and `generate`'s
    own warpers switched off) greedy and sampled requests share a batch, the greedy rows getting
    exactly their argmax.
    """

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float]):
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        temps = self.temperatures.to(scores.device)
        top_ps = self.top_ps.to(scores.device)
        scaled = scores / temps.clamp(min=1e-5)[:, None]
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token once the ones before it already cover top_p; the most likely always stays.
        drop = (probs.cumsum(dim=-1) - probs) > top_ps[:, None]
        nucleus = torch.full_like(scores, -float("inf")).scatter(1, order, ordered.masked_fill(drop, -float("inf")))
        argmax_only = torch.full_like(scores, -float("inf")).scatter(1, scores.argmax(dim=-1, keepdim=True), 0.0)
        return torch.where((temps == 0)[:, None], argmax_only, nucleus)


@dataclass(eq=False)
class Row:
    job: Job
    example: Example
    prompt_tokens: int
    budget: int  # new tokens this row may generate
    ids: list[int] = field(default_factory=list)
    generated: int = 0  # tokens generated, the closing end-of-turn token included
    sent: str = ""  # text already emitted
    done: bool = False


class BatchControl(StoppingCriteria):
    """Streams each row's new text and stops rows one by one, called by `generate` every step.

    A stopping criterion sees every step's tokens before the next step runs, for the whole batch
    (transformers' streamers take one sequence, and are called after the stop decision in some
    versions), so one object decodes, emits and decides: a row stops at an end-of-turn token,
    a stop string, its own token budget, its deadline, or when its client went away. Finished
    rows get padding from `generate` and are ignored here.
    """

    def __init__(self, rows: list[Row], tokenizer, stop_ids: Sequence[int]):
        self.rows = rows
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        now = time.monotonic()
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not row.done:
                self._advance(row, token, now)
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)

    def _advance(self, row: Row, token: int, now: float) -> None:
        row.generated += 1
        if token in self.stop_ids:
            self._finish(row, "stop")
            return
        row.ids.append(token)
        text = self._text(row)
        cut = _first_stop(text, row.job.stop)
        if cut is not None:
            self._finish(row, "stop", text[:cut])
        elif row.job.cancelled.is_set():
            row.done = True  # nobody is listening any more
        elif row.job.expired(now):
            row.done = True
            row.job.emit(Failed(timeout_error()))
        elif row.generated >= row.budget:
            self._finish(row, "length", text)
        else:
            self._send(row, text[:_safe_length(text, row.job.stop)])

    def _send(self, row: Row, text: str) -> None:
        if len(text) > len(row.sent):
            row.job.emit(Delta(text[len(row.sent):]))
            row.sent = text

    def _text(self, row: Row) -> str:
        # Leading whitespace is dropped as `generate_from_examples` strips it.
        return self.tokenizer.decode(row.ids, skip_special_tokens=True).lstrip()

    def _finish(self, row: Row, reason: str, text: str | None = None) -> None:
        row.done = True
        final = (self._text(row) if text is None else text).rstrip()
        self._send(row, final)
        row.job.emit(Finished(final, reason, row.prompt_tokens, row.generated))

    def close(self) -> None:
        """Rows still open when `generate` returned reached the batch's longest budget."""
        for row in self.rows:
            if not row.done and not row.job.cancelled.is_set():
                self._finish(row, "length")


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent now: not trailing whitespace (it is stripped if the answer
    ends there), not a half-decoded character, not the start of what may become a stop string."""
    safe = len(text.rstrip().rstrip("\ufffd"))
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, safe), 0, -1):
            if text[:safe].endswith(stop[:k]):
                held = max(held, k)
                break
    return safe - held


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class BatchStats:
    """Counts of the batches run, for /health and for the tests and the load test."""

    def __init__(self):
        self._lock = threading.Lock()
        self.sizes: Counter[int] = Counter()

    def record(self, size: int) -> None:
        with self._lock:
            self.sizes[size] += 1

    def snapshot(self) -> dict:
        with self._lock:
            sizes = dict(sorted(self.sizes.items()))
        return {"batches": sum(sizes.values()), "requests": sum(k * v for k, v in sizes.items()),
                "largest_batch": max(sizes, default=0), "batch_sizes": {str(k): v for k, v in sizes.items()}}


@dataclass(eq=False)  # found and removed by identity: its pieces are arrays, which numpy will not compare
class Encoding:
    """A job in the encoding stage: its clips cut into Whisper's 30 s pieces, one encoded per batch."""

    job: Job
    pieces: list[tuple[int, np.ndarray]]  # (clip index, samples), in order
    done: list[torch.Tensor] = field(default_factory=list)  # features of the first len(done) pieces
    soon: bool = False  # counted in the engine's `_encoding_soon`

    def left(self) -> int:
        return len(self.pieces) - len(self.done)

    def features(self) -> list[torch.Tensor]:
        """Each clip's features: its pieces' concatenated (as `encode_waveforms` does for a long clip)."""
        by_clip: dict[int, list[torch.Tensor]] = {}
        for (clip, _), feats in zip(self.pieces, self.done):
            by_clip.setdefault(clip, []).append(feats)
        return [torch.cat(by_clip[clip]) for clip in sorted(by_clip)]


class BatchingEngine:
    """Two threads: one encodes the speech of submitted jobs, one generates the encoded in batches.

    Everything a request's size decides is kept off the generation thread: its audio is decoded
    and its prompt tokenised in the request's own thread (`prepare`, with limits checked before
    the work), and its clips are encoded here in a thread of their own, one 30 s piece per job per
    encoder batch, so a request with minutes of audio delays another by one piece, not by all of
    its own; the job's deadline and its client's departure are checked between pieces.
    """

    def __init__(self, model, options: EngineOptions = EngineOptions()):
        self.model = model
        self.options = options
        self.context_window = context_window(model)
        self.max_prompt_tokens = min(options.max_prompt_tokens or self.context_window, self.context_window)
        self.stats = BatchStats()
        self._queue: queue.Queue[Job] = queue.Queue()  # encoded, waiting for a generation batch
        self._to_encode: queue.Queue[Encoding] = queue.Queue()
        self._lock = threading.Lock()
        self._arriving = 0  # requests received and not yet submitted (see `arrival`)
        self._waiting = 0  # submitted and not yet in a generation batch: encoding or queued
        self._encoding_soon = 0  # jobs whose encoding ends with the encoder's next batch
        self._last_batch = (0, 0.0)  # (size, time.monotonic() it ended)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._loop, name="blsp-batching", daemon=True),
                         threading.Thread(target=self._encoding_loop, name="blsp-encoding", daemon=True)]
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)

    def queued(self) -> int:
        """Requests submitted and not yet generating (being encoded or waiting for a batch)."""
        return self._waiting

    def _busy(self) -> ServingError:
        return ServingError(503, f"the server is busy ({self.options.max_queue} requests waiting); retry shortly",
                            code="server_busy", type="server_error")

    @contextmanager
    def arrival(self):
        """Marks a request being prepared (its audio decoded) to submit: a batch waits for it.

        The queue's bound counts these too, and is checked here, before any of the request's
        work: a flood is answered 503 without decoding what it sent.
        """
        with self._lock:
            if self._arriving + self._waiting >= self.options.max_queue:
                raise self._busy()
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    # -- the request's side ----------------------------------------------------------------------
    def prepare(self, job: Job) -> None:
        """Render the job's prompt and take out its clips; run in the request's thread, not here.

        Text is measured before it is tokenised (more characters than the prompt limit times the
        vocabulary's longest token cannot fit), and tokenised text before any audio is encoded.
        """
        messages, audios = split_conversation(job.conversation)
        prompt = self.model.processor.prompt
        chars = sum(len(text) for text in _texts(messages))
        if chars > self.max_prompt_tokens * prompt.longest_token or len(messages) > self.max_prompt_tokens:
            raise self._context_error(f"more than {self.max_prompt_tokens} tokens ({len(messages)} messages, "
                                      f"{chars} characters of text)")
        job.prompt = prompt.render(messages)
        text_tokens = sum(len(piece) for piece in job.prompt if not isinstance(piece, AudioSlot))
        if text_tokens > self.max_prompt_tokens:
            raise self._context_error(f"{text_tokens} tokens of text")
        job.clips = [_as_waveform(part["audio"]) for part in audios]

    def submit(self, job: Job) -> None:
        """Queue a job (prepared here if it was not): to the encoder if it has speech, else to generation."""
        if job.prompt is None:
            self.prepare(job)
        encoding = Encoding(job, [(i, piece) for i, clip in enumerate(job.clips) for piece in split_for_encoder(clip)])
        if not encoding.pieces:
            self._check_prompt(job, Example(pieces=job.prompt))
        with self._lock:
            if self._waiting >= self.options.max_queue:
                raise self._busy()
            self._waiting += 1
        if encoding.pieces:
            self._mark_soon(encoding)
            self._to_encode.put(encoding)
        else:
            job.example = Example(pieces=job.prompt)
            self._queue.put(job)

    def _context_error(self, needs: str, asked: int | None = None) -> ServingError:
        wanted = f" plus max_tokens {asked}" if asked is not None else ""
        limit = (f"the model's context window of {self.context_window} tokens"
                 if self.max_prompt_tokens == self.context_window
                 else f"the server's limit of {self.max_prompt_tokens} prompt tokens")
        return ServingError(400, f"this conversation needs {needs}{wanted}, more than {limit}; shorten the "
                                 "conversation or its audio", code="context_length_exceeded", param="messages")

    def _check_prompt(self, job: Job, example: Example) -> tuple[int, int]:
        """(prompt tokens, new tokens the answer may take), or the error that refuses the job."""
        n = prompt_length(self.model, example)
        if n > self.max_prompt_tokens:
            raise self._context_error(f"{n} tokens")
        return n, self._budget(job, n)

    def _budget(self, job: Job, prompt_tokens: int) -> int:
        room = self.context_window - prompt_tokens
        asked = job.max_tokens
        if room <= 0 or (asked is not None and asked > room):
            raise self._context_error(f"{prompt_tokens} tokens", asked)
        return asked if asked is not None else min(self.options.default_max_tokens, room)

    # -- the encoding stage ----------------------------------------------------------------------
    def _mark_soon(self, encoding: Encoding, leaving: bool = False) -> None:
        """Keep count of the jobs whose encoding ends with the next encoder batch (a generation
        batch waits for them as for requests arriving)."""
        soon = not leaving and encoding.left() <= 1
        if soon != encoding.soon:
            with self._lock:
                self._encoding_soon += 1 if soon else -1
            encoding.soon = soon

    def _leave(self, n: int = 1) -> None:
        with self._lock:
            self._waiting -= n

    def _encoding_loop(self) -> None:
        active: deque[Encoding] = deque()
        while not self._stopping.is_set():
            try:
                self._encoding_step(active)
            except Exception:  # a bug must fail the requests it holds, never end the stage: all later ones would hang
                log.exception("the encoding stage failed with %d requests in it", len(active))
                for encoding in list(active):
                    self._fail(active, encoding, encoding_error())

    def _encoding_step(self, active: deque[Encoding]) -> None:
        """Take the jobs submitted since, encode the next piece of up to a batch of them, and send
        on those whose every piece is encoded."""
        self._take_new(active)
        self._drop_unwanted(active)
        if not active:
            return
        batch = [active[i] for i in range(min(len(active), self.options.max_batch_size))]
        active.rotate(-len(batch))  # round robin: the next batch starts with the jobs this one left out
        try:
            self._encode_pieces(batch)
        except Exception:  # a bug must fail these requests, not the server
            log.exception("encoding a batch of %d failed", len(batch))
            for encoding in batch:
                self._fail(active, encoding, encoding_error())
            return
        for encoding in batch:
            if encoding.job.cancelled.is_set() or encoding.left() == 0:
                self._finish_encoding(active, encoding)
            else:
                self._mark_soon(encoding)

    def _take_new(self, active: deque[Encoding]) -> None:
        """Jobs submitted since the last batch; waits a moment for one when there is nothing to do."""
        try:
            active.append(self._to_encode.get(timeout=0.1) if not active else self._to_encode.get_nowait())
            while True:
                active.append(self._to_encode.get_nowait())
        except queue.Empty:
            pass

    def _drop_unwanted(self, active: deque[Encoding]) -> None:
        now = time.monotonic()
        for encoding in list(active):
            if encoding.job.cancelled.is_set():
                self._remove(active, encoding)
            elif encoding.job.expired(now):
                self._fail(active, encoding, timeout_error())

    def _encode_pieces(self, batch: list[Encoding]) -> None:
        """The next piece of each job in one encoder pass; a piece the encoder refuses fails its job alone."""
        samples = [encoding.pieces[len(encoding.done)][1] for encoding in batch]
        try:
            features = encode_waveforms(self.model, samples)
        except (BlspError, ValueError):
            features = []
            for encoding, piece in zip(batch, samples):
                try:
                    features += encode_waveforms(self.model, [piece])
                except (BlspError, ValueError) as err:
                    features.append(None)
                    encoding.job.emit(Failed(ServingError(400, str(err), code="invalid_audio")))
                    encoding.job.cancelled.set()  # answered: the stage drops it
        for encoding, feats in zip(batch, features):
            if feats is not None:
                encoding.done.append(feats)

    def _finish_encoding(self, active: deque[Encoding], encoding: Encoding) -> None:
        job = encoding.job
        if job.cancelled.is_set():
            self._remove(active, encoding)
            return
        example = Example(pieces=job.prompt, features=encoding.features())
        try:
            self._check_prompt(job, example)
        except ServingError as err:
            self._fail(active, encoding, err)
            return
        job.example, job.clips = example, []  # the samples are not needed any more
        self._remove(active, encoding, still_waiting=True)
        self._queue.put(job)

    def _remove(self, active: deque[Encoding], encoding: Encoding, still_waiting: bool = False) -> None:
        active.remove(encoding)
        self._mark_soon(encoding, leaving=True)
        if not still_waiting:
            self._leave()

    def _fail(self, active: deque[Encoding], encoding: Encoding, error: ServingError) -> None:
        self._remove(active, encoding)
        encoding.job.emit(Failed(error))

    # -- the generation loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            jobs = self._gather()
            if not jobs:
                continue
            try:
                self.run_batch(jobs)
                self._last_batch = (len(jobs), time.monotonic())
            except Exception:  # a bug must fail these requests, not the server
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    job.emit(Failed(ServingError(500, "internal error while generating", type="server_error")))

    def _gather(self) -> list[Job]:
        """Block for a first job, then take more until the batch is full or waiting is over."""
        try:
            jobs = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        start = time.monotonic()
        last_size, last_end = self._last_batch
        expected = last_size if start - last_end < 1.0 else 1  # recent clients come back
        while len(jobs) < self.options.max_batch_size:
            try:
                jobs.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            waited = time.monotonic() - start
            company_due = self._arriving > 0 or self._encoding_soon > 0 or len(jobs) < expected
            if waited >= self.options.batch_wait_s and not (company_due and waited < self.options.max_batch_wait_s):
                break
            try:
                jobs.append(self._queue.get(timeout=0.002))
            except queue.Empty:
                pass
        self._leave(len(jobs))
        return jobs

    def run_batch(self, jobs: list[Job]) -> None:
        live = self._still_wanted(jobs)
        ready = [job for job in live if job.example is not None]
        raw = [job for job in live if job.example is None]  # not through the encoding stage (direct use)
        examples = [job.example for job in ready]
        if raw:
            try:
                raw_examples = conversation_examples(self.model, [job.conversation for job in raw])
            except (BlspError, ValueError):
                # One request's audio failed the encoder: find it, without failing the others.
                raw, raw_examples = self._examples_one_by_one(raw)
            examples += raw_examples
        rows = self._rows(ready + raw, examples)
        if rows:
            self.stats.record(len(rows))
            self._generate(rows)

    def _still_wanted(self, jobs: list[Job]) -> list[Job]:
        now, live = time.monotonic(), []
        for job in jobs:
            if job.cancelled.is_set():
                continue
            if job.expired(now):
                job.emit(Failed(timeout_error()))
                continue
            live.append(job)
        return live

    def _examples_one_by_one(self, jobs: list[Job]) -> tuple[list[Job], list[Example]]:
        kept, examples = [], []
        for job in jobs:
            try:
                examples += conversation_examples(self.model, [job.conversation])
                kept.append(job)
            except (BlspError, ValueError) as err:
                job.emit(Failed(ServingError(400, str(err), code="invalid_audio")))
        return kept, examples

    def _rows(self, jobs: list[Job], examples: list[Example]) -> list[Row]:
        rows = []
        for job, example in zip(jobs, examples):
            try:
                n, budget = self._check_prompt(job, example)
            except ServingError as err:
                job.emit(Failed(err))
                continue
            job.emit(Started(n))
            rows.append(Row(job, example, n, budget))
        return rows

    def _generate(self, rows: list[Row]) -> None:
        proc = self.model.processor
        control = BatchControl(rows, proc.tokenizer, proc.stop_ids())
        sampling = any(row.job.temperature > 0 for row in rows)
        extra = {}
        if sampling:
            # Per-row temperature and top-p replace generate's batch-wide warpers (top_k=0: none).
            extra = {"logits_processor": LogitsProcessorList([RowSampling(
                [r.job.temperature for r in rows], [r.job.top_p for r in rows])]), "top_k": 0}
        generate_from_examples(
            self.model, [row.example for row in rows], max_new_tokens=max(row.budget for row in rows),
            do_sample=sampling, stopping_criteria=StoppingCriteriaList([control]), **extra,
        )
        control.close()


def _texts(messages: list[dict]):
    """The text of messages as `split_conversation` leaves them (string contents, text parts)."""
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            yield content
        else:
            yield from (part["text"] for part in content if part["type"] == "text")
