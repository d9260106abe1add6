#!/usr/bin/env python
"""Warm-start speed with and without subnormal floats flushed to zero (`blsp.cpu.flush_denormals`).

    .venv/bin/python benchmarks/warm_start.py                      # 60 steps each, the demo's clips
    .venv/bin/python benchmarks/warm_start.py --data corpus/train.jsonl --steps 100

Runs the CTC warm start (`blsp.warmstart.ctc_warm_start`: the adapter and CTC head on cached
Whisper-base features, SmolLM2's embeddings as the CTC vocabulary; batch 32, lr 3e-3) from the
same seed twice, each in a fresh process, since the floating-point mode has to be set before
torch starts its threads: once with denormals flushed (what `blsp` does), once without (torch's
default). Prints seconds per step over the run and in its last third, where saturated GLU gates
have filled the gradients with subnormal numbers, and the ratios; writes
benchmarks/results/warm_start.json. Without `--data`, speaks a 100-sentence corpus with flite
first (`blsp data synth`, ~15 s) into runs/bench/warm-start-corpus.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

# benchmarks/presets.py, beside this script; it imports torch, which is harmless here: the
# floating-point mode has to be set before torch's first op, not before its import.
from presets import cpu_name

HERE = Path(__file__).parent
DEMO_TRAIN = Path("runs/demo/behavior/train.jsonl")


def child(data: str, steps: int, flush: bool) -> None:
    """One warm start in this process; prints the seconds of each step as one JSON line."""
    import torch

    flushed = torch.set_flush_denormal(flush)  # before any torch op starts the thread pool
    from blsp.data import read_manifest
    from blsp.features import FeatureCache
    from blsp.modeling import BlspModel
    from blsp.packaged import CACHE_DIR
    from blsp.warmstart import WarmStartRun, ctc_warm_start

    utterances = read_manifest(data).utterances
    model = BlspModel.from_components("whisper-base", "smollm2-135m-instruct", adapter_downsample=4, seed=0)
    cache = FeatureCache(CACHE_DIR / "features", model.config.feature_key)
    cache.fill(model, utterances)
    options = WarmStartRun(method="ctc", steps=steps, lr=3e-3, batch_size=32, seed=0)
    elapsed = [0.0] + [r["elapsed_s"] for r in ctc_warm_start(model, utterances, cache, options, show_progress=False)]
    times = [b - a for a, b in zip(elapsed, elapsed[1:])]
    print(json.dumps({"flush": flush, "flushed": flushed, "threads": torch.get_num_threads(), "step_s": times}))


def run_child(data: str, steps: int, flush: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", data, "--steps", str(steps)] + (["--flush"] if flush else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def corpus(args: argparse.Namespace) -> str:
    if args.data:
        return args.data
    if DEMO_TRAIN.is_file():
        return str(DEMO_TRAIN)
    out = Path("runs/bench/warm-start-corpus")
    from blsp.cli import main as blsp

    if blsp(["data", "synth", "--output", str(out), "--sentences", "100", "--voices-per-sentence", "1"]) != 0:
        sys.exit("warm_start: could not synthesise a corpus (is flite installed? `make system-deps`)")
    return str(out / "train.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a manifest (default: the demo's train split, else a small synth corpus)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--output", default=str(HERE / "results" / "warm_start.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--flush", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.data, args.steps, args.flush)

    data = corpus(args)
    runs = {name: run_child(data, args.steps, flush) for name, flush in (("flushed", True), ("default", False))}
    tail = args.steps - args.steps // 3
    summary = {name: {"mean_step_s": sum(r["step_s"]) / len(r["step_s"]),
                      "last_third_step_s": sum(r["step_s"][tail:]) / len(r["step_s"][tail:]),
                      "threads": r["threads"], "flush_supported": r["flushed"] if name == "flushed" else None}
               for name, r in runs.items()}
    ratio = {k: summary["default"][k] / summary["flushed"][k] for k in ("mean_step_s", "last_third_step_s")}
    print(f"warm start, {args.steps} steps of 32 clips ({data}), {cpu_name()}:")
    for name, s in summary.items():
        print(f"  {name:8}  {s['mean_step_s']:.3f} s/step over the run, {s['last_third_step_s']:.3f} in its last third")
    print(f"  flushed is {ratio['mean_step_s']:.2f}x as fast over the run, {ratio['last_third_step_s']:.2f}x in the last third")
    from blsp.io import atomic_write_json

    atomic_write_json(args.output, {"data": data, "steps": args.steps, "machine": platform.platform(),
                                    "cpu": cpu_name(), "summary": summary, "ratio_default_over_flushed": ratio,
                                    "step_s": {k: r["step_s"] for k, r in runs.items()}})


if __name__ == "__main__":
    main()
