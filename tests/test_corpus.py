"""`blsp data`: sentence selection, splits, TTS synthesis and manifests of user corpora."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp import corpus
from blsp.audio import SAMPLE_RATE
from blsp.cli import main
from blsp.corpus import (
    CorpusSpec,
    clean_sentence,
    fortune_candidates,
    load_corpus_spec,
    plan_utterances,
    select_sentences,
    split_sentences,
    wordnet_candidates,
)
from blsp.data import read_manifest
from blsp.errors import BlspError

REPO = Path(__file__).resolve().parents[1]


def tone(path: Path, seconds: float = 0.5, rate: int = SAMPLE_RATE, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate, format=fmt)
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, clean", [
    ("  \u201cHello there,\u201d   said the\tman  ", "Hello there, said the man."),
    ("he looked at the quiet sea", "He looked at the quiet sea."),
    ("Don\u2019t panic, it\u2019s only a test!", "Don't panic, it's only a test!"),
    ("Is this the end,", None),  # must end with a letter or . ! ?
    ("Visit www.debian.org for the details", None),  # URL
    ("See http colon slash slash: nothing", None),  # colon
    ("In 1945 the war in Europe ended.", None),  # digits: speech and text would disagree
    ("Caf\u00e9 au lait is what I want today.", None),  # not ASCII
    ("Never trust a computer you cannot lift. - Anonymous", None),  # attribution
    ("long aureate (or golden) hair", None),  # brackets
    ("", None),
])
def test_clean_sentence(raw, clean):
    assert clean_sentence(raw) == clean


def test_select_sentences_dedups_and_filters_by_words():
    got = select_sentences([
        "The cat sat on the mat all day.",
        "the cat sat on the MAT, all day!",  # same words: a duplicate
        "Far too short.",  # 3 words
        "word " * 26,  # 26 words
        "A brand new sentence of six words",
    ], min_words=6, max_words=25)
    assert got == ["The cat sat on the mat all day.", "A brand new sentence of six words."]


def test_fortune_candidates_keep_single_prose_sentences():
    text = "\n%\n".join([
        "A visit to a strange place will bring fresh work.",
        "A sentence that a fortune file wrapped\nonto a second line is still one sentence.",
        "Short one.",
        "First of two sentences here. And the second one follows it.",
        "Some verse that rhymes\n  with an indented line below it.",
        "Two paragraphs in one fortune entry here.\n\nAnd then some more words after it.",
        "Never trust a computer you cannot throw out of a window. -- Steve Wozniak",
    ]) + "\n%\n"
    assert list(fortune_candidates(text)) == [
        "A visit to a strange place will bring fresh work.",
        "A sentence that a fortune file wrapped onto a second line is still one sentence.",
    ]


def test_wordnet_candidates_are_the_quoted_examples():
    lines = [
        '  1 This software and database is provided "as is" and Princeton',
        '00003553 03 n 02 whole 0 unit 0 | an assemblage of parts; "how big is that part compared to the whole?"; '
        '"the team is a unit"',
        "00003993 03 n 01 congener 0 | a whole with no examples",
    ]
    assert list(wordnet_candidates(lines)) == ["how big is that part compared to the whole?", "the team is a unit"]


def test_packaged_text_sources_give_thousands_of_sentences():
    for name, (_, directory, package) in corpus.SOURCES.items():
        if not directory.is_dir():
            pytest.fail(f"{name} is not installed: run `make system-deps` (apt-get install {package})")
    sentences, counts = corpus.gather_sentences(("fortunes", "wordnet"), (), 6, 25)
    assert counts["fortunes"] > 2000 and counts["wordnet"] > 20000
    assert len(sentences) == sum(counts.values()) == len({corpus.dedup_key(s) for s in sentences})


# ----------------------------------------------------------------------------------------------
# Corpus specs and splits
# ----------------------------------------------------------------------------------------------
def small_spec(**kw) -> CorpusSpec:
    base = dict(train_sentences=200, dev_sentences=20, test_sentences=30, voices=("awb", "rms", "kal16"),
                test_voices=("slt",), voices_per_sentence=2, test_seen_voices=1,
                duration_stretch=(0.9, 1.1), pitch_scale=(0.9, 1.1))
    return CorpusSpec(**{**base, **kw})


def test_splits_are_disjoint_by_sentence_and_test_voices_never_train():
    words = "one two three four five six seven".split()
    sentences = [f"Sentence {a} {b} {c} is here." for a in words for b in words for c in words][:260]
    spec = small_spec()
    planned = plan_utterances(split_sentences(sentences, spec), spec)
    by_split = {s: [u for u in planned if u.split == s] for s in ("train", "dev", "test")}
    texts = {s: {u.text for u in us} for s, us in by_split.items()}
    assert [len(texts[s]) for s in ("train", "dev", "test")] == [200, 20, 30]
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    assert {u.voice for u in by_split["train"] + by_split["dev"]} <= {"awb", "rms", "kal16"}
    assert len(by_split["train"]) == 400  # two training voices per train sentence
    for sentence in {u.sentence for u in by_split["test"]}:  # each test sentence: unseen + seen voice
        voices = [u.voice for u in by_split["test"] if u.sentence == sentence]
        assert voices[0] == "slt" and voices[1] in spec.voices and len(voices) == 2
    assert len({u.id for u in planned}) == len({u.audio for u in planned}) == len(planned)
    assert {u.pitch_scale for u in planned if u.voice == "rms"} == {1.0}  # rms has no pitch control
    assert len({u.pitch_scale for u in planned if u.voice == "awb"}) > 10
    # more train sentences later: dev and test (and their clips) stay as they were
    bigger = small_spec(train_sentences=210)
    again = plan_utterances(split_sentences(sentences, bigger), bigger)
    assert [u for u in again if u.split != "train"] == [u for u in planned if u.split != "train"]


def test_corpus_spec_files_load_and_flags_override(tmp_path):
    demo = load_corpus_spec(REPO / "recipes" / "data" / "demo.yaml")
    full = load_corpus_spec(REPO / "recipes" / "data" / "full.yaml")
    assert "slt" in demo.test_voices and not set(demo.test_voices) & set(demo.voices)
    assert full.train_sentences > demo.train_sentences
    assert load_corpus_spec(REPO / "recipes" / "data" / "demo.yaml", train_sentences=7, seed=None).train_sentences == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_sentences: 5\nvoice: [awb]\n")
    with pytest.raises(BlspError, match="unknown setting.*voice"):
        load_corpus_spec(bad)
    bad.write_text("train_sentences: 5\ndev_sentences: 1\ntest_sentences: 1\nvoices: [awb]\ntest_voices: [awb]\n")
    with pytest.raises(BlspError, match="corpus spec: test voices must never train, but awb is in both"):
        load_corpus_spec(bad)


def test_synth_takes_its_corpus_spec_by_spec():
    parser = argparse.ArgumentParser()
    corpus.add_data_parser(parser.add_subparsers())
    assert parser.parse_args(["data", "synth", "--output", "out", "--spec", "my.yaml"]).spec == "my.yaml"
    assert parser.parse_args(["data", "synth", "--output", "out"]).spec is None


# ----------------------------------------------------------------------------------------------
# Synthesis
# ----------------------------------------------------------------------------------------------
SIX = [
    "The quick brown fox jumps over the lazy dog.",
    "A visit to a strange place will bring fresh work.",
    "She found that he had lied to her again.",
    "The ship rolled on the heavy seas all night.",
    "Anything worth doing is worth doing slowly and well.",
    "The home team easily demolished the visitors today.",
]


def synth_args(out: Path, text: Path) -> list[str]:
    return ["data", "synth", "--output", str(out), "--text", str(text), "--sentences", "4", "--dev-sentences", "1",
            "--test-sentences", "1", "--voices", "kal", "--test-voices", "slt", "--voices-per-sentence", "1"]


def test_synth_makes_16k_mono_manifests_and_resumes(tmp_path, capsys):
    if shutil.which("flite") is None:
        pytest.fail("flite is not installed: run `make system-deps` (apt-get install flite)")
    text = tmp_path / "six.txt"
    text.write_text("\n".join(SIX + ["Too short.", SIX[0].upper()]) + "\n")  # both dropped
    out = tmp_path / "corpus"
    assert main(synth_args(out, text)) == 0
    manifests = {s: read_manifest(out / f"{s}.jsonl").utterances for s in ("train", "dev", "test")}
    assert [len(manifests[s]) for s in ("train", "dev", "test")] == [4, 1, 2]
    for split, utts in manifests.items():
        for utt in utts:
            info = sf.info(utt.audio.path)
            assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1) and info.duration > 1.0  # kal is 8 kHz
            assert utt.extra["split"] == split and utt.text in SIX
    assert [(u.extra["voice"], u.extra["voice_seen"]) for u in manifests["test"]] == [("slt", False), ("kal", True)]
    summary = json.loads((out / "corpus.json").read_text())
    assert summary["counts"]["train"] == {"sentences": 4, "utterances": 4}
    assert summary["spec"]["voices"] == ["kal"] and summary["spec_file"].endswith("demo.yaml")
    assert summary["synthesis"]["made"] == 7 and summary["text"]["usable_sentences"] == 6

    wavs = sorted((out / "wav").rglob("*.wav"))
    mtimes = [w.stat().st_mtime_ns for w in wavs]
    assert main(synth_args(out, text)) == 0
    assert "0 clips made" in capsys.readouterr().out
    assert [w.stat().st_mtime_ns for w in wavs] == mtimes


def test_synth_names_missing_voices_and_their_package(tmp_path, monkeypatch):
    text = tmp_path / "six.txt"
    text.write_text("\n".join(SIX) + "\n")
    args = synth_args(tmp_path / "c", text)
    with pytest.raises(BlspError, match="voice 'nosuch' is not installed: the Debian package flite"):
        corpus.cmd_synth(build(args[:-5] + ["nosuch"] + args[-4:]))
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(BlspError, match="voice 'kal' needs flite: apt-get install flite"):
        corpus.cmd_synth(build(args))
    assert not (tmp_path / "c" / "train.jsonl").exists()


def build(args: list[str]):
    from blsp.cli import build_parser

    return build_parser().parse_args(args)


# ----------------------------------------------------------------------------------------------
# Manifests of user corpora
# ----------------------------------------------------------------------------------------------
def test_manifest_from_dir_of_audio_and_transcripts(tmp_path):
    root = tmp_path / "mine"
    tone(root / "a.wav")
    (root / "a.txt").write_text("first  clip\n")
    tone(root / "sub" / "b.flac", fmt="FLAC")
    (root / "sub" / "b.lab").write_text("second clip")
    tone(root / "orphan.wav")  # no transcript: skipped
    out = tmp_path / "out" / "m.jsonl"
    assert main(["data", "manifest", "--dir", str(root), "--output", str(out)]) == 0
    assert [(r["id"], r["audio"], r["text"]) for r in records(out)] == [
        ("a", "../mine/a.wav", "first clip"), ("sub/b", "../mine/sub/b.flac", "second clip")]
    assert len(read_manifest(out).utterances) == 2


def test_manifest_from_librispeech_tree(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    for uid in ("84-121123-0000", "84-121123-0001"):
        tone(chapter / f"{uid}.flac", fmt="FLAC")
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n")
    out = tmp_path / "ls.jsonl"
    subset = str(tmp_path / "LibriSpeech" / "dev-clean")
    assert main(["data", "manifest", "--librispeech", subset, "--output", str(out)]) == 0
    assert [(r["id"], r["text"], r["speaker"]) for r in records(out)] == [
        ("84-121123-0000", "GO DO YOU HEAR", "84"), ("84-121123-0001", "BUT IN LESS THAN FIVE MINUTES", "84")]
    assert records(out)[0]["audio"] == "LibriSpeech/dev-clean/84/121123/84-121123-0000.flac"
    assert len(read_manifest(out).utterances) == 2


def test_manifest_from_commonvoice_tsv(tmp_path):
    cv = tmp_path / "cv"
    tone(cv / "clips" / "common_voice_en_1.wav")
    tone(cv / "clips" / "common_voice_en_2.wav")
    (cv / "dev.tsv").write_text("client_id\tpath\tsentence\tup_votes\n"
                                'c1\tcommon_voice_en_1.wav\tHe said "hi" to me.\t2\n'
                                "c2\tcommon_voice_en_2.wav\tA second sentence.\t3\n")
    out = tmp_path / "cv.jsonl"
    assert main(["data", "manifest", "--commonvoice", str(cv / "dev.tsv"), "--output", str(out)]) == 0
    assert [(r["id"], r["audio"], r["text"], r["speaker"]) for r in records(out)] == [
        ("common_voice_en_1", "cv/clips/common_voice_en_1.wav", 'He said "hi" to me.', "c1"),
        ("common_voice_en_2", "cv/clips/common_voice_en_2.wav", "A second sentence.", "c2")]
    (cv / "bad.tsv").write_text("path\ttext\ncommon_voice_en_1.wav\thello\n")
    with pytest.raises(BlspError, match="no column sentence"):
        corpus.commonvoice_records(cv / "bad.tsv")


def test_manifest_from_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    clips = [str(tone(tmp_path / "src" / f"{i}.wav", rate=8000)) for i in range(2)]
    table = {"audio": clips, "sentence": ["one clip", "another clip"]}
    datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio()).save_to_disk(tmp_path / "saved")
    out = tmp_path / "hf" / "m.jsonl"
    assert main(["data", "manifest", "--hf", str(tmp_path / "saved"), "--split", "dev", "--text-column", "sentence",
                 "--output", str(out)]) == 0
    utts = read_manifest(out).utterances
    assert [(u.id, u.text) for u in utts] == [("dev-0", "one clip"), ("dev-1", "another clip")]
    assert all(r["audio"].startswith("wav/") for r in records(out))
    assert sf.info(utts[0].audio.path).samplerate == SAMPLE_RATE


def test_manifest_bad_inputs_are_user_errors(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    for flag in ("--dir", "--librispeech", "--commonvoice"):
        assert main(["data", "manifest", flag, missing, "--output", str(tmp_path / "m.jsonl")]) == 2
        assert missing in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(BlspError, match="no utterances found"):
        corpus.cmd_manifest(build(["data", "manifest", "--dir", str(tmp_path / "empty"), "--output", "m.jsonl"]))
    chapter = tmp_path / "ls" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2.trans.txt").write_text("1-2-0000 NO AUDIO FOR THIS\n")
    with pytest.raises(BlspError, match=r"1-2.trans.txt:1: audio file not found"):
        corpus.librispeech_records(tmp_path / "ls")
