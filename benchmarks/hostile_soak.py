"""Soak test of `blsp serve` under hostile traffic: normal clients alone, then the same clients
beside a hostile one, each phase on a fresh server (`python -m blsp.cli serve`, loopback, a free
port) for `--duration` seconds.

Normal traffic: `--clients` threads send streamed speech chat requests through the official
`openai` client, as `serve_load.py` does. Hostile traffic, each kind in its own thread(s):

    bomb          a FLAC of 6 hours of silence (~1 MB) as input_audio      -> 400 audio_too_long
    hidden        a FLAC whose header does not state its length            -> 400 invalid_audio
    long_audio    four 295 s MP3s in one request (the issue's 7 MB case)   -> 400 audio_too_long
    huge_text     a 24 MB text message                                     -> 400 context_length_exceeded
    slow_body     half a body, then nothing                                -> 408 after --body-timeout
    disconnect    a speech request whose client hangs up (plain and streamed): no answer wanted
    flood         every --flood-every s, --flood-size concurrent junk requests (bad JSON, unknown
                  model, bad base64, bombs)                                -> 4xx or 503

Every request must be answered: normal ones with a complete answer (or a clean 503 `server_busy`,
counted as shed), hostile ones with their expected status (or 503). A request with no answer, a
5xx other than 503 or another status is lost. Reports, per phase: requests answered, shed and
lost; p50/p99 latency of the normal ones; the server's idle and peak RSS (VmHWM, reset after the
warm-up); per hostile kind the statuses got and how long a refusal took. Passes (exit 0) when
nothing is lost, the hostile phase's normal p99 is within `--max-p99-ratio` (1.2) of the
baseline's, and the server's peak RSS is within 1 GB of its idle RSS.

    python benchmarks/hostile_soak.py                                   # fresh adapter on the packaged models
    python benchmarks/hostile_soak.py --model runs/demo/adapter --duration 180 --server-threads 1
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (  # noqa: E402
    ServerProcess, fresh_adapter, percentile, requests_for, run_record, speech_clips)

REPO = Path(__file__).resolve().parents[1]
HOSTILE_KINDS = ("bomb", "hidden", "long_audio", "huge_text", "slow_body", "disconnect", "flood")


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------
class Server(ServerProcess):
    """serve_load's server with this soak's limits, its host and port for raw sockets, and its RSS read
    from /proc (idle and peak, to show that hostile requests cost no lasting memory)."""

    def __init__(self, model_dir: str, args, log_path: Path):
        self._start(model_dir, ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue),
                                "--body-timeout", str(args.body_timeout)], log_path, args.server_threads)
        address = urllib.parse.urlsplit(self.url)
        self.host, self.port = address.hostname, address.port

    def rss_mb(self, field_name: str = "VmRSS") -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{field_name}:\s+(\d+)", status)[1]) / 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str
    status: str  # "answered" | "refused" | "shed" | "abandoned" | "lost"
    latency: float
    detail: str = ""


def raw_request(server: Server, body: bytes, timeout: float = 300.0, path: str = "/v1/chat/completions",
                content_type: str = "application/json") -> tuple[int | None, str]:
    """(status, error code or text) of one request on its own connection; (None, reason) if no answer."""
    import http.client

    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            code = (json.loads(raw).get("error") or {}).get("code") or ""
        except (ValueError, AttributeError):
            code = raw[:80].decode(errors="replace")
        return resp.status, code
    except (OSError, http.client.HTTPException) as err:
        return None, f"{type(err).__name__}: {err}"
    finally:
        conn.close()


def chat_body(messages: list[dict], max_tokens: int = 8, model: str = "blsp") -> bytes:
    return json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens}).encode()


def audio_part(data: bytes, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def silent_flac(seconds: float) -> bytes:
    buf, minute = io.BytesIO(), np.zeros(16000 * 60, np.int16)
    with sf.SoundFile(buf, "w", 16000, 1, format="FLAC") as f:
        for _ in range(int(seconds // 60)):
            f.write(minute)
    return buf.getvalue()


def without_length(flac: bytes) -> bytes:
    data = bytearray(flac)
    data[8 + 13] &= 0xF0  # STREAMINFO's total sample count: 0, "unknown"
    data[8 + 14 : 8 + 18] = b"\0\0\0\0"
    return bytes(data)


class Payloads:
    """The hostile bodies, built once."""

    def __init__(self):
        flac = silent_flac(6 * 3600)
        buf = io.BytesIO()
        t = np.arange(295 * 16000) / 16000
        sf.write(buf, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="MP3")
        mp3 = buf.getvalue()
        user = lambda *parts: [{"role": "user", "content": list(parts)}]  # noqa: E731
        self.bodies = {
            "bomb": chat_body(user(audio_part(flac, "flac"))),
            "hidden": chat_body(user(audio_part(without_length(silent_flac(60)), "flac"))),
            "long_audio": chat_body(user(*[audio_part(mp3, "mp3")] * 4)),
            "huge_text": chat_body(user({"type": "text", "text": "the quick brown fox " * (24 * 2**20 // 20)})),
            "bad_json": b'{"model": "blsp", "messages": [',
            "unknown_model": chat_body(user({"type": "text", "text": "hi"}), model="gpt-4o"),
            "bad_base64": chat_body(user({"type": "input_audio", "input_audio": {"data": "not!", "format": "wav"}})),
        }
        self.sizes_mb = {name: round(len(body) / 2**20, 2) for name, body in self.bodies.items()}


EXPECTED = {  # kind -> statuses that count as a correct refusal (503 always counts as shed)
    "bomb": {400}, "hidden": {400}, "long_audio": {400}, "huge_text": {400}, "slow_body": {408},
    "bad_json": {400}, "unknown_model": {404}, "bad_base64": {400},
}


def classify(kind: str, status: int | None, detail: str, latency: float) -> Outcome:
    if status == 503:
        return Outcome(kind, "shed", latency, detail)
    if status in EXPECTED.get(kind, ()):
        return Outcome(kind, "refused", latency, detail)
    return Outcome(kind, "lost", latency, f"{status}: {detail}")


def normal_request(client, messages: list[dict], max_tokens: int) -> Outcome:
    import openai

    start = time.perf_counter()
    finish = None
    try:
        stream = client.chat.completions.create(model="blsp", messages=messages, max_tokens=max_tokens, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except openai.APIStatusError as err:
        status = "shed" if err.status_code == 503 else "lost"
        return Outcome("normal", status, time.perf_counter() - start, f"{err.status_code}: {err.message}")
    except Exception as err:  # no answer at all
        return Outcome("normal", "lost", time.perf_counter() - start, f"{type(err).__name__}: {err}")
    if finish is None:
        return Outcome("normal", "lost", time.perf_counter() - start, "the stream ended without a finish reason")
    return Outcome("normal", "answered", time.perf_counter() - start)


def slow_body(server: Server, wait: float) -> Outcome:
    """Headers and a tenth of the body, then nothing: the server must answer 408 and close."""
    start = time.perf_counter()
    try:
        with socket.create_connection((server.host, server.port), timeout=wait) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b" " * 10000)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError as err:
        return Outcome("slow_body", "lost", time.perf_counter() - start, f"{type(err).__name__}: {err}")
    match = re.match(rb"HTTP/1\.1 (\d+)", answer)
    return classify("slow_body", int(match[1]) if match else None, answer[:60].decode(errors="replace"),
                    time.perf_counter() - start)


def disconnect(server: Server, body: bytes, streamed: bool) -> Outcome:
    """A speech request whose client hangs up (before the answer, or after the first chunk)."""
    start = time.perf_counter()
    try:
        with socket.create_connection((server.host, server.port), timeout=60) as sock:
            if streamed:
                body = json.dumps({**json.loads(body), "stream": True}).encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            if streamed:
                sock.recv(1024)  # the headers and the first chunk, then away
            else:
                time.sleep(0.3)
    except OSError as err:
        return Outcome("disconnect", "lost", time.perf_counter() - start, f"{type(err).__name__}: {err}")
    return Outcome("disconnect", "abandoned", time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# A phase
# ----------------------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    name: str
    wall_s: float = 0.0
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    peak_over_idle_mb: float = 0.0
    normal: dict = field(default_factory=dict)
    hostile: dict = field(default_factory=dict)
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    health_after: dict = field(default_factory=dict)


def run_phase(name: str, model_dir: str, args, conversations, payloads: Payloads | None, log_dir: Path) -> PhaseResult:
    import openai

    server = Server(model_dir, args, log_dir / f"hostile_soak-{name}.log")
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def record(outcome: Outcome) -> None:
        with lock:
            outcomes.append(outcome)

    try:
        warm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        normal_request(warm, conversations[0], args.max_tokens)  # warm-up, not counted
        time.sleep(1.0)
        idle = server.rss_mb()
        server.reset_peak()
        stop_at = time.perf_counter() + args.duration
        threads = [threading.Thread(target=normal_loop, args=(server, k, conversations, args, stop_at, record))
                   for k in range(args.clients)]
        if payloads is not None:
            threads += hostile_threads(server, payloads, conversations, args, stop_at, record)
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        peak = server.rss_mb("VmHWM")
        health = server.health()
    finally:
        server.stop()
    return summarize(name, outcomes, wall, idle, peak, health)


def normal_loop(server: Server, k: int, conversations, args, stop_at: float, record) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    i = k
    while time.perf_counter() < stop_at:
        record(normal_request(client, conversations[i % len(conversations)], args.max_tokens))
        i += 1


def hostile_threads(server: Server, payloads: Payloads, conversations, args, stop_at: float, record):
    pause = args.hostile_pause

    def repeat(kind: str, send, every: float):
        def loop():
            while time.perf_counter() < stop_at:
                record(send())
                time.sleep(every)
        return threading.Thread(target=loop, name=f"hostile-{kind}")

    def refused(kind: str):
        def send():
            start = time.perf_counter()
            status, detail = raw_request(server, payloads.bodies[kind])
            return classify(kind, status, detail, time.perf_counter() - start)
        return send

    speech = chat_body(conversations[0], max_tokens=args.max_tokens)
    threads = [repeat(kind, refused(kind), pause) for kind in ("bomb", "hidden", "long_audio", "huge_text")
               if kind in args.kinds]
    if "slow_body" in args.kinds:
        threads += [repeat("slow_body", lambda: slow_body(server, args.body_timeout + 30), 0.0) for _ in range(2)]
    if "disconnect" in args.kinds:
        threads.append(repeat("disconnect", lambda: disconnect(server, speech, streamed=False), pause))
        threads.append(repeat("disconnect", lambda: disconnect(server, speech, streamed=True), pause))
    if "flood" in args.kinds:
        threads.append(threading.Thread(target=flood_loop, args=(server, payloads, args, stop_at, record)))
    return threads


def flood_loop(server: Server, payloads: Payloads, args, stop_at: float, record) -> None:
    junk = ["bad_json", "unknown_model", "bad_base64", "bomb"]
    time.sleep(min(args.flood_every / 2, max(stop_at - time.perf_counter() - 1, 0)))
    while time.perf_counter() < stop_at:
        def one(kind: str):
            start = time.perf_counter()
            status, detail = raw_request(server, payloads.bodies[kind])
            record(classify(kind, status, detail, time.perf_counter() - start))

        burst = [threading.Thread(target=one, args=(junk[i % len(junk)],)) for i in range(args.flood_size)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        time.sleep(args.flood_every)


def summarize(name: str, outcomes: list[Outcome], wall: float, idle: float, peak: float, health: dict) -> PhaseResult:
    normal = [o for o in outcomes if o.kind == "normal"]
    answered = [o.latency for o in normal if o.status == "answered"]
    hostile: dict[str, dict] = {}
    for o in outcomes:
        if o.kind == "normal":
            continue
        entry = hostile.setdefault(o.kind, {"sent": 0, "statuses": Counter(), "latencies": []})
        entry["sent"] += 1
        entry["statuses"][o.status] += 1
        entry["latencies"].append(o.latency)
    hostile_out = {kind: {"sent": e["sent"], **dict(e["statuses"]),
                          "p50_s": round(percentile(e["latencies"], 50), 3),
                          "p99_s": round(percentile(e["latencies"], 99), 3)} for kind, e in sorted(hostile.items())}
    lost = [o for o in outcomes if o.status == "lost"]
    return PhaseResult(
        name=name, wall_s=round(wall, 1), idle_rss_mb=round(idle), peak_rss_mb=round(peak),
        peak_over_idle_mb=round(peak - idle),
        normal={"sent": len(normal), "answered": len(answered), "shed": sum(o.status == "shed" for o in normal),
                "lost": sum(o.status == "lost" for o in normal), "requests_per_s": round(len(answered) / wall, 3),
                "latency_p50_s": round(percentile(answered, 50), 3),
                "latency_p99_s": round(percentile(answered, 99), 3)},
        hostile=hostile_out, lost=len(lost), lost_examples=sorted({f"{o.kind}: {o.detail}" for o in lost})[:8],
        health_after={k: health.get(k) for k in ("status", "queued", "batches", "requests")},
    )


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an adapter directory (default: a fresh one on the packaged models)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of traffic per phase")
    p.add_argument("--clients", type=int, default=4, help="normal clients")
    p.add_argument("--max-tokens", type=int, default=16, help="per normal answer")
    p.add_argument("--kinds", default=",".join(HOSTILE_KINDS), help=f"hostile kinds ({', '.join(HOSTILE_KINDS)})")
    p.add_argument("--hostile-pause", type=float, default=1.0, help="seconds between one kind's requests")
    p.add_argument("--flood-size", type=int, default=150)
    p.add_argument("--flood-every", type=float, default=30.0, help="seconds between floods")
    p.add_argument("--body-timeout", type=float, default=15.0, help="the server's --body-timeout")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--server-threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the server (default: torch's, one per core); 1 on a shared machine")
    p.add_argument("--max-p99-ratio", type=float, default=1.2, help="fail above this hostile/baseline normal p99")
    p.add_argument("--output", default=str(REPO / "runs" / "bench" / "hostile_soak.json"))
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(args.kinds) - set(HOSTILE_KINDS)
    if unknown:
        p.error(f"unknown --kinds: {', '.join(sorted(unknown))}")
    return args


def print_report(phases: dict[str, PhaseResult]) -> None:
    for r in phases.values():
        n = r.normal
        print(f"{r.name:9} normal: {n['answered']} answered, {n['shed']} shed, {n['lost']} lost; p50 "
              f"{n['latency_p50_s']} s, p99 {n['latency_p99_s']} s | RSS idle {r.idle_rss_mb} MB, peak "
              f"{r.peak_rss_mb} MB (+{r.peak_over_idle_mb}) | lost in all: {r.lost}")
        for kind, h in r.hostile.items():
            print(f"{'':9} {kind:14} {h}")
        for example in r.lost_examples:
            print(f"{'':9} lost: {example}")


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model or fresh_adapter(tmp)
        conversations = requests_for(speech_clips(tmp))
        print("building the hostile payloads ...", flush=True)
        payloads = Payloads()
        phases = {}
        for name, hostile in (("baseline", None), ("hostile", payloads)):
            print(f"{name}: {args.clients} normal clients{' and hostile traffic' if hostile else ''} for "
                  f"{args.duration:.0f} s ...", flush=True)
            phases[name] = run_phase(name, model_dir, args, conversations, hostile, output.parent)
    base, hostile = phases["baseline"].normal, phases["hostile"].normal
    ratio = hostile["latency_p99_s"] / max(base["latency_p99_s"], 1e-9)
    lost = sum(r.lost for r in phases.values())
    memory_ok = all(r.peak_over_idle_mb <= 1024 for r in phases.values())
    report = {
        **run_record(args),
        "payload_sizes_mb": payloads.sizes_mb,
        "phases": {name: asdict(r) for name, r in phases.items()},
        "normal_p99_ratio": round(ratio, 2),
        "passed": lost == 0 and ratio <= args.max_p99_ratio and memory_ok,
    }
    output.write_text(json.dumps(report, indent=2, default=dict) + "\n")
    print_report(phases)
    print(f"normal p99 with hostile traffic / without: {ratio:.2f}x (needs <= {args.max_p99_ratio}); lost: {lost}; "
          f"peak RSS within idle + 1 GB: {memory_ok}")
    print(f"results: {output}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
