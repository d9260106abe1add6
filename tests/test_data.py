from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp.audio import SAMPLE_RATE, AudioRef, load_audio
from blsp.data import load_utterance_audio, normalize_transcript, read_hf_dataset, read_jsonl, read_manifest
from blsp.errors import BlspError, InputError


def make_wav(path: Path, seconds: float = 0.5, rate: int = SAMPLE_RATE, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    sf.write(path, rng.uniform(-0.5, 0.5, (int(rate * seconds), channels)).astype(np.float32), rate)
    return path


def write_lines(path: Path, lines: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            if not isinstance(line, bytes):
                line = (line if isinstance(line, str) else json.dumps(line)).encode()
            f.write(line + b"\n")
    return str(path)


def test_reads_fields_extra_and_line_numbers(tmp_path):
    make_wav(tmp_path / "a.wav")
    make_wav(tmp_path / "b.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [
        {"audio": "a.wav", "text": "hello there", "id": "u1", "continuation": "and more", "speaker": 7},
        "",
        "   ",
        {"audio": "b.wav", "text": "second", "id": 42},
        {"audio": "a.wav:100:1000", "text": "third"},
    ])
    result = read_manifest(manifest)
    assert result.skipped == []
    first, second, third = result.utterances
    assert (first.id, first.text, first.line, first.source) == ("u1", "hello there", 1, manifest)
    assert first.extra == {"continuation": "and more", "speaker": 7}
    assert first.audio == AudioRef(str(tmp_path / "a.wav"))
    assert (second.id, second.line) == ("42", 4)  # integer ids are stringified; blank lines counted
    assert third.id == "a.wav:100:1000"  # no id: the audio string as written
    assert third.audio == AudioRef(str(tmp_path / "a.wav"), 100, 1000)


def test_relative_paths_resolve_against_the_manifest_dir(tmp_path, monkeypatch):
    make_wav(tmp_path / "corpus" / "clips" / "a.wav")
    make_wav(tmp_path / "elsewhere.wav")
    manifest = write_lines(tmp_path / "corpus" / "lists" / "m.jsonl", [
        {"audio": "../clips/a.wav", "text": "x"},
        {"audio": str(tmp_path / "elsewhere.wav"), "text": "y"},
    ])
    monkeypatch.chdir(tmp_path)  # not the manifest's directory
    utts = read_manifest(manifest).utterances
    assert utts[0].audio.path == str(tmp_path / "corpus" / "clips" / "a.wav")
    assert utts[1].audio.path == str(tmp_path / "elsewhere.wav")
    assert len(load_audio(utts[0].audio)) == SAMPLE_RATE // 2


def test_relative_manifest_path(tmp_path, monkeypatch):
    make_wav(tmp_path / "d" / "a.wav")
    write_lines(tmp_path / "d" / "m.jsonl", [{"audio": "a.wav", "text": "x"}])
    monkeypatch.chdir(tmp_path)
    (utt,) = read_manifest("d/m.jsonl").utterances
    assert utt.audio.path == str(tmp_path / "d" / "a.wav") and utt.source == "d/m.jsonl"


def corrupt(tmp_path: Path) -> str:
    (tmp_path / "bad.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    return "bad.wav"


def empty(tmp_path: Path) -> str:
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    return "empty.wav"


def folder(tmp_path: Path) -> str:
    (tmp_path / "clips.wav").mkdir(exist_ok=True)
    return "clips.wav"


def float_wav_with(value: float):
    """A float WAV (the one common format that can hold them) with one NaN or infinite sample."""
    def write(tmp_path: Path) -> str:
        samples = np.zeros(SAMPLE_RATE // 2, np.float32)
        samples[1234] = value
        name = f"float-{value}.wav"
        sf.write(tmp_path / name, samples, SAMPLE_RATE, subtype="FLOAT")
        return name
    return write


BAD_LINES = {
    "not json": (b'{"audio": "good.wav", "text": ', "not valid JSON"),
    "not an object": (b'["good.wav", "hi"]', "not a JSON object (got list)"),
    "bad utf-8": (b'{"audio": "good.wav", "text": "\xff\xfe"}', "not valid UTF-8"),
    "missing audio": ({"text": "hi"}, "missing `audio`"),
    "audio not a string": ({"audio": 3, "text": "hi"}, "`audio` must be a non-empty string"),
    "missing text": ({"audio": "good.wav"}, "missing or empty `text`"),
    "empty text": ({"audio": "good.wav", "text": "  "}, "missing or empty `text`"),
    "text not a string": ({"audio": "good.wav", "text": ["hi"]}, "`text` must be a string, not list"),
    "bad id": ({"audio": "good.wav", "text": "hi", "id": None}, "`id` must be a non-empty string or integer"),
    "missing file": ({"audio": "nope.wav", "text": "hi"}, "audio file not found: "),
    "corrupt file": (corrupt, "cannot read audio file "),
    "zero-length file": (empty, "no audio samples"),
    "offset outside file": ({"audio": "good.wav:7000:2000", "text": "hi"}, "are outside the file (8000 samples)"),
    "duplicate id": ({"audio": "good.wav", "text": "again", "id": "first"}, "duplicate id 'first' (first on line 1)"),
    "directory": (folder, "is a directory, not a file"),
    "NaN samples": (float_wav_with(np.nan), "audio contains NaN or infinite samples"),
    "infinite samples": (float_wav_with(-np.inf), "audio contains NaN or infinite samples"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_every_error_names_file_and_line(tmp_path, kind):
    make_wav(tmp_path / "good.wav")
    line, reason = BAD_LINES[kind]
    if callable(line):
        line = {"audio": line(tmp_path), "text": "hi"}
    manifest = write_lines(tmp_path / "m.jsonl", [{"audio": "good.wav", "text": "ok", "id": "first"}, "", line])
    with pytest.raises(InputError) as info:
        read_manifest(manifest)
    assert str(info.value).startswith(f"{manifest}:3: ")
    assert reason in str(info.value)
    assert (info.value.path, info.value.line) == (manifest, 3)


def test_skip_bad_collects_every_bad_line(tmp_path):
    make_wav(tmp_path / "good.wav")
    lines = [{"audio": "good.wav", "text": "ok", "id": "first"}]
    for kind, (line, _) in BAD_LINES.items():
        lines.append({"audio": line(tmp_path), "text": "hi"} if callable(line) else line)
        lines.append({"audio": "good.wav", "text": "fine", "id": f"after {kind}"})
    manifest = write_lines(tmp_path / "m.jsonl", lines)
    result = read_manifest(manifest, skip_bad=True)
    assert [e.line for e in result.skipped] == list(range(2, 2 * len(BAD_LINES) + 1, 2))
    assert [reason in str(e) for e, (_, reason) in zip(result.skipped, BAD_LINES.values())] == [True] * len(BAD_LINES)
    assert all(str(e).startswith(f"{manifest}:{e.line}: ") for e in result.skipped)
    assert [u.line for u in result.utterances] == [1] + list(range(3, 2 * len(BAD_LINES) + 2, 2))


def test_duplicate_ids_keep_the_first(tmp_path):
    make_wav(tmp_path / "a.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [
        {"audio": "a.wav", "text": "one"},
        {"audio": "a.wav", "text": "two"},  # same default id: the audio string
        {"audio": "a.wav", "text": "three", "id": "a.wav"},
    ])
    with pytest.raises(InputError, match=r"m\.jsonl:2: duplicate id 'a\.wav' \(first on line 1\)"):
        read_manifest(manifest)
    result = read_manifest(manifest, skip_bad=True)
    assert [u.text for u in result.utterances] == ["one"]
    assert [e.line for e in result.skipped] == [2, 3]


def test_text_optional_and_audio_check_off(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", [{"audio": "later.wav"}])
    with pytest.raises(InputError, match="missing or empty `text`"):
        read_manifest(manifest, check_audio=False)
    (utt,) = read_manifest(manifest, require_text=False, check_audio=False).utterances
    assert utt.text == "" and utt.audio.path == str(tmp_path / "later.wav")


@pytest.mark.parametrize("content", ["", "\n   \n\n"])
@pytest.mark.parametrize("skip_bad", [False, True])
def test_an_empty_manifest_is_an_error_naming_it(tmp_path, content, skip_bad):
    """Nothing to read is a mistake (a wrong path, a failed export), not a run with nothing to do."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    with pytest.raises(InputError, match=f"^{manifest}: no utterances: the manifest is empty$"):
        read_manifest(manifest, skip_bad=skip_bad)


def test_only_the_referenced_samples_must_be_finite(tmp_path):
    name = float_wav_with(np.nan)(tmp_path)  # the NaN is at sample 1234
    manifest = write_lines(tmp_path / "m.jsonl", [{"audio": f"{name}:2000:4000", "text": "after it"},
                                                  {"audio": f"{name}:1000:4000", "text": "over it"}])
    with pytest.raises(InputError, match=f"^{manifest}:2: .*:1000:4000: audio contains NaN or infinite samples$"):
        read_manifest(manifest)
    assert [u.line for u in read_manifest(manifest, skip_bad=True).utterances] == [1]


def test_audio_loaded_later_names_a_directory_and_its_line(tmp_path):
    """Read without the header check (`check_audio=False`), a directory is still named as one when
    its samples are loaded, not reported as a missing file."""
    manifest = write_lines(tmp_path / "m.jsonl", [{"audio": folder(tmp_path), "text": "x"}])
    (utt,) = read_manifest(manifest, check_audio=False).utterances
    with pytest.raises(InputError, match=f"^{manifest}:1: audio path is a directory, not a file: "):
        load_utterance_audio(utt)


def test_missing_manifest(tmp_path):
    with pytest.raises(InputError, match=f"^{tmp_path}/none.jsonl: file not found$"):
        read_manifest(tmp_path / "none.jsonl")


def test_read_jsonl(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"a": 1}, "", {"b": 2}, "oops"])
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    assert next(rows) == (3, {"b": 2})
    with pytest.raises(InputError, match=f"^{path}:4: not valid JSON"):
        next(rows)


def test_read_jsonl_of_a_file_appended_to_skips_a_half_last_line_only(tmp_path):
    """`partial_tail`: a last line without its newline that does not parse is a killed writer's
    half line (skipped); one that parses is a whole record (read); a bad line before it still raises."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert list(read_jsonl(path, partial_tail=True)) == [(1, {"a": 1}), (2, {"b": 2})]
    with pytest.raises(InputError, match=f"^{path}:3: not valid JSON"):
        list(read_jsonl(path))
    path.write_bytes(b'{"a": 1}\n{"b": 2}')
    assert list(read_jsonl(path, partial_tail=True)) == [(1, {"a": 1}), (2, {"b": 2})]
    path.write_bytes(b'{"a": \n{"b": 2}\n{"c": ')
    with pytest.raises(InputError, match=f"^{path}:1: not valid JSON"):
        list(read_jsonl(path, partial_tail=True))


def test_normalize_transcript():
    assert normalize_transcript("MR. QUILTER is the apostle, of the middle classes!") == \
        "mister quilter is the apostle of the middle classes"
    assert normalize_transcript("It's TWENTY-ONE degrees [noise]") == "it is 21 degrees"
    # other languages: Whisper's basic normaliser, letters and accents kept, numbers as written
    assert normalize_transcript("¿Dónde está el Niño, Señor?", "es") == "dónde está el niño señor"
    assert normalize_transcript("Perché? Alle 21 è già notte.", "it") == "perché alle 21 è già notte"


def test_common_language_of_lines():
    from blsp.data import Utterance, common_language, utterance_language

    de = [Utterance(f"d{i}", "a.wav", "Hallo.", {"language": "de"}, "m.jsonl", i + 1) for i in range(2)]
    en = Utterance("e0", "a.wav", "Hello.", {}, "m.jsonl", 3)
    assert utterance_language(en) == "en" and common_language(de) == "de" and common_language([en]) == "en"
    with pytest.raises(BlspError, match="these lines mix languages \\(d0: de, e0: en\\)"):
        common_language([*de, en])


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------
def test_data_module_does_not_import_datasets():
    code = "import sys, blsp.data; assert 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_read_hf_dataset_without_datasets_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(BlspError, match="pip install datasets"):
        read_hf_dataset("anything", "train", cache_dir=tmp_path)


@pytest.fixture
def hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    clips = [make_wav(tmp_path / "src" / "a.wav", 1.0, rate=8000),
             make_wav(tmp_path / "src" / "b.wav", 0.5, channels=2),
             make_wav(tmp_path / "src" / "c.wav", 0.5)]
    table = {"audio": [str(c) for c in clips], "text": ["first one", "second", ""],
             "speaker": ["s1", "s2", "s3"], "id": ["a", "b", "c"]}
    return datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio()), clips


def test_read_hf_dataset_writes_16k_mono_wavs(tmp_path, hf_dataset):
    dataset, clips = hf_dataset
    dataset.save_to_disk(tmp_path / "saved")
    result = read_hf_dataset(str(tmp_path / "saved"), "train", cache_dir=tmp_path / "cache", skip_bad=True)
    assert [(u.id, u.text, u.extra, u.line) for u in result.utterances] == [
        ("a", "first one", {"speaker": "s1"}, 1), ("b", "second", {"speaker": "s2"}, 2)]
    assert [(e.line, e.reason) for e in result.skipped] == [(3, "missing or empty `text`")]
    assert str(result.skipped[0]).startswith(f"{tmp_path / 'saved'}[train]:3: ")
    for utt, clip in zip(result.utterances, clips):
        info = sf.info(utt.audio.path)
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        np.testing.assert_allclose(load_audio(utt.audio), load_audio(clip), atol=2 / 32768)
    # a second read reuses the converted files
    mtimes = [Path(u.audio.path).stat().st_mtime_ns for u in result.utterances]
    again = read_hf_dataset(str(tmp_path / "saved"), "train", cache_dir=tmp_path / "cache", skip_bad=True)
    assert [Path(u.audio.path).stat().st_mtime_ns for u in again.utterances] == mtimes


def test_read_hf_dataset_dict_splits_and_in_memory(tmp_path, hf_dataset):
    import datasets

    dataset, _ = hf_dataset
    datasets.DatasetDict({"test": dataset}).save_to_disk(tmp_path / "dd")
    with pytest.raises(BlspError, match="has no split 'train' \\(it has: test\\)"):
        read_hf_dataset(str(tmp_path / "dd"), "train", cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match=r"\[test\]:3: missing or empty `text`"):
        read_hf_dataset(str(tmp_path / "dd"), "test", cache_dir=tmp_path / "cache")
    result = read_hf_dataset(dataset.remove_columns("id"), "dev", cache_dir=tmp_path / "cache", require_text=False)
    assert [u.id for u in result.utterances] == ["dev-0", "dev-1", "dev-2"]
    with pytest.raises(BlspError, match="no column 'transcript'"):
        read_hf_dataset(dataset, "dev", text_column="transcript", cache_dir=tmp_path / "cache")
