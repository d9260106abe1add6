"""Audio loading and Whisper's log-Mel front end, without Whisper's padding to 30 s.

Whisper pads every clip to 30 s before its encoder; BLSP encodes clips at their actual length
(the padding was most of the original's training time: 1.8 s a clip instead of 0.15 s), so `log_mel_spectrogram` returns exactly the frames Whisper computes for the
clip before padding, and `split_for_encoder` cuts clips longer than the encoder's window.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from transformers import WhisperFeatureExtractor

from .errors import BlspError
from .io import atomic_write_bytes

# hard-coded audio hyperparameters of Whisper's encoder
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds: the encoder's window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30-second chunk
ENCODER_FRAMES_PER_SECOND = 50  # the encoder's conv2 has stride 2: 100 mel frames/s -> 50

MIN_SAMPLES = HOP_LENGTH  # one mel frame: a shorter clip gives the encoder nothing to see
MIN_TAIL_SAMPLES = SAMPLE_RATE // 10  # 0.1 s: a shorter last piece of a long clip is dropped
RESAMPLE_QUALITY = "HQ"
# Decoding an encoded clip in memory (`decode_audio`): libsndfile's length for a file that does not
# state one (SF_COUNT_MAX), the highest sample rate taken (a clip is held at its own rate until it
# is resampled: 300 s at 192 kHz is 230 MB of float32), and the samples read at a time.
UNKNOWN_LENGTH = 2**63 - 1
MAX_SAMPLE_RATE = 192_000
READ_BLOCK_VALUES = 2**18

# `path:start_sample:num_samples`, the original BLSP repository's convention
_OFFSET_FORM = re.compile(r"^(?P<path>.+):(?P<start>\d+):(?P<num_samples>\d+)$")


class AudioError(BlspError):
    """Audio that cannot be used; the caller adds which input line referred to it."""


class AudioTooLong(AudioError):
    """A clip longer than the caller allows, found from the file's header before decoding."""

    def __init__(self, label: object, seconds: float, max_seconds: float):
        self.seconds, self.max_seconds = seconds, max_seconds
        super().__init__(f"{label}: the audio is {seconds:.0f} s long; at most {max_seconds:.0f} s")


@dataclass(frozen=True)
class AudioRef:
    """A whole file (`start is None`), or `num_samples` samples of it from sample `start`.

    Offsets count samples at the file's own sample rate, before resampling, as in the original.
    """

    path: str
    start: int | None = None
    num_samples: int | None = None

    @classmethod
    def parse(cls, spec: str, base_dir: str | os.PathLike | None = None) -> AudioRef:
        """Parse a manifest's `audio` string; a relative path is taken relative to `base_dir`.

        The last two `:`-separated fields are offsets only if both are integers, so paths that
        themselves contain ':' (a drive letter, `take:2.wav`) still read as plain paths.
        """
        match = _OFFSET_FORM.match(spec)
        if match is None:
            return cls(_resolve(spec, base_dir))
        return cls(_resolve(match["path"], base_dir), int(match["start"]), int(match["num_samples"]))

    def __str__(self) -> str:
        return self.spec(self.path)

    def relative_to(self, directory: str | os.PathLike) -> str:
        """The manifest form of this reference for a file written in `directory`."""
        return self.spec(os.path.relpath(self.path, directory))

    def spec(self, path: str) -> str:
        return path if self.start is None else f"{path}:{self.start}:{self.num_samples}"


def _soundfile():
    """soundfile, imported when a file is first read or written: the model, the mel features and
    the benchmarks then work where libsndfile is not installed (a bare GPU machine)."""
    import soundfile

    return soundfile


def _resolve(path: str | os.PathLike, base_dir: str | os.PathLike | None) -> str:
    path = os.path.expanduser(os.fspath(path))
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normpath(path)


def _as_ref(audio: AudioRef | str | os.PathLike, base_dir: str | os.PathLike | None) -> AudioRef:
    """A string may use the offset form; a path object always names a whole file."""
    if isinstance(audio, AudioRef):
        return audio
    if isinstance(audio, str):
        return AudioRef.parse(audio, base_dir)
    return AudioRef(_resolve(audio, base_dir))


def _reason(err: Exception) -> str:
    return getattr(err, "error_string", None) or str(err)  # libsndfile's reason without the path


def _check_length(num_samples: int, sample_rate: int, label: object) -> None:
    if num_samples == 0:
        raise AudioError(f"{label}: no audio samples")
    if num_samples * SAMPLE_RATE // sample_rate < MIN_SAMPLES:
        raise AudioError(
            f"{label}: audio too short ({num_samples} samples at {sample_rate} Hz; "
            f"at least {MIN_SAMPLES * 1000 // SAMPLE_RATE} ms needed)"
        )


def probe_audio(audio: AudioRef | str | os.PathLike, base_dir: str | os.PathLike | None = None) -> None:
    """Check from the file's header alone (no samples decoded) that the audio can be loaded.

    Cheap enough to run on every manifest line, so a bad file is reported with its line up front
    instead of failing a run hours in.
    """
    ref = _as_ref(audio, base_dir)
    if not os.path.isfile(ref.path):
        raise AudioError(f"audio file not found: {ref.path}")
    try:
        info = _soundfile().info(ref.path)
    except (RuntimeError, OSError) as err:  # sf.LibsndfileError is a RuntimeError
        raise AudioError(f"cannot read audio file {ref.path}: {_reason(err)}") from err
    if ref.start is None:
        _check_length(info.frames, info.samplerate, ref)
        return
    if ref.start + ref.num_samples > info.frames:
        raise AudioError(
            f"{ref}: samples {ref.start}..{ref.start + ref.num_samples} are outside the file "
            f"({info.frames} samples)"
        )
    _check_length(ref.num_samples, info.samplerate, ref)


def _read(file: str | io.BytesIO, label: object, start: int = 0, frames: int = -1) -> tuple[np.ndarray, int]:
    try:
        return _soundfile().read(file, start=start, frames=frames, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as err:
        raise AudioError(f"cannot decode audio {label}: {_reason(err)}") from err


def _to_mono_16k(data: np.ndarray, sample_rate: int, label: object) -> np.ndarray:
    """[samples, channels] at any rate -> float32 mono at SAMPLE_RATE (channels averaged)."""
    return _mono_to_16k(data.mean(axis=1), sample_rate, label)


def _mono_to_16k(mono: np.ndarray, sample_rate: int, label: object) -> np.ndarray:
    # A NaN or infinity in any channel leaves one in the channels' mean: checked after it.
    _check_length(len(mono), sample_rate, label)
    if not np.isfinite(mono).all():
        raise AudioError(f"{label}: audio contains NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        import soxr

        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_audio(audio: AudioRef | str | os.PathLike, base_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Read a clip (only the requested samples) as float32 mono at 16 kHz.

    Channels are averaged, then the signal is resampled with soxr. Every failure is an
    `AudioError` naming the file and the reason; silence is valid audio.
    """
    ref = _as_ref(audio, base_dir)
    probe_audio(ref)
    frames = -1 if ref.num_samples is None else ref.num_samples
    data, sample_rate = _read(ref.path, ref, start=ref.start or 0, frames=frames)
    if len(data) < frames:
        raise AudioError(f"{ref}: file ended after {len(data)} of the requested samples (truncated?)")
    return _to_mono_16k(data, sample_rate, ref)


def decode_audio(data: bytes, label: str, max_seconds: float | None = None) -> np.ndarray:
    """Like `load_audio`, for an encoded file held in memory (e.g. a `datasets` Audio cell or an
    upload). The file is measured before it is decoded: a clip over `max_seconds` is refused from
    its header (`AudioTooLong`) without a sample decoded, so a few MB of compressed silence cannot
    become gigabytes of samples; one that does not state its length is refused too. Samples are
    then read in blocks and mixed down as they come, never more than the header promised."""
    with _open_encoded(data, label) as file:
        frames, sample_rate = _stated_length(file, label), file.samplerate
        if max_seconds is not None and frames > max_seconds * sample_rate:
            raise AudioTooLong(label, frames / sample_rate, max_seconds)
        mono = _read_mono(file, frames, label)
    return _mono_to_16k(mono, sample_rate, label)


def encoded_duration(data: bytes, label: str) -> float:
    """Seconds of an encoded clip held in memory, from its header alone (nothing decoded); an
    `AudioError` if it cannot be read or does not state its length, as `decode_audio` would."""
    with _open_encoded(data, label) as file:
        return _stated_length(file, label) / file.samplerate


def _open_encoded(data: bytes, label: str):
    try:
        return _soundfile().SoundFile(io.BytesIO(data))
    except (RuntimeError, OSError) as err:  # sf.LibsndfileError is a RuntimeError
        raise AudioError(f"cannot decode audio {label}: {_reason(err)}") from err


def _stated_length(file, label: str) -> int:
    """The samples an open file's header promises (libsndfile reads no more than that)."""
    if file.frames >= UNKNOWN_LENGTH:
        raise AudioError(f"cannot decode audio {label}: the file does not state its length")
    if not 0 < file.samplerate <= MAX_SAMPLE_RATE:
        raise AudioError(f"cannot decode audio {label}: sample rate {file.samplerate} Hz (at most "
                         f"{MAX_SAMPLE_RATE} Hz)")
    return file.frames


def _read_mono(file, frames: int, label: str) -> np.ndarray:
    """Up to `frames` samples of an open file, channels averaged block by block: the memory held is
    the mono clip and one block, whatever the channel count."""
    mono = np.empty(frames, dtype=np.float32)
    block = max(1, READ_BLOCK_VALUES // file.channels)
    done = 0
    while done < frames:
        try:
            data = file.read(min(block, frames - done), dtype="float32", always_2d=True)
        except (RuntimeError, OSError) as err:
            raise AudioError(f"cannot decode audio {label}: {_reason(err)}") from err
        if not len(data):  # the file ended before its header said (truncated): what there is
            break
        mono[done : done + len(data)] = data.mean(axis=1)
        done += len(data)
    return mono[:done]


@lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> torch.Tensor:
    """Whisper's mel filterbank [n_mels, N_FFT // 2 + 1], taken from transformers' extractor."""
    return torch.from_numpy(WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T).float()


def log_mel_spectrogram(audio: np.ndarray | torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper's log-Mel spectrogram [n_mels, len(audio) // HOP_LENGTH] of a 1-D 16 kHz clip.

    Whisper pads the clip with zeros to 30 s and keeps the frames before the last; the frames
    that cover the clip only depend on the N_FFT // 2 samples after it, so padding with that
    many zeros (no further than 30 s, where Whisper's own reflection starts) gives the same
    frames as Whisper for clips up to 30 s, at a fraction of the cost for short ones. The
    normalisation uses the clip's maximum, which the zero padding never raises.
    """
    audio = torch.as_tensor(audio, dtype=torch.float32)
    n_samples = audio.shape[-1]
    if n_samples < MIN_SAMPLES:
        raise AudioError(f"audio too short for a mel frame ({n_samples} samples; at least {MIN_SAMPLES} needed)")
    audio = F.pad(audio, (0, max(0, min(N_FFT // 2, N_SAMPLES - n_samples))))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., : n_samples // HOP_LENGTH].abs() ** 2
    mel_spec = mel_filters(n_mels).to(audio.device) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def split_for_encoder(audio: np.ndarray) -> list[np.ndarray]:
    """Pieces of at most CHUNK_LENGTH seconds, to encode one by one and concatenate.

    The encoder's positional embedding covers 30 s, so longer clips are cut at 30 s boundaries.
    A last piece shorter than 0.1 s is dropped when other pieces exist: it would add fewer than
    5 encoder frames (under one speech vector after the adapter's 8x downsampling), computed on
    a spectrum normalised over almost nothing. A clip that short on its own is kept: it is all
    there is.
    """
    pieces = [audio[i : i + N_SAMPLES] for i in range(0, len(audio), N_SAMPLES)] or [audio]
    if len(pieces) > 1 and len(pieces[-1]) < MIN_TAIL_SAMPLES:
        pieces.pop()
    return pieces


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM WAV atomically (a killed writer never leaves a half file to be read)."""
    buf = io.BytesIO()
    _soundfile().write(buf, np.asarray(audio), sample_rate, subtype="PCM_16", format="WAV")
    atomic_write_bytes(path, buf.getvalue())


# Pitch: the median F0 of a clip's voiced frames (librosa's YIN), as the corpus labels it
F0_MIN_HZ, F0_MAX_HZ = 60.0, 500.0  # below and above any speaking voice
F0_FRAME_S, F0_HOP_S = 0.04, 0.01  # two periods of the lowest F0 per frame
VOICED_ENERGY = 0.3  # a frame is voiced when its RMS is at least this share of the clip's median (non-silent)


def median_f0(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float | None:
    """The median F0 (Hz) over the clip's loud frames, or None for a clip too short or silent.
    YIN always answers, even on breath: a whispered clip's value means nothing, so the corpus
    does not label its pitch."""
    import librosa

    frame, hop = int(sample_rate * F0_FRAME_S), int(sample_rate * F0_HOP_S)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.size < frame:
        return None
    f0 = librosa.yin(audio, fmin=F0_MIN_HZ, fmax=F0_MAX_HZ, sr=sample_rate, frame_length=frame, hop_length=hop)
    rms = librosa.feature.rms(y=audio, frame_length=frame, hop_length=hop)[0]
    n = min(len(f0), len(rms))
    f0, rms = f0[:n], rms[:n]
    if not (rms > 0).any():
        return None
    voiced = rms >= VOICED_ENERGY * np.median(rms[rms > 0])
    return round(float(np.median(f0[voiced])), 1) if voiced.any() else None
