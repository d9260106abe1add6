"""Degraded speech: a clean manifest's clips as a telephone line, a noisy room, a reverberant
hall or a hurried speaker would deliver them.

Why: the demo's test speech is clean TTS, and a model that behaves like the text path there can
still fall apart on real voices (DESIGN.md: KL 0.66 against the cascade's 0.04 on telephone
speech). Each condition here is one way real speech differs from clean TTS, applied to the same
clips so the numbers compare one for one with the clean set's; the same effects, drawn at random,
are step 2's audio augmentation (`blsp data degrade --conditions mixed`).

`blsp data degrade --manifest test.jsonl --conditions telephone,noise,reverb,speed --output DIR`
writes DIR/CONDITION/*.wav and DIR/CONDITION.jsonl: every field of each line kept (behaviour data
stays behaviour data), `audio` pointing at the degraded clip, the id `ID@CONDITION` (`source_id`
the clean clip's), `condition` added. Each clip's
randomness is seeded by its id, so a rerun writes the same files (and skips those already written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
from tqdm import tqdm

from .audio import SAMPLE_RATE, write_wav
from .data import Utterance, load_utterance_audio, read_manifest
from .errors import BlspError
from .io import atomic_write_text

TELEPHONE_RATE = 8000  # narrowband telephony: nothing above 4 kHz survives
TELEPHONE_LOW_HZ = 300  # ... nor below ~300 Hz (the voice band of ITU-T G.712)
NOISE_SNR_DB = 10.0  # a busy room: speech 10 dB above the noise
REVERB_RT60_S = 0.6  # a living room or small office; lecture halls run 1-2 s
SPEED_FACTOR = 1.2  # fast speech (sox `speed`: tempo and pitch together, as a hurried speaker)
GAIN_DB_RANGE = (-18.0, 6.0)  # quiet microphones to hot ones (augmentation only)
MAX_IMAGE_ORDER = 30  # reflections modelled: ~0.1 s a room (Sabine's order for 0.6 s is ~80: 1.5 s a room)
PEAK_LIMIT = 0.99  # clips above this after an effect are scaled down, not clipped


@dataclass(frozen=True)
class Condition:
    name: str
    description: str
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]


def telephone(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down to 8 kHz and back (soxr's anti-alias filter cuts at 4 kHz), then the 300 Hz high-pass."""
    from audiomentations import HighPassFilter

    narrow = soxr.resample(wave, SAMPLE_RATE, TELEPHONE_RATE, quality="HQ")
    wide = soxr.resample(narrow, TELEPHONE_RATE, SAMPLE_RATE, quality="HQ")[: len(wave)]
    cut = HighPassFilter(min_cutoff_freq=TELEPHONE_LOW_HZ, max_cutoff_freq=TELEPHONE_LOW_HZ, p=1.0)
    return cut(samples=wide.astype(np.float32), sample_rate=SAMPLE_RATE)


def noise(wave: np.ndarray, rng: np.random.Generator, snr_db: float = NOISE_SNR_DB) -> np.ndarray:
    """Pink noise (the spectrum of crowds, fans, traffic) at `snr_db` below the speech."""
    from audiomentations import AddColorNoise

    _seed_numpy(rng)
    add = AddColorNoise(min_snr_db=snr_db, max_snr_db=snr_db, min_f_decay=-3.01, max_f_decay=-3.01, p=1.0)
    return add(samples=wave.astype(np.float32), sample_rate=SAMPLE_RATE)


def reverb(wave: np.ndarray, rng: np.random.Generator, rt60_s: float = REVERB_RT60_S) -> np.ndarray:
    """A shoebox room of RT60 `rt60_s` (pyroomacoustics' image-source method; wall absorption from
    Sabine's formula), its size and the talker's and microphone's places drawn from `rng`."""
    import pyroomacoustics as pra
    from scipy.signal import fftconvolve

    dims = rng.uniform([4.0, 3.0, 2.5], [8.0, 6.0, 3.5])
    absorption, max_order = pra.inverse_sabine(rt60_s, dims)
    room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption),
                       max_order=min(max_order, MAX_IMAGE_ORDER), ray_tracing=False)
    room.add_source(rng.uniform(0.5, dims - 0.5))
    room.add_microphone(rng.uniform(0.5, dims - 0.5))
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float32)
    wet = fftconvolve(wave, rir)[: len(wave)]
    # the same loudness as the dry speech (a room does not make a talker louder)
    return wet * (np.sqrt(np.mean(wave ** 2)) / max(np.sqrt(np.mean(wet ** 2)), 1e-9))


def speed(wave: np.ndarray, rng: np.random.Generator, factor: float = SPEED_FACTOR) -> np.ndarray:
    """Played `factor` times faster (resampling, as sox's `speed`): shorter, higher-pitched."""
    return soxr.resample(wave, SAMPLE_RATE * factor, SAMPLE_RATE, quality="HQ")


def gain(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random level in `GAIN_DB_RANGE`."""
    return wave * 10 ** (rng.uniform(*GAIN_DB_RANGE) / 20)


def mixed(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Step 2's augmentation: each effect at random strength, each with probability 1/2, in the
    order a signal meets them (the talker's speed, the room, the noise, the line, the microphone)."""
    if rng.random() < 0.5:
        wave = speed(wave, rng, factor=rng.uniform(0.85, 1.25))
    if rng.random() < 0.5:
        wave = reverb(wave, rng, rt60_s=rng.uniform(0.2, 0.9))
    if rng.random() < 0.5:
        wave = noise(wave, rng, snr_db=rng.uniform(5.0, 25.0))
    if rng.random() < 0.5:
        wave = telephone(wave, rng)
    return gain(wave, rng)


CONDITIONS: dict[str, Condition] = {c.name: c for c in (
    Condition("telephone", f"band-limited to {TELEPHONE_LOW_HZ}-{TELEPHONE_RATE // 2} Hz (8 kHz telephony)", telephone),
    Condition("noise", f"pink noise at {NOISE_SNR_DB:g} dB SNR", noise),
    Condition("reverb", f"a room with RT60 {REVERB_RT60_S:g} s (image sources)", reverb),
    Condition("speed", f"{SPEED_FACTOR:g}x faster (tempo and pitch)", speed),
    Condition("gain", f"a random level in {GAIN_DB_RANGE[0]:g}..{GAIN_DB_RANGE[1]:+g} dB", gain),
    Condition("mixed", "each of speed, reverb, noise, telephone with probability 1/2, random strength; random gain",
              mixed),
)}
TEST_CONDITIONS = ("telephone", "noise", "reverb", "speed")  # the evaluation's degraded sets


def _seed_numpy(rng: np.random.Generator) -> None:
    # audiomentations draws from numpy's and Python's global generators: seed both from the clip's own
    seed = int(rng.integers(2**31))
    np.random.seed(seed)
    random.seed(seed)


def clip_rng(condition: str, utt_id: str, seed: int = 0) -> np.random.Generator:
    """The clip's own generator: the same clip and condition give the same degradation."""
    digest = hashlib.sha256(f"{seed}:{condition}:{utt_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def degrade(wave: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
    """`wave` (16 kHz mono float) through `condition`, peak-limited."""
    out = np.asarray(CONDITIONS[condition].apply(np.asarray(wave, dtype=np.float32), rng), dtype=np.float32)
    peak = float(np.abs(out).max()) if out.size else 0.0
    return out * (PEAK_LIMIT / peak) if peak > PEAK_LIMIT else out


def check_conditions(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown or not names:
        raise BlspError(f"unknown condition(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(CONDITIONS)}")
    return tuple(names)


def _file_name(utt: Utterance) -> str:
    # ids may hold '/' or ':' (a path, an offset form): a readable stem plus a short hash, unique
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(str(utt.id)).stem)[:60]
    return f"{stem}-{hashlib.sha1(str(utt.id).encode()).hexdigest()[:8]}.wav"


def degrade_manifest(manifest: str | os.PathLike, output_dir: str | os.PathLike, conditions: Sequence[str],
                     seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Every clip of `manifest` through each condition: OUTPUT/CONDITION/*.wav and OUTPUT/CONDITION.jsonl.
    Clips already written are kept (the work resumes); each manifest is written atomically at the end."""
    conditions = check_conditions(conditions)
    utts = read_manifest(manifest).utterances
    if not utts:
        raise BlspError(f"{manifest}: no utterances to degrade")
    out_dir = Path(output_dir)
    written = {}
    for name in conditions:
        wav_dir = out_dir / name
        wav_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for utt in tqdm(utts, desc=f"degrade: {name}", unit="clip", disable=not progress):
            wav = wav_dir / _file_name(utt)
            if not wav.exists():
                write_wav(wav, degrade(load_utterance_audio(utt), name, clip_rng(name, str(utt.id), seed)))
            # a new id, so that a degraded copy can train or be scored beside its clean clip
            record = {"id": f"{utt.id}@{name}", "audio": os.path.relpath(wav, out_dir), "text": utt.text,
                      **utt.extra, "condition": name, "source_id": utt.id, "source_audio": str(utt.audio)}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        written[name] = out_dir / f"{name}.jsonl"
        atomic_write_text(written[name], "".join(lines))
    return written


def cmd_degrade(args: argparse.Namespace) -> int:
    written = degrade_manifest(args.manifest, args.output, args.conditions, seed=args.seed)
    for name, path in written.items():
        print(f"data degrade: {name} ({CONDITIONS[name].description}) -> {path}")
    return 0


def add_degrade_parser(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser("degrade", help="a manifest's clips band-limited, noisy, reverberant or sped up "
                                            "(test sets of degraded speech; step 2's audio augmentation)")
    p.add_argument("--manifest", required=True, help="manifest or behaviour data JSONL whose clips to degrade")
    p.add_argument("--output", required=True, help="directory: CONDITION/*.wav and CONDITION.jsonl per condition")
    p.add_argument("--conditions", type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
                   default=TEST_CONDITIONS, help=f"comma-separated, of: {', '.join(CONDITIONS)} "
                                                 f"(default: {','.join(TEST_CONDITIONS)})")
    p.add_argument("--seed", type=int, default=0, help="with each clip's id, seeds its degradation")
    p.set_defaults(func=cmd_degrade)
