#!/usr/bin/env python
"""Step-2 training speed: samples/s of our training step against the original's way and the floor.

    PYTHONPATH=. python benchmarks/train_step.py                      # cpu preset: packaged models
    PYTHONPATH=. python benchmarks/train_step.py --preset gpu --gradient-checkpointing --unbucketed

All in this process, on the same models, clips (noise, `--clip-seconds` +- 20%) and continuations,
at the same batch size; one AdamW step on the adapter per batch in each:
- ours: `Trainer.train_step` itself (blsp.training) on features the encoder made once beforehand
  and the trainer reads from its feature cache, with its length-bucketed batches and the shared
  prompt prefix's keys and values computed once; bf16 autocast on a GPU, as `--precision auto`.
- original: the original's way: each step runs the encoder on mel padded to 30 s (3000 frames), the
  adapter on all 1500 frames, and the LLM on the prompt, all 188 speech vectors (the padded ones
  masked) and the target, with logits at every position; fp32; random batches. Mel extraction
  is left out of its time (the original did it in its data loader).
- floor: the frozen LLM's forward and backward alone (gradient only to the input embeddings;
  logits only at target positions) on exactly our batches: nothing that trains through this LLM
  on these tokens can be faster. Twice: on the whole sequences, and with the shared prefix's
  keys and values reused as we do (the stricter floor: what is left is our own overhead).
Prints ours/original and floor/ours, peak memory of each (GPU: max allocated; CPU: peak RSS of the
process, reset between variants), padding waste with and without bucketing, and writes
benchmarks/results/train_step-<preset>.json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import presets
from blsp.audio import HOP_LENGTH, N_SAMPLES, AudioRef, log_mel_spectrogram
from blsp.data import Utterance
from blsp.distributed import DistInfo
from blsp.features import encode_waveforms
from blsp.adapters import ConvAdapter
from blsp.llm import shared_prefix
from blsp.processing import SPEECH_TOKEN_ID
from blsp.whisper import encoder_output_lengths
from blsp.processing import Example
from blsp.options import LLM_DTYPES, TrainOptions
from blsp.sampling import global_batch_indices, micro_batches, padding_waste
from blsp.trainer import Trainer, peak_rss_mb, stores_llm_in_bf16


# ----------------------------------------------------------------------------------------------
# Memory: per variant
# ----------------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        # Not empty_cache(): that hands every cached block back, and each variant's next step
        # would time cudaMalloc calls a training run never makes. The peak of allocated memory
        # does not depend on what the allocator keeps cached.
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # hand freed heap pages back first, else the RSS left by the previous variant hides this one's peak
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        with open("/proc/self/status") as f:
            return round(next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024, 1)
    except (OSError, StopIteration):
        return peak_rss_mb()


def timed(variants: dict, steps: int, warmup: int, batch_size: int, device: torch.device) -> dict[str, dict]:
    """samples/s and peak memory of each variant, their steps interleaved (step s of every variant,
    then step s+1): on a shared machine the load drifts, and interleaving exposes every variant
    to the same drift, so the ratios hold even when the absolute figures move."""
    for s in range(warmup):
        for run_step in variants.values():
            run_step(s)
    seconds = {name: 0.0 for name in variants}
    peaks = {name: 0.0 for name in variants}
    for s in range(warmup, warmup + steps):
        for name, run_step in variants.items():
            reset_peak(device)
            presets.sync(device)
            start = presets.now()
            run_step(s)
            presets.sync(device)
            seconds[name] += presets.now() - start
            peaks[name] = max(peaks[name], peak_mb(device))
    return {name: {"samples_per_s": round(steps * batch_size / seconds[name], 3),
                   "seconds_per_step": round(seconds[name] / steps, 3), "peak_memory_mb": peaks[name]}
            for name in variants}


def profile_steps(trainer: Trainer, steps: range, device: torch.device, top: int = 25) -> list[dict]:
    """torch.profiler over `steps` of ours: the ops that took the most CPU time of their own (on
    a GPU the step is bound by the CPU launching work), with their device time beside; printed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trainer.train_step(steps[0])  # the new steps' shapes meet the allocator once before the profile
    with profile(activities=activities) as prof:
        for step in steps:
            trainer.train_step(step)
        presets.sync(device)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=top), flush=True)
    rows = sorted(table, key=lambda e: -e.self_cpu_time_total)[:top]
    per_step = 1000 / len(steps)  # microseconds summed over the steps -> milliseconds a step
    device_us = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # older torch: cuda
    return [{"op": e.key, "calls_per_step": round(e.count / len(steps), 1),
             "self_cpu_ms_per_step": round(e.self_cpu_time_total / per_step, 3),
             "device_ms_per_step": round(device_us(e) / per_step, 3)} for e in rows]


# ----------------------------------------------------------------------------------------------
# The data: clips, transcripts, continuations, features in our cache
# ----------------------------------------------------------------------------------------------
def make_utterances(root: Path, clips: list[np.ndarray], seed: int) -> list[Utterance]:
    """Behavior data lines. The audio files hold nothing: the features are put in the cache
    beforehand (as `blsp train` does once per clip), so the trainer never reads them."""
    rng = np.random.default_rng(seed)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    out = []
    for i, _ in enumerate(clips):
        path = root / "wav" / f"{i}.wav"
        path.write_bytes(b"placeholder %d" % i)
        out.append(Utterance(id=str(i), audio=AudioRef(str(path)), text=presets.random_text(rng, 8, 16),
                             extra={"continuation": presets.random_text(rng, 20, 40)}, source="bench", line=i + 1))
    return out


def fill_cache(model, utterances: list[Utterance], clips: list[np.ndarray], cache_dir: Path, device) -> float:
    """Encode every clip once (our encoder path: actual length, batched by length); seconds taken."""
    from blsp.features import FeatureCache

    cache = FeatureCache(cache_dir, model.config.encoder_fingerprint)
    presets.sync(device)
    start = presets.now()
    feats = encode_waveforms(model, clips, batch_size=16)
    presets.sync(device)
    seconds = presets.now() - start
    for utt, f in zip(utterances, feats):
        cache.save(utt.audio, f)
    return seconds


# ----------------------------------------------------------------------------------------------
# The original's way
# ----------------------------------------------------------------------------------------------
class OriginalStep:
    """One training step as the original BLSP code ran it (see the module docstring)."""

    def __init__(self, trainer: Trainer, model, clips: list[np.ndarray], batch_size: int, seed: int):
        self.trainer, self.model, self.batch_size, self.seed = trainer, model, batch_size, seed
        self.device = trainer.device
        n_mels = self.model.config.encoder_config.num_mel_bins
        by_id = {int(it.utterance.id): k for k, it in enumerate(trainer.items)}
        # 30 s of mel per clip, as Whisper's feature extractor pads it (computed outside the timing).
        self.mels = [None] * len(trainer.items)
        self.true_frames = [0] * len(trainer.items)
        for i, wav in enumerate(clips):
            padded = np.zeros(N_SAMPLES, dtype=np.float32)
            padded[: len(wav)] = wav
            self.mels[by_id[i]] = log_mel_spectrogram(padded, n_mels)
            self.true_frames[by_id[i]] = int(encoder_output_lengths(torch.tensor(len(wav) // HOP_LENGTH)))
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-5)

    def __call__(self, step: int) -> None:
        model, trainer = self.model, self.trainer
        idx = global_batch_indices(step, len(trainer.items), self.batch_size, self.seed)  # random batches
        mel = torch.stack([self.mels[i] for i in idx]).to(self.device)
        with torch.no_grad():  # frozen encoder, full 30 s window (HF's forward)
            enc = model.audio_tower(input_features=mel).last_hidden_state
        full = torch.full((len(idx),), enc.shape[1], device=self.device)
        fake = [torch.empty(enc.shape[1], 0)] * len(idx)  # 1500 frames -> 188 speech slots per row
        batch = model.processor.collate([Example(pieces=trainer.items[i].prompt, features=[f], target=trainer.items[i].target)
                                         for i, f in zip(idx, fake)])
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        embeds = model.embed_inputs(batch["input_ids"], enc, full)  # the adapter on every frame
        mask = batch["attention_mask"].clone()
        speech = batch["input_ids"] == SPEECH_TOKEN_ID
        slot = speech.long().cumsum(1) - 1
        true_vectors = model.adapter.output_lengths(torch.tensor([self.true_frames[i] for i in idx], device=self.device))
        mask[speech & (slot >= true_vectors[:, None])] = 0  # the padded speech vectors, masked out
        out = model.language_model(inputs_embeds=embeds, attention_mask=mask, labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# The floor
# ----------------------------------------------------------------------------------------------
class FloorStep:
    """The frozen LLM's forward and backward alone on our batches (built beforehand)."""

    def __init__(self, trainer: Trainer, use_prefix: bool):
        self.trainer, self.model, self.use_prefix = trainer, trainer.model, use_prefix
        self.batches: dict[int, list[dict]] = {}

    def prepare(self, steps: range) -> None:
        t = self.trainer
        embed = self.model.language_model.get_input_embeddings()
        for step in steps:
            idx = global_batch_indices(step, len(t.items), t.global_batch, t.options.optim.seed, t.lengths)
            self.batches[step] = []
            for mb in micro_batches(idx, t.options.optim.batch_size, DistInfo()):
                b = {k: v.to(t.device) for k, v in t.model.processor.collate([t.example(t.items[i]) for i in mb]).items()}
                with torch.no_grad():
                    ids = b["input_ids"].masked_fill(b["input_ids"] == SPEECH_TOKEN_ID, 0)
                    b["embeds"] = embed(ids)
                b["prefix"] = shared_prefix(b["input_ids"], b["attention_mask"]) if self.use_prefix else ()
                if b["prefix"]:  # the prefix's keys and values: computed once, before any timing
                    self.model._prefix_cache(tuple(b["prefix"]), 1, b["embeds"].dtype)
                self.batches[step].append(b)

    def __call__(self, step: int) -> None:
        for b in self.batches[step]:
            embeds = b["embeds"].detach().requires_grad_()
            with self.trainer.autocast:
                hidden = self.model.llm_hidden_states(embeds, b["attention_mask"], b["prefix"])
                logits, targets = self.model.target_logits(hidden, b["labels"])
                loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            loss.backward()


# ----------------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------------
def waste_report(trainer: Trainer, speech_frames: list[int]) -> dict:
    """Padding share of LLM positions and of speech frames over one epoch of micro-batches."""
    t, n = trainer, len(trainer.items)
    steps = max(1, n // t.global_batch)
    out = {}
    for name, lengths, frames in (("bucketed", t.lengths, t.frames), ("random", None, None)):
        mbs = [mb for s in range(steps)
               for mb in micro_batches(global_batch_indices(s, n, t.global_batch, t.options.optim.seed, lengths, frames),
                                       t.options.optim.batch_size, DistInfo())]
        out[name] = {"llm_positions_pct": round(100 * padding_waste(mbs, t.lengths), 1),
                     "speech_frames_pct": round(100 * padding_waste(mbs, speech_frames), 1)}
    return out


def skewed_waste(batch_size: int, prompt: int, seed: int, n: int = 4096) -> dict:
    """The same for a corpus whose clip lengths spread as read speech does (log-normal around 8 s,
    1-35 s; LibriSpeech-like): where the benchmark's 4-6 s clips barely vary, this shows what
    bucketing saves. Lengths only, no model: speech frames at 50/s, a vector per 8 frames, a
    target of 20-60 tokens."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(8), 0.6, n), 1, 35)
    frames = tuple(int(s * 50) for s in seconds)
    positions = tuple(prompt + f // 8 + int(rng.integers(20, 61)) for f in frames)
    out = {}
    for name, lengths, by_frames in (("bucketed", positions, frames), ("random", None, None)):
        mbs = [global_batch_indices(s, n, batch_size, seed, lengths, by_frames) for s in range(n // batch_size)]
        out[name] = {"llm_positions_pct": round(100 * padding_waste(mbs, positions), 1),
                     "speech_frames_pct": round(100 * padding_waste(mbs, frames), 1)}
    return out


# ----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--tiny", action="store_true", help="shrink the gpu preset's models (a quick check on a CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 (cpu preset), 16 (gpu)")
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant; default 2 (cpu), 10 (gpu)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first; default 0 on a CPU (a step there takes seconds), 2 on a GPU")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="also time ours with the frozen LLM's layers checkpointed, and its memory")
    parser.add_argument("--unbucketed", action="store_true", help="also time ours with random batches")
    parser.add_argument("--other-conv", action="store_true",
                        help="also time ours with the adapter's other convolution (ConvAdapter.conv_impl: unfold + "
                             "matmul, or the backend's conv1d)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the timing, profile this many more steps of ours (torch.profiler) and write "
                             "the ops that took the most CPU and device time")
    parser.add_argument("--llm-dtype", choices=LLM_DTYPES, default="auto",
                        help="the frozen LLM's weights for ours and the floor (`blsp train --llm-dtype`); auto: bf16 on "
                             "a GPU, where the step runs in bf16")
    parser.add_argument("--no-original", action="store_true", help="skip the original's way (slow on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    device = presets.pick_device(args.device)
    big = args.preset == "gpu" and not args.tiny
    batch_size = args.batch_size or (16 if big else 4)
    steps = args.steps or (10 if big else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)
    n = batch_size * (args.warmup + steps)  # one epoch: every timed step sees new clips
    print(f"building the {args.preset} preset on {device} ...", flush=True)
    built = presets.build_model(args.preset, device, args.tiny, args.seed)
    model = built.model
    print(built.description, flush=True)

    clips = presets.random_clips(n, args.clip_seconds, 0.2 * args.clip_seconds, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="blsp-bench-"))
    utterances = make_utterances(tmp / "data", clips, args.seed)
    encode_s = fill_cache(model, utterances, clips, tmp / "features", device)

    # The original ran fp32 weights; on a GPU our trainer keeps the frozen LLM in bf16 (--llm-dtype
    # auto), so the original's way gets its own copy of the same weights, made before that.
    original_model = None
    if not args.no_original:
        bf16_llm = stores_llm_in_bf16(TrainOptions.from_flat(llm_dtype=args.llm_dtype), device)
        original_model = copy.deepcopy(model) if bf16_llm else model

    def trainer_for(**kw) -> Trainer:
        options = TrainOptions.from_flat(batch_size=batch_size, max_steps=args.warmup + steps, warmup_steps=0, seed=args.seed,
                               feature_cache=str(tmp / "features"), llm_dtype=args.llm_dtype, **kw)
        return Trainer(model, utterances, options, tmp / "run", DistInfo())

    trainer = trainer_for()
    frames = [trainer.cache.frames(it.utterance.audio) for it in trainer.items]
    waste = waste_report(trainer, frames)
    prompt = sum(len(p) for p in trainer.items[0].prompt if isinstance(p, list))
    waste_skewed = skewed_waste(batch_size, prompt, args.seed)

    variants = {"ours": trainer.train_step}
    if args.unbucketed:
        variants["ours_unbucketed"] = trainer_for(bucket_by_length=False).train_step
    if args.gradient_checkpointing:
        # A model-wide switch: its trainer turns it on for its own steps only.
        ckpt = trainer_for(gradient_checkpointing=True)
        model.set_llm_checkpointing(False)

        def checkpointed(step: int) -> None:
            model.set_llm_checkpointing(True)
            try:
                ckpt.train_step(step)
            finally:
                model.set_llm_checkpointing(False)

        variants["ours_checkpointed"] = checkpointed
    if args.other_conv:
        conv = trainer_for()
        other = "conv1d" if ConvAdapter.conv_impl == "matmul" else "matmul"

        def other_conv(step: int) -> None:  # a class-wide switch, on for this variant's steps only
            mine, ConvAdapter.conv_impl = ConvAdapter.conv_impl, other
            try:
                conv.train_step(step)
            finally:
                ConvAdapter.conv_impl = mine

        variants[f"ours_conv_{other}"] = other_conv
    for name, use_prefix in (("floor", False), ("floor_prefix_cached", True)):
        variants[name] = FloorStep(trainer, use_prefix)
        variants[name].prepare(range(args.warmup + steps))
    after = {}
    if not args.no_original:
        original = OriginalStep(trainer, original_model, clips, batch_size, args.seed)
        # On a GPU the original's way is timed on its own, after the others: interleaved, the
        # variant after its 48 GB fp32 step ran 25-35 ms slower whichever it was (H100, 2026-11-27).
        (after if device.type == "cuda" else variants)["original"] = original
    print(f"timing {', '.join(variants)}: {args.warmup} untimed + {steps} timed steps each, interleaved"
          + (f"; then {', '.join(after)}" if after else ""), flush=True)
    results = timed(variants, steps, args.warmup, batch_size, device)
    results.update(timed(after, steps, args.warmup, batch_size, device) if after else {})
    for name, r in results.items():
        print(f"{name:>22}: {r['samples_per_s']:8.3f} samples/s  ({r['seconds_per_step']:.3f} s/step, "
              f"peak {r['peak_memory_mb']:.0f} MB)", flush=True)

    profile = profile_steps(trainer, range(args.warmup + steps, args.warmup + steps + args.profile), device) \
        if args.profile else None
    ours = results["ours"]["samples_per_s"]
    ratios = {
        "ours_over_original": round(ours / results["original"]["samples_per_s"], 2) if "original" in results else None,
        # floor time / our time: 1.0 = no overhead at all; the target is >= 1/1.3 = 0.77
        "floor_over_ours": round(ours / results["floor"]["samples_per_s"], 3),
        "floor_prefix_cached_over_ours": round(ours / results["floor_prefix_cached"]["samples_per_s"], 3),
    }
    # A one-time cost ours pays and the original does not: encoding each clip once, over one epoch.
    per_clip = encode_s / n
    ratios["ours_with_encoding_over_original"] = (
        round(1 / (1 / ours + per_clip) / results["original"]["samples_per_s"], 2) if "original" in results else None)
    if "ours_checkpointed" in results:
        ratios["checkpointing_memory_saving_mb"] = round(
            results["ours"]["peak_memory_mb"] - results["ours_checkpointed"]["peak_memory_mb"], 1)
        ratios["checkpointing_speed_cost"] = round(ours / results["ours_checkpointed"]["samples_per_s"], 3)

    result = {
        "benchmark": "train_step", "preset": args.preset + ("-tiny" if args.tiny else ""), "models": built.description,
        "device": str(device), "machine": presets.machine(device), "date": time.strftime("%Y-%m-%d"),
        "batch_size": batch_size, "clip_seconds": f"{args.clip_seconds} +- {0.2 * args.clip_seconds:.1f}",
        "steps": steps, "warmup": args.warmup, "precision_ours": "bf16 autocast" if device.type == "cuda" else "fp32",
        "llm_weights_ours": str(next(model.language_model.parameters()).dtype).removeprefix("torch."),
        "results": results, "ratios": ratios, "padding_waste": waste, "padding_waste_1_to_35s_clips": waste_skewed,
        "encode_once_s_per_clip": round(per_clip, 4), "profile": profile,
        "memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (VmHWM)",
    }
    print(f"ours / original: {ratios['ours_over_original']}x samples/s "
          f"({ratios['ours_with_encoding_over_original']}x counting the one-time encoding over one epoch)")
    print(f"floor / ours (time): {ratios['floor_over_ours']} on whole sequences, "
          f"{ratios['floor_prefix_cached_over_ours']} against the floor with the prefix cached")
    print(f"padding waste (LLM positions / speech frames): bucketed {waste['bucketed']['llm_positions_pct']}% / "
          f"{waste['bucketed']['speech_frames_pct']}%, random {waste['random']['llm_positions_pct']}% / "
          f"{waste['random']['speech_frames_pct']}%")
    print(f"  on clips of 1-35 s (lengths only): bucketed {waste_skewed['bucketed']['llm_positions_pct']}% / "
          f"{waste_skewed['bucketed']['speech_frames_pct']}%, random {waste_skewed['random']['llm_positions_pct']}% / "
          f"{waste_skewed['random']['speech_frames_pct']}%")
    presets.write_result(result, args.output, "train_step")


if __name__ == "__main__":
    main()
