from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from blsp.audio import (
    HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, AudioRef, load_audio,
    log_mel_spectrogram, split_for_encoder, write_wav,
)
from blsp.errors import BlspError


def sine(freq: float, sample_rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(audio: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / sample_rate)[spectrum.argmax()])


def test_constants():
    assert (SAMPLE_RATE, HOP_LENGTH, N_SAMPLES, N_FRAMES) == (16000, 160, 480000, 3000)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_resampling_keeps_length_and_frequency(tmp_path, rate):
    path = tmp_path / "tone.wav"
    sf.write(path, sine(1000, rate, 2.0), rate, subtype="FLOAT")
    audio = load_audio(str(path))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 2 * SAMPLE_RATE) <= 1
    assert peak_frequency(audio, SAMPLE_RATE) == pytest.approx(1000, abs=1.0)
    assert np.abs(audio).max() == pytest.approx(0.5, abs=0.02)  # HQ resampling keeps the level


def test_16k_input_is_read_unchanged(tmp_path):
    data = np.random.default_rng(0).uniform(-0.9, 0.9, 16000).astype(np.float32)
    sf.write(tmp_path / "x.wav", data, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "x.wav"), data)


def test_stereo_is_downmixed_by_mean(tmp_path):
    rng = np.random.default_rng(1)
    stereo = rng.uniform(-0.5, 0.5, (16000, 2)).astype(np.float32)
    sf.write(tmp_path / "st.wav", stereo, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "st.wav"), stereo.mean(axis=1), atol=1e-7)


def test_offset_form_reads_exactly_the_requested_samples(tmp_path):
    data = np.random.default_rng(2).uniform(-0.9, 0.9, 32000).astype(np.float32)
    sf.write(tmp_path / "long.wav", data, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio("long.wav:1000:500", base_dir=tmp_path), data[1000:1500])
    ref = AudioRef.parse(f"{tmp_path}/long.wav:31000:1000")
    np.testing.assert_array_equal(load_audio(ref), data[31000:])


def test_offsets_count_samples_at_the_files_own_rate(tmp_path):
    sf.write(tmp_path / "8k.wav", sine(500, 8000, 3.0), 8000)
    assert abs(len(load_audio(f"{tmp_path}/8k.wav:8000:8000")) - SAMPLE_RATE) <= 1


def test_offset_range_outside_the_file_is_an_error(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(1000, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"samples 900\.\.1100 are outside the file \(1000 samples\)"):
        load_audio(f"{tmp_path}/a.wav:900:200")


def test_silence_is_valid(tmp_path):
    sf.write(tmp_path / "quiet.wav", np.zeros(8000, np.float32), SAMPLE_RATE)
    audio = load_audio(tmp_path / "quiet.wav")
    assert len(audio) == 8000 and not audio.any()


def test_zero_length_file_is_an_error(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(tmp_path / "empty.wav")


def test_clip_shorter_than_a_mel_frame_is_an_error(tmp_path):
    sf.write(tmp_path / "blip.wav", np.ones(100, np.float32) * 0.1, SAMPLE_RATE)
    with pytest.raises(AudioError, match="too short"):
        load_audio(tmp_path / "blip.wav")


def test_missing_file_names_the_reason(tmp_path):
    with pytest.raises(AudioError, match=f"audio file not found: {tmp_path}/nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_file_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "bad.wav").write_bytes(np.random.default_rng(3).bytes(4000))
    with pytest.raises(BlspError, match="cannot read audio file .*bad.wav: Format not recognised") as info:
        load_audio(tmp_path / "bad.wav")
    assert not isinstance(info.value, RuntimeError)


def test_audio_ref_parsing(tmp_path):
    assert AudioRef.parse("a.wav:10:20", "/data") == AudioRef("/data/a.wav", 10, 20)
    assert AudioRef.parse("/abs/a.wav", "/data") == AudioRef("/abs/a.wav")
    assert AudioRef.parse("sub/../a.wav", "/data") == AudioRef("/data/a.wav")
    # ':' inside a path is only an offset separator when the last two fields are integers
    assert AudioRef.parse(r"C:\clips\a.wav") == AudioRef(r"C:\clips\a.wav")
    assert AudioRef.parse("take:2.wav", "/d") == AudioRef("/d/take:2.wav")
    assert AudioRef.parse("x:1:a.wav", "/d") == AudioRef("/d/x:1:a.wav")
    assert AudioRef.parse("x:1:2:3", "/d") == AudioRef("/d/x:1", 2, 3)
    assert str(AudioRef("/d/a.wav", 5, 7)) == "/d/a.wav:5:7"


@pytest.mark.parametrize("n_samples", [200, 3 * SAMPLE_RATE + 37, 29 * SAMPLE_RATE + 15950, N_SAMPLES])
def test_log_mel_matches_whisper_feature_extractor(n_samples):
    rng = np.random.default_rng(n_samples)
    audio = (sine(440, SAMPLE_RATE, n_samples / SAMPLE_RATE, 0.3)[:n_samples]
             + 0.05 * rng.standard_normal(n_samples).astype(np.float32))
    reference = WhisperFeatureExtractor(feature_size=80)(
        audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]
    mel = log_mel_spectrogram(audio)
    n = n_samples // HOP_LENGTH
    assert mel.shape == (80, n)
    # every frame, including the last ones, equals Whisper's for the 30 s-padded clip
    torch.testing.assert_close(mel, reference[:, :n], atol=1e-4, rtol=0)


def test_log_mel_of_a_tensor_with_128_mels():
    audio = torch.from_numpy(sine(300, SAMPLE_RATE, 1.0))
    reference = WhisperFeatureExtractor(feature_size=128)(
        audio.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]
    torch.testing.assert_close(log_mel_spectrogram(audio, n_mels=128), reference[:, :100], atol=1e-4, rtol=0)


def test_log_mel_of_too_short_audio_is_an_error():
    with pytest.raises(AudioError, match="too short"):
        log_mel_spectrogram(np.zeros(HOP_LENGTH - 1, np.float32))


def test_split_65_s_gives_30_30_5():
    audio = np.arange(65 * SAMPLE_RATE, dtype=np.float32)
    pieces = split_for_encoder(audio)
    assert [len(p) / SAMPLE_RATE for p in pieces] == [30, 30, 5]
    np.testing.assert_array_equal(np.concatenate(pieces), audio)


def test_split_drops_a_tail_under_a_tenth_of_a_second_only_when_other_pieces_exist():
    assert [len(p) for p in split_for_encoder(np.zeros(N_SAMPLES + 1599, np.float32))] == [N_SAMPLES]
    assert [len(p) for p in split_for_encoder(np.zeros(N_SAMPLES + 1600, np.float32))] == [N_SAMPLES, 1600]
    assert [len(p) for p in split_for_encoder(np.zeros(800, np.float32))] == [800]
    assert [len(p) for p in split_for_encoder(np.zeros(N_SAMPLES, np.float32))] == [N_SAMPLES]


def test_write_wav_round_trip(tmp_path):
    audio = sine(440, SAMPLE_RATE, 0.5)
    write_wav(tmp_path / "out" / "x.wav", audio)
    info = sf.info(tmp_path / "out" / "x.wav")
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    np.testing.assert_allclose(load_audio(tmp_path / "out" / "x.wav"), audio, atol=1 / 32768)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.wav"]  # no temp file left


def voiced(f0: float, seconds: float = 1.0, sr: int = 16000) -> np.ndarray:
    """A buzz of five harmonics at `f0`, with a silent half second before it (not counted)."""
    t = np.arange(int(seconds * sr)) / sr
    buzz = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)).astype(np.float32) * 0.2
    return np.concatenate([np.zeros(sr // 2, dtype=np.float32), buzz])


@pytest.mark.parametrize("f0", [90.0, 140.0, 220.0])
def test_median_f0_measures_the_voiced_frames(f0):
    from blsp.audio import median_f0

    assert median_f0(voiced(f0)) == pytest.approx(f0, rel=0.02)


def test_median_f0_of_silence_or_a_sliver_is_none():
    from blsp.audio import median_f0

    assert median_f0(np.zeros(16000, dtype=np.float32)) is None
    assert median_f0(np.ones(100, dtype=np.float32)) is None
