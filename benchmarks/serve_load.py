"""Load test of `blsp serve`: N concurrent clients for a fixed time, batched against one at a time.

Starts the real server (`python -m blsp.cli serve`, loopback, a free port) twice on the same
model: with `--max-batch-size 1` (one request at a time) and with batching. In each, N client
threads send streamed speech chat requests through the official `openai` client for
`--duration` seconds, then wait for the requests in flight. Every request must come back
complete (a finish reason, no error): failures and lost requests are counted and fail the run.

Reports requests/s, p50/p99 latency, p50/p99 time to first token, generated tokens/s and the
batch sizes the server ran, per mode, the batched/one-at-a-time ratio of requests/s, and writes
it all as JSON.

    python benchmarks/serve_load.py                         # fresh adapter on the packaged models
    python benchmarks/serve_load.py --model runs/demo/adapter --clients 8 --duration 30
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "the weather will be sunny tomorrow",
    "please book a table for two at seven",
    "how far is the station from here",
    "i would like a cup of tea",
    "the meeting has been moved to friday",
    "turn off the lights in the kitchen",
]
INSTRUCTIONS = [
    "Write down the following speech word for word, and nothing else.",
    "Continue the following text in a coherent and engaging style with less than 40 words.",
    "",
]


@dataclass
class Outcome:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    completion_tokens: int = 0
    error: str = ""


@dataclass
class ModeResult:
    max_batch_size: int
    sent: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    wall_s: float = 0.0
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    server_batches: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------
def speech_clips(out_dir: Path) -> list[bytes]:
    """Spoken sentences (Debian's flite) as WAV bytes; tones when flite is not installed."""
    clips = []
    for k, sentence in enumerate(SENTENCES):
        path = out_dir / f"clip{k}.wav"
        if shutil.which("flite"):
            subprocess.run(["flite", "-voice", ["slt", "kal", "rms"][k % 3], "-t", sentence, "-o", str(path)], check=True)
        else:
            t = np.arange(int(16000 * (1.0 + 0.3 * k))) / 16000
            sf.write(path, 0.3 * np.sin(2 * np.pi * (200 + 80 * k) * t), 16000)
        clips.append(path.read_bytes())
    return clips


def requests_for(clips: list[bytes]) -> list[list[dict]]:
    """A fixed mix of conversations; every client cycles through the same list in both modes."""
    out = []
    for k, clip in enumerate(clips):
        instruction = INSTRUCTIONS[k % len(INSTRUCTIONS)]
        parts = [{"type": "text", "text": instruction}] if instruction else []
        parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": "wav"}})
        out.append([{"role": "user", "content": parts}])
    return out


def one_request(client, model: str, messages: list[dict], max_tokens: int) -> Outcome:
    start = time.perf_counter()
    ttft, tokens, finish = None, 0, None
    try:
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.delta.content and ttft is None:
                    ttft = time.perf_counter() - start
                finish = choice.finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as err:  # counted, reported, and the run fails
        return Outcome(False, time.perf_counter() - start, error=f"{type(err).__name__}: {err}")
    if finish is None:
        return Outcome(False, time.perf_counter() - start, error="the stream ended without a finish reason")
    return Outcome(True, time.perf_counter() - start, ttft, tokens)


# ----------------------------------------------------------------------------------------------
# One mode: a server, N clients, a fixed time
# ----------------------------------------------------------------------------------------------
class ServerProcess:
    """`blsp serve` in a child process on a free loopback port; `hostile_soak.py` subclasses it."""

    def __init__(self, model_dir: str, max_batch_size: int, clients: int, log_path: Path, threads: int | None,
                 batch_wait_ms: float):
        self._start(model_dir, ["--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(batch_wait_ms),
                                "--max-queue", str(4 * clients), "--timeout", "600"], log_path, threads)

    def _start(self, model_dir: str, flags: list[str], log_path: Path, threads: int | None) -> None:
        """Starts the server with `flags` after the model and port, and waits for its URL."""
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "blsp.cli", "serve", "--model", model_dir, "--port", "0", *flags]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.url = self._wait_for_url()

    def _wait_for_url(self, timeout: float = 300) -> str:
        found: list[str] = []
        ready = threading.Event()

        def pump():  # keeps the pipe drained for the server's whole life
            for line in iter(self.proc.stdout.readline, ""):
                self.log.write(line)
                self.log.flush()
                match = re.search(r"on (http://[\d.]+:\d+)/", line)
                if match and not found:
                    found.append(match[1])
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise SystemExit(f"the server did not start; see {self.log.name}")
        return found[0]

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=30) as resp:
            return json.load(resp)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_mode(model_dir: str, max_batch_size: int, args, conversations, log_dir: Path) -> ModeResult:
    import openai

    server = ServerProcess(model_dir, max_batch_size, args.clients, log_dir / f"server-batch{max_batch_size}.log",
                           args.server_threads, args.batch_wait_ms)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        one_request(client, "blsp", conversations[0], args.max_tokens)  # warm-up, not counted
        before = server.health()
        outcomes: list[Outcome] = []
        lock, sent = threading.Lock(), [0]
        start = time.perf_counter()
        stop_at = start + args.duration

        def client_loop(k: int) -> None:
            own = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
            i = k
            while time.perf_counter() < stop_at:
                with lock:
                    if sent[0] >= args.max_requests:
                        return
                    sent[0] += 1
                outcome = one_request(own, "blsp", conversations[i % len(conversations)], args.max_tokens)
                with lock:
                    outcomes.append(outcome)
                i += 1

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        after = server.health()
    finally:
        server.stop()
    return summarize(max_batch_size, sent[0], outcomes, wall, batch_counts(before, after))


def batch_counts(before: dict, after: dict) -> dict:
    """Batches the server ran during the measurement (the warm-up excluded), by size."""
    return {size: n - before["batch_sizes"].get(size, 0) for size, n in after["batch_sizes"].items()
            if n - before["batch_sizes"].get(size, 0) > 0}


def summarize(max_batch_size: int, sent: int, outcomes: list[Outcome], wall: float, batches: dict) -> ModeResult:
    good = [o for o in outcomes if o.ok]
    latencies = [o.latency for o in good]
    ttfts = [o.ttft for o in good if o.ttft is not None]
    return ModeResult(
        max_batch_size=max_batch_size, sent=sent, completed=len(good), failed=len(outcomes) - len(good),
        lost=sent - len(outcomes), wall_s=round(wall, 2), requests_per_s=round(len(good) / wall, 3),
        tokens_per_s=round(sum(o.completion_tokens for o in good) / wall, 1),
        latency_p50_s=round(percentile(latencies, 50), 3), latency_p99_s=round(percentile(latencies, 99), 3),
        ttft_p50_s=round(percentile(ttfts, 50), 3), ttft_p99_s=round(percentile(ttfts, 99), 3),
        server_batches=batches, errors=sorted({o.error for o in outcomes if not o.ok})[:5],
    )


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def fresh_adapter(out_dir: Path) -> str:
    """An untrained adapter on the packaged Whisper base and SmolLM2: the same compute as a trained one."""
    sys.path.insert(0, str(REPO))
    from blsp.modeling import BlspModel

    path = out_dir / "adapter"
    BlspModel.from_components("whisper-base", "smollm2-135m-instruct", seed=0).save_pretrained(path)
    return str(path)


def run_record(args) -> dict:
    """The report's settings and machine, as every serving benchmark writes them (hostile_soak.py too)."""
    return {
        "settings": {**vars(args), "model": args.model or "fresh adapter: whisper-base + smollm2-135m-instruct"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
    }


def print_table(results: dict[str, ModeResult]) -> None:
    cols = ["requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s",
            "completed", "failed", "lost"]
    print(f"{'mode':16}" + "".join(f"{c:>15}" for c in cols))
    for name, r in results.items():
        print(f"{name:16}" + "".join(f"{getattr(r, c):>15}" for c in cols))
        print(f"{'':16}server batches (size: count): {r.server_batches}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an adapter directory (default: a fresh one on the packaged models)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--duration", type=float, default=60.0, help="seconds each mode sends new requests")
    p.add_argument("--max-requests", type=int, default=2000, help="per mode, whatever the duration")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8, help="of the batched mode")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="the server's --batch-wait-ms")
    p.add_argument("--server-threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the server (default: torch's, one per core); 1 on a shared machine")
    p.add_argument("--min-speedup", type=float, default=2.0, help="fail below this batched/one-at-a-time ratio")
    p.add_argument("--output", default=str(REPO / "runs" / "bench" / "serve_load.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model or fresh_adapter(tmp)
        conversations = requests_for(speech_clips(tmp))
        results = {}
        for name, batch in (("one_at_a_time", 1), ("batched", args.max_batch_size)):
            print(f"{name}: max batch {batch}, {args.clients} clients for {args.duration:.0f} s ...", flush=True)
            results[name] = run_mode(model_dir, batch, args, conversations, output.parent)
    speedup = results["batched"].requests_per_s / max(results["one_at_a_time"].requests_per_s, 1e-9)
    clean = all(r.failed == 0 and r.lost == 0 for r in results.values())
    report = {
        **run_record(args),
        "modes": {name: asdict(r) for name, r in results.items()},
        "speedup_requests_per_s": round(speedup, 2),
        "passed": clean and speedup >= args.min_speedup,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"batched / one at a time: {speedup:.2f}x requests/s (needs >= {args.min_speedup}x); "
          f"failed or lost requests: {sum(r.failed + r.lost for r in results.values())}")
    print(f"results: {output}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
