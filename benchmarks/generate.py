#!/usr/bin/env python
"""Inference speed: time to the first token and tokens/s for one clip, and batched throughput.

    PYTHONPATH=. python benchmarks/generate.py                  # cpu preset: packaged models
    PYTHONPATH=. python benchmarks/generate.py --preset gpu --batch-size 16

Through our `BlspModel.generate` path from a 16 kHz waveform (mel, encoder on the clip's actual
length, adapter, prompt, the LLM's `generate`), greedy, with the end of turn suppressed until
`--new-tokens` (`min_new_tokens`) so every run decodes the same number of tokens whatever an
untrained adapter makes the LLM say:
- first token: the wall time of `generate(max_new_tokens=1)` for one `--clip-seconds` clip;
- tokens/s (batch 1): (new tokens - 1) / (time for new tokens - time to the first token);
- batched: new tokens x batch / time, for `--batch-size` clips of +- 20% around that length.
Median of `--repeats` runs after one warm-up run. Writes benchmarks/results/generate-<preset>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import presets
from blsp.prompts import CONTINUATION_INSTRUCTION


def timed_generate(model, clips, new_tokens: int, repeats: int, device) -> float:
    """Median seconds of `model.generate` over `clips` producing exactly `new_tokens` each."""
    times = []
    for _ in range(repeats):
        presets.sync(device)
        start = presets.now()
        model.generate(audio=clips if len(clips) > 1 else clips[0], instruction=CONTINUATION_INSTRUCTION,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        presets.sync(device)
        times.append(presets.now() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--tiny", action="store_true", help="shrink the gpu preset's models (a quick check on a CPU)")
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="default: 2 (cpu preset), 5 (gpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    device = presets.pick_device(args.device)
    repeats = args.repeats or (5 if args.preset == "gpu" and not args.tiny else 2)
    print(f"building the {args.preset} preset on {device} ...", flush=True)
    built = presets.build_model(args.preset, device, args.tiny, args.seed)
    model = built.model
    model.eval()
    print(built.description, flush=True)
    one = presets.random_clips(1, args.clip_seconds, 0.0, args.seed)
    batch = presets.random_clips(args.batch_size, args.clip_seconds, 0.2 * args.clip_seconds, args.seed + 1)

    timed_generate(model, one, 2, 1, device)  # warm-up: allocations, kernels, the mel filterbank
    first = timed_generate(model, one, 1, repeats, device)
    full = timed_generate(model, one, args.new_tokens, repeats, device)
    batched = timed_generate(model, batch, args.new_tokens, repeats, device)
    result = {
        "benchmark": "generate", "preset": args.preset + ("-tiny" if args.tiny else ""), "models": built.description,
        "device": str(device), "machine": presets.machine(device), "date": time.strftime("%Y-%m-%d"),
        "clip_seconds": args.clip_seconds, "new_tokens": args.new_tokens, "repeats": repeats,
        "time_to_first_token_s": round(first, 4),
        "tokens_per_s_batch1": round((args.new_tokens - 1) / max(full - first, 1e-9), 2),
        "seconds_batch1": round(full, 3),
        "batch_size": args.batch_size,
        "tokens_per_s_batched": round(args.new_tokens * args.batch_size / batched, 2),
        "seconds_batched": round(batched, 3),
    }
    result["batched_over_batch1_tokens_per_s"] = round(
        result["tokens_per_s_batched"] / (args.new_tokens / full), 2)
    print(f"first token {result['time_to_first_token_s']} s; batch 1: {result['tokens_per_s_batch1']} tokens/s; "
          f"batch {args.batch_size}: {result['tokens_per_s_batched']} tokens/s "
          f"({result['batched_over_batch1_tokens_per_s']}x batch 1, end to end)")
    presets.write_result(result, args.output, "generate")


if __name__ == "__main__":
    main()
