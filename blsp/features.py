"""Frozen-encoder features: computed once per clip, on its actual length, cached on disk.

The encoder is frozen, so encoding the same clip on every training step (as the original did,
padded to 30 s) is pure waste. Features are stored as float16 `.npy`, one file per clip, in a
directory named by the encoder's weight fingerprint, keyed by the audio reference and the audio
file's size and modification time (so an edited file is re-encoded).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .audio import AudioRef, log_mel_spectrogram, split_for_encoder
from .data import Utterance, load_utterances_audio
from .errors import BlspError, InputError
from .io import atomic_write_bytes
from .voice_channel import voice_rows


@torch.no_grad()
def encode_waveforms(model, waveforms: Sequence[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
    """Encoder features [T_enc, d_enc] (float32, CPU) for each 16 kHz waveform.

    Clips longer than Whisper's 30 s window are split, encoded piece by piece and concatenated.
    Pieces are batched in order of length so little compute goes into padding.
    """
    n_mels = model.config.encoder_config.num_mel_bins
    pieces = [(i, chunk) for i, wav in enumerate(waveforms) for chunk in split_for_encoder(wav)]
    order = sorted(range(len(pieces)), key=lambda k: len(pieces[k][1]))
    encoded: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        mels = [log_mel_spectrogram(pieces[k][1], n_mels) for k in ids]
        lengths = torch.tensor([m.shape[-1] for m in mels])
        batch = torch.zeros(len(mels), n_mels, int(lengths.max()))
        for row, m in enumerate(mels):
            batch[row, :, : m.shape[-1]] = m
        feats, feat_lengths = model.encode_mel(batch, lengths)
        for row, k in enumerate(ids):
            encoded[k] = feats[row, : feat_lengths[row]].float().cpu()
    out: list[list[torch.Tensor]] = [[] for _ in waveforms]
    for k, (i, _) in enumerate(pieces):
        out[i].append(encoded[k])
    return [join_pieces(parts, voice_rows(model.config)) for parts in out]


def join_pieces(parts: list[torch.Tensor], n_voice_rows: int = 0) -> torch.Tensor:
    """One clip's features from its pieces' (in order). With a voice channel each piece opens with
    its voice statistics: the clip's are their mean, weighted by the pieces' lengths, once at the head."""
    if len(parts) == 1 or not n_voice_rows:
        return torch.cat(parts)
    weights = torch.tensor([float(p.shape[0] - n_voice_rows) for p in parts])
    weights = (weights / weights.sum().clamp(min=1))[:, None, None]
    voice = (torch.stack([p[:n_voice_rows] for p in parts]) * weights).sum(0)
    return torch.cat([voice, *(p[n_voice_rows:] for p in parts)])


def audio_key(ref: AudioRef) -> str:
    """Identity of a clip: its reference plus the file's size and mtime."""
    st = os.stat(ref.path)
    raw = f"{Path(ref.path).resolve()}|{ref.start}|{ref.num_samples}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(raw.encode()).hexdigest()


class FeatureCache:
    """On-disk cache of encoder features for one encoder (by fingerprint), or with trained top
    layers for its frozen part (by `BlspConfig.feature_key`)."""

    def __init__(self, root: str | os.PathLike, encoder_fingerprint: str, memory_mb: float = 0):
        self.key = encoder_fingerprint
        self.dir = Path(root) / encoder_fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        # Features read once are kept in this process (float16, as stored) up to `memory_mb`:
        # training reads every clip once an epoch, and on a GPU the step is otherwise bound by
        # the CPU, a file read per clip included. Clips past the budget are read from disk each
        # time, so a corpus larger than memory still trains.
        self.memory_budget = int(memory_mb * 2**20)
        self.memory: dict[AudioRef, torch.Tensor] = {}
        self.memory_bytes = 0

    def check_model(self, model) -> None:
        """Refuse a cache of features other than those `model` reads: another encoder's, or the
        whole encoder's where the model trains its top layers (it reads features below them)."""
        if self.key != model.config.feature_key:
            raise BlspError(f"{self.dir}: the feature cache holds features {self.key}, but the model reads "
                            f"{model.config.feature_key} (another encoder, or trained top layers): open the cache "
                            "with the model's config.feature_key")

    def path(self, ref: AudioRef) -> Path:
        key = audio_key(ref)
        return self.dir / key[:2] / f"{key}.npy"

    def has(self, ref: AudioRef) -> bool:
        return self.path(ref).exists()

    def load(self, ref: AudioRef, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The clip's features [T, d]; `dtype` None: as stored (float16), so a trainer on a GPU
        moves half the bytes and converts there instead of on its CPU (read-only: it may be the
        copy kept in memory)."""
        features = self.memory.get(ref)
        if features is None:
            features = torch.from_numpy(np.load(self.path(ref)))
            if self.memory_bytes + features.nbytes <= self.memory_budget:
                self.memory[ref] = features
                self.memory_bytes += features.nbytes
        return features if dtype is None else features.to(dtype)

    def frames(self, ref: AudioRef) -> int:
        """The clip's number of encoder frames, from the file's header alone."""
        return int(np.load(self.path(ref), mmap_mode="r").shape[0])

    def save(self, ref: AudioRef, features: torch.Tensor) -> None:
        buf = io.BytesIO()
        np.save(buf, features.to(torch.float16).numpy())
        atomic_write_bytes(self.path(ref), buf.getvalue())
        dropped = self.memory.pop(ref, None)
        if dropped is not None:
            self.memory_bytes -= dropped.nbytes

    def fill(self, model, utterances: Sequence[Utterance], batch_size: int = 16, rank: int = 0,
             world_size: int = 1, skip_bad: bool = False) -> list[InputError]:
        """Encode every clip not cached yet (this rank's share of them).

        An unreadable clip raises an error naming its manifest line, or with `skip_bad` is left
        uncached and returned, so the caller can drop it.
        """
        todo = list({u.audio: u for u in utterances if not self.has(u.audio)}.values())[rank::world_size]
        todo.sort(key=lambda u: u.audio.num_samples or os.path.getsize(u.audio.path))  # less padding
        group = batch_size * 8  # load this many waveforms at a time to bound memory
        errors: list[InputError] = []
        with tqdm(total=len(todo), desc="encoding speech", unit="clip", disable=rank != 0 or not todo) as bar:
            for start in range(0, len(todo), group):
                loaded, failed = load_utterances_audio(todo[start : start + group], skip_bad)
                errors += failed
                feats = encode_waveforms(model, [wav for _, wav in loaded], batch_size)
                for (utt, _), f in zip(loaded, feats):
                    self.save(utt.audio, f)
                bar.update(len(todo[start : start + group]))
        return errors
