"""blsp.degrade: each condition measured on white noise and sines, seeded per clip, and `blsp data degrade`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from blsp.cli import main
from blsp.data import load_utterance_audio, read_manifest
from blsp.degrade import (
    CONDITIONS,
    GAIN_DB_RANGE,
    PEAK_LIMIT,
    TEST_CONDITIONS,
    check_conditions,
    clip_rng,
    degrade,
    degrade_manifest,
)
from blsp.errors import BlspError
from conftest import tone, write_corpus

SR = 16000


def white(seconds: float, std: float = 0.1, seed: int = 0) -> np.ndarray:
    return (std * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def band_energy(wave: np.ndarray, low: float, high: float) -> float:
    power = np.abs(np.fft.rfft(wave.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / SR)
    return float(power[(freqs >= low) & (freqs < high)].sum())


def peak_frequency(wave: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(wave.astype(np.float64)))
    return float(np.fft.rfftfreq(len(wave), 1 / SR)[power.argmax()])


# ----------------------------------------------------------------------------------------------
# The conditions
# ----------------------------------------------------------------------------------------------
def test_the_conditions():
    assert set(TEST_CONDITIONS) <= set(CONDITIONS)
    assert set(CONDITIONS) == {"telephone", "noise", "reverb", "speed", "gain", "mixed"}
    assert all(c.name == name and c.description for name, c in CONDITIONS.items())


@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_every_condition_keeps_a_finite_float32_wave_under_the_peak_limit(condition):
    loud = white(0.4, std=0.5)  # peaks near 2: every condition's output is over the limit unless scaled
    out = degrade(loud, condition, clip_rng(condition, "u0"))
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) > 0.5 * len(loud)
    assert np.isfinite(out).all()
    assert np.abs(out).max() <= PEAK_LIMIT + 1e-6
    if condition not in ("speed", "mixed"):
        assert len(out) == len(loud)


def test_a_quiet_clip_is_not_scaled_up():
    quiet = tone(0.5, 1000.0, amp=0.1)  # 1 kHz: inside the telephone band
    out = degrade(quiet, "telephone", clip_rng("telephone", "q"))
    middle = slice(SR // 10, -SR // 10)  # away from the filters' edges
    assert np.abs(out[middle]).max() == pytest.approx(0.1, rel=0.05)


def test_telephone_removes_the_band_above_4khz_and_below_200hz():
    clean = white(1.0)
    out = degrade(clean, "telephone", clip_rng("telephone", "u0"))
    assert band_energy(out, 4200, 8001) < 1e-3 * band_energy(clean, 4200, 8001)  # measured ~2e-6
    assert band_energy(out, 0, 200) < 0.1 * band_energy(clean, 0, 200)          # measured ~0.04 (300 Hz high-pass)
    assert band_energy(out, 0, 100) < 0.01 * band_energy(clean, 0, 100)
    assert band_energy(out, 500, 3500) == pytest.approx(band_energy(clean, 500, 3500), rel=0.05)  # the voice band


def test_speed_shortens_by_1_2_and_raises_the_pitch():
    clean = tone(1.2, 440.0)
    out = degrade(clean, "speed", None)  # speed draws nothing
    assert abs(len(out) - len(clean) / 1.2) <= 1
    assert peak_frequency(out) == pytest.approx(440.0 * 1.2, abs=2.0)


def test_noise_is_added_10db_below_a_sine():
    clean = tone(1.0, 440.0, amp=0.3)
    out = degrade(clean, "noise", clip_rng("noise", "u0"))
    assert np.abs(out).max() < PEAK_LIMIT  # not scaled: the difference is the noise itself
    added = out.astype(np.float64) - clean
    snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(added ** 2))
    assert snr == pytest.approx(10.0, abs=1.5)
    # pink: more of the noise below 1 kHz than in the same width above 4 kHz
    assert band_energy(added, 20, 1020) > 3 * band_energy(added, 4000, 5000)


def test_gain_stays_in_its_range():
    clean = tone(0.2, 440.0, amp=0.1)
    for utt in ("a", "b", "c", "d"):
        out = degrade(clean, "gain", clip_rng("gain", utt))
        db = 20 * np.log10(np.abs(out).max() / np.abs(clean).max())
        assert GAIN_DB_RANGE[0] - 1e-3 <= db <= GAIN_DB_RANGE[1] + 1e-3


def test_reverb_spreads_a_click_in_time():
    click = np.zeros(SR // 2, dtype=np.float32)
    click[100] = 0.5
    out = degrade(click, "reverb", clip_rng("reverb", "u0"))
    assert len(out) == len(click)
    tail = np.abs(out[100 + SR // 20:])  # 50 ms after the click
    assert tail.max() > 1e-3 and (tail > 1e-4).sum() > 1000  # RT60 0.6 s: still ringing


# ----------------------------------------------------------------------------------------------
# Seeded per clip
# ----------------------------------------------------------------------------------------------
def test_the_same_clip_and_condition_give_the_same_output():
    clean = tone(0.5, 300.0)
    first = degrade(clean, "noise", clip_rng("noise", "u0"))
    np.random.seed(123)  # the global generator (audiomentations draws from it) does not matter
    assert np.array_equal(first, degrade(clean, "noise", clip_rng("noise", "u0")))
    assert not np.array_equal(first, degrade(clean, "noise", clip_rng("noise", "u1")))           # another clip
    assert not np.array_equal(first, degrade(clean, "noise", clip_rng("noise", "u0", seed=1)))   # another seed


@pytest.mark.parametrize("condition, utt", [("reverb", "u0"), ("mixed", "u1")])  # mixed's u1 draws the reverb
def test_the_room_is_seeded_by_the_clip_too(condition, utt):
    short = tone(0.3, 300.0)
    first = degrade(short, condition, clip_rng(condition, utt))
    assert np.array_equal(first, degrade(short, condition, clip_rng(condition, utt)))


def test_clip_rng_depends_on_condition_id_and_seed():
    def draw(*args, **kw):
        return clip_rng(*args, **kw).integers(2**62, size=4).tolist()

    assert draw("noise", "u0") == draw("noise", "u0")
    assert len({str(draw("noise", "u0")), str(draw("reverb", "u0")), str(draw("noise", "u1")),
                str(draw("noise", "u0", seed=1))}) == 4


def test_check_conditions():
    assert check_conditions(["speed", "noise"]) == ("speed", "noise")
    with pytest.raises(BlspError) as err:
        check_conditions(["speed", "phone", "echo"])
    assert "phone, echo" in str(err.value)
    assert "known: telephone, noise, reverb, speed, gain, mixed" in str(err.value)
    with pytest.raises(BlspError, match=r"\(none given\)"):
        check_conditions([])


# ----------------------------------------------------------------------------------------------
# A manifest
# ----------------------------------------------------------------------------------------------
def test_degrade_manifest_keeps_every_field_and_reads_back(tmp_path):
    manifest = write_corpus(tmp_path / "data", n=3, with_continuation=True, seconds=0.3)
    originals = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = tmp_path / "degraded"
    written = degrade_manifest(manifest, out, ["telephone", "speed"], progress=False)
    assert written == {"telephone": out / "telephone.jsonl", "speed": out / "speed.jsonl"}
    clean = {u.id: load_utterance_audio(u) for u in read_manifest(manifest).utterances}
    for name, path in written.items():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 3
        for original, record in zip(originals, records):
            kept = ("audio", "condition", "source_audio", "id", "source_id")
            assert {k: v for k, v in record.items() if k not in kept} == \
                {k: v for k, v in original.items() if k not in ("audio", "id")}  # continuation, truncated kept
            assert record["id"] == f"{original['id']}@{name}" and record["source_id"] == original["id"]
            assert record["condition"] == name
            assert record["source_audio"] == str(manifest.parent / original["audio"])
            assert not os.path.isabs(record["audio"]) and record["audio"].startswith(f"{name}/")
            assert record["audio"].endswith(".wav") and (out / record["audio"]).is_file()
        utts = read_manifest(path).utterances
        assert [u.id for u in utts] == [f"{r['id']}@{name}" for r in originals]
        assert [u.extra["continuation"] for u in utts] == [r["continuation"] for r in originals]
        for utt in utts:
            wave = load_utterance_audio(utt)
            n = len(clean[utt.extra["source_id"]])
            assert abs(len(wave) - (n / 1.2 if name == "speed" else n)) <= 1
            assert 0 < np.abs(wave).max() <= PEAK_LIMIT + 1e-4
    assert sf.info(out / records[0]["audio"]).samplerate == SR


def test_a_rerun_keeps_the_clips_already_written(tmp_path):
    manifest = write_corpus(tmp_path / "data", n=2, seconds=0.3)
    out = tmp_path / "degraded"
    degrade_manifest(manifest, out, ["noise"], progress=False)
    wavs = sorted((out / "noise").glob("*.wav"))
    assert len(wavs) == 2
    before = {w: (w.stat().st_mtime_ns, w.read_bytes()) for w in wavs}
    lines = (out / "noise.jsonl").read_text()
    os.utime(wavs[0], ns=(1, 1))  # an old file: a rewrite would change its mtime
    stamps = {w: w.stat().st_mtime_ns for w in wavs}
    degrade_manifest(manifest, out, ["noise"], progress=False)
    assert {w: w.stat().st_mtime_ns for w in wavs} == stamps
    assert all(w.read_bytes() == before[w][1] for w in wavs)
    assert (out / "noise.jsonl").read_text() == lines
    # a fresh directory gets the same bytes: each clip's noise is seeded by its id
    again = tmp_path / "again"
    degrade_manifest(manifest, again, ["noise"], progress=False)
    assert [w.read_bytes() for w in sorted((again / "noise").glob("*.wav"))] == [before[w][1] for w in wavs]


def test_ids_that_differ_only_in_their_directory_get_separate_files(tmp_path):
    manifest = write_corpus(tmp_path / "data", n=2, seconds=0.3)
    rows = [dict(json.loads(line), id=i) for line, i in zip(manifest.read_text().splitlines(), ["a/take", "b/take"])]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "degraded"
    degrade_manifest(manifest, out, ["speed"], progress=False)
    audio = [json.loads(line)["audio"] for line in (out / "speed.jsonl").read_text().splitlines()]
    assert len(set(audio)) == 2 and all(a.startswith("speed/take-") for a in audio)
    lengths = [len(load_utterance_audio(u)) for u in read_manifest(out / "speed.jsonl").utterances]
    assert lengths[0] != lengths[1]  # each its own clip (write_corpus's clips differ in length)


def test_an_empty_manifest_or_unknown_condition_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BlspError, match="no utterances"):
        degrade_manifest(empty, tmp_path / "out", ["speed"], progress=False)
    manifest = write_corpus(tmp_path / "data", n=1, seconds=0.3)
    with pytest.raises(BlspError, match="known: telephone"):
        degrade_manifest(manifest, tmp_path / "out2", ["speed", "hall"], progress=False)
    assert not (tmp_path / "out2").exists()  # checked before anything is written


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def test_the_command_writes_the_test_conditions_by_default(tmp_path, capsys):
    manifest = write_corpus(tmp_path / "data", n=1, seconds=0.3)
    out = tmp_path / "degraded"
    assert main(["data", "degrade", "--manifest", str(manifest), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in TEST_CONDITIONS:
        assert (out / f"{name}.jsonl").is_file() and len(list((out / name).glob("*.wav"))) == 1
        assert f"data degrade: {name} ({CONDITIONS[name].description}) -> {out / f'{name}.jsonl'}" in printed
    assert not (out / "gain").exists()


def test_the_command_takes_conditions_and_a_seed(tmp_path, capsys):
    manifest = write_corpus(tmp_path / "data", n=2, seconds=0.3)
    for seed, out in (("0", tmp_path / "s0"), ("7", tmp_path / "s7")):
        code = main(["data", "degrade", "--manifest", str(manifest), "--output", str(out),
                     "--conditions", " noise, speed ,", "--seed", seed])
        assert code == 0
        assert sorted(p.name for p in out.glob("*.jsonl")) == ["noise.jsonl", "speed.jsonl"]
    s0, s7 = (sorted((tmp_path / s / "noise").glob("*.wav")) for s in ("s0", "s7"))
    assert [p.name for p in s0] == [p.name for p in s7]
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(s0, s7))  # another seed, other noise
    assert [p.read_bytes() for p in sorted((tmp_path / "s0" / "speed").glob("*.wav"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "s7" / "speed").glob("*.wav"))]  # speed draws nothing
    capsys.readouterr()
    code = main(["data", "degrade", "--manifest", str(manifest), "--output", str(tmp_path / "x"),
                 "--conditions", "telephone,hallway"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown condition(s) hallway" in err and "known: telephone, noise, reverb" in err
