"""Manifests: one utterance a line, read with errors that name the file and line.

A manifest line is a JSON object `{"audio": ..., "text": ..., "id": ...}`: `audio` a path
relative to the manifest (or `path:start_sample:num_samples`), `id` optional; every other field
is kept in `Utterance.extra` so later stages (continuations, translations) can add their own.
Bad lines either stop the read at the first one or, with `skip_bad`, are collected so a long run
is not lost to one broken clip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from .audio import AudioError, AudioRef, decode_audio, load_audio, probe_audio, write_wav
from .errors import BlspError, InputError
from .io import is_whole_json, same_file

KNOWN_FIELDS = ("id", "audio", "text")
JSON_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: AudioRef
    text: str  # "" when the source has no transcript and none is required
    extra: dict  # every other field of the line, passed through to outputs
    source: str  # the manifest (or dataset) it came from, for messages
    line: int  # 1-based line (or dataset row) number


@dataclass
class ManifestReadResult:
    utterances: list[Utterance] = field(default_factory=list)
    skipped: list[InputError] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------------
def _nonblank_lines(path: str) -> Iterator[tuple[int, bytes]]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror}", path) from err
    with f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield line_no, raw


def _parse_object(raw: bytes, path: str, line_no: int) -> dict:
    try:
        record = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError("not valid UTF-8", path, line_no) from None
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON: {err.msg} (column {err.colno})", path, line_no) from None
    if not isinstance(record, dict):
        raise InputError(f"not a JSON object (got {type(record).__name__})", path, line_no)
    return record


def read_jsonl(path: str | os.PathLike, *, partial_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises `InputError` at path:line.

    `partial_tail`: the file is an output that runs append to, whose last line, without its
    newline, may be a killed writer's half line: skipped when it does not parse, read when it does
    (`blsp.io.repair_jsonl_tail` keeps exactly these). Reading never changes the file, so a run
    can check an output before it repairs it.
    """
    source = os.fspath(path)
    for line_no, raw in _nonblank_lines(source):
        if partial_tail and not raw.endswith(b"\n") and not is_whole_json(raw):
            return
        yield line_no, _parse_object(raw, source, line_no)


def check_output_apart(manifest: str | os.PathLike, output: str | os.PathLike) -> None:
    """Refuse an --output that is the manifest itself: the run would append its lines to (or repair
    the last line of) the very file it reads, which is never what was meant."""
    if same_file(manifest, output):
        raise BlspError(f"{os.fspath(output)}: --output is the manifest itself; write to another file")


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------
def _text(record: dict, key: str, require_text: bool, source: str, line: int) -> str:
    text = record.get(key)
    if text is not None and not isinstance(text, str):
        raise InputError(f"`{key}` must be a string, not {type(text).__name__}", source, line)
    if require_text and not (text or "").strip():
        raise InputError(f"missing or empty `{key}`", source, line)
    return text or ""


def _id(record: dict, default: str, source: str, line: int) -> str:
    if "id" not in record:
        return default
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise InputError(f"`id` must be a non-empty string or integer, not {value!r}", source, line)
    return str(value)


def _manifest_utterance(record: dict, source: str, line: int, base_dir: str, require_text: bool) -> Utterance:
    spec = record.get("audio")
    if spec is None:
        raise InputError("missing `audio`", source, line)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"`audio` must be a non-empty string, not {spec!r}", source, line)
    return Utterance(
        id=_id(record, spec, source, line),
        audio=AudioRef.parse(spec, base_dir),
        text=_text(record, "text", require_text, source, line),
        extra={k: v for k, v in record.items() if k not in KNOWN_FIELDS},
        source=source,
        line=line,
    )


class _Collector:
    """Keeps good utterances, refuses duplicate ids, and raises or collects bad lines."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.result = ManifestReadResult()
        self.first_line: dict[str, int] = {}

    def check_unique(self, utt: Utterance) -> None:
        if utt.id in self.first_line:
            raise InputError(f"duplicate id {utt.id!r} (first on line {self.first_line[utt.id]})", utt.source, utt.line)

    def add(self, utt: Utterance) -> None:
        self.first_line[utt.id] = utt.line
        self.result.utterances.append(utt)

    def bad(self, err: InputError) -> None:
        if not self.skip_bad:
            raise err
        self.result.skipped.append(err)


# Sample formats that can hold NaN or infinite values; integer PCM (most corpora) cannot.
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


def check_not_directory(ref: AudioRef) -> None:
    """A directory where a clip should be is named as one (the header probe would call it missing)."""
    if os.path.isdir(ref.path):
        raise AudioError(f"audio path is a directory, not a file: {ref.path}")


def check_finite_samples(ref: AudioRef, block: int = 1 << 16) -> None:
    """Refuse a float file whose referenced samples hold NaN or infinity: the header probe cannot
    see them, and one such sample turns the clip's features, and the loss of every step that
    draws it, into NaN. Only float files are decoded (a block at a time), so checking a corpus
    of integer PCM costs nothing more than its headers."""
    import soundfile

    if soundfile.info(ref.path).subtype not in FLOAT_SUBTYPES:
        return
    frames = -1 if ref.num_samples is None else ref.num_samples
    for samples in soundfile.blocks(ref.path, blocksize=block, start=ref.start or 0, frames=frames, dtype="float32"):
        if not np.isfinite(samples).all():
            raise AudioError(f"{ref}: audio contains NaN or infinite samples")


def read_manifest(
    path: str | os.PathLike, *, require_text: bool = True, skip_bad: bool = False, check_audio: bool = True
) -> ManifestReadResult:
    """Read a JSONL manifest; relative audio paths are relative to the manifest's directory.

    `id` is the line's `id` field, else its `audio` string. With `check_audio`, each file's
    header is read (and a float file's samples, `check_finite_samples`) so a missing or
    undecodable clip is reported here, with its line, rather than mid-run. With `skip_bad`, bad
    lines are returned in `skipped` instead of raising the first. A manifest without a single
    line is an error (a wrong path or a failed export), not a run with nothing to do.
    """
    source = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(source))
    collect = _Collector(skip_bad)
    for line_no, raw in _nonblank_lines(source):
        try:
            utt = _manifest_utterance(_parse_object(raw, source, line_no), source, line_no, base_dir, require_text)
            collect.check_unique(utt)
            if check_audio:
                check_not_directory(utt.audio)
                probe_audio(utt.audio)
                check_finite_samples(utt.audio)
        except AudioError as err:
            collect.bad(InputError(str(err), source, line_no))
        except InputError as err:
            collect.bad(err)
        else:
            collect.add(utt)
    if not collect.result.utterances and not collect.result.skipped:
        raise InputError("no utterances: the manifest is empty", source)
    return collect.result


def load_utterance_audio(utt: Utterance) -> np.ndarray:
    """The utterance's waveform; a file that turns out unusable only now (a header that reads but
    samples that do not) is reported with the manifest line that named it."""
    try:
        check_not_directory(utt.audio)
        return load_audio(utt.audio)
    except AudioError as err:
        raise InputError(str(err), utt.source, utt.line) from None


def load_utterances_audio(utterances: list[Utterance], skip_bad: bool) -> tuple[list[tuple[Utterance, np.ndarray]], list[InputError]]:
    """Waveforms of the utterances that load; the first failure raises unless `skip_bad`, which
    returns the failures instead."""
    loaded, errors = [], []
    for utt in utterances:
        try:
            loaded.append((utt, load_utterance_audio(utt)))
        except InputError as err:
            if not skip_bad:
                raise
            errors.append(err)
    return loaded, errors


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets (optional dependency)
# ----------------------------------------------------------------------------------------------
def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise BlspError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None
    return datasets


def _load_split(datasets, name_or_path: Any, split: str):
    """A `datasets.Dataset` as is, a `save_to_disk` folder, or anything `load_dataset` takes."""
    if isinstance(name_or_path, datasets.Dataset):
        return name_or_path
    name = os.fspath(name_or_path)
    saved = any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json"))
    try:
        loaded = datasets.load_from_disk(name) if saved else datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub, builders and file formats each raise their own types
        raise BlspError(f"cannot load dataset {name!r} (split {split!r}): {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise BlspError(f"dataset {name!r} has no split {split!r} (it has: {', '.join(loaded)})")
        return loaded[split]
    return loaded


def _row_audio(cell: Any, source: str, line: int) -> np.ndarray:
    """16 kHz mono samples of an undecoded Audio cell ({"bytes", "path"})."""
    if not cell or not (cell.get("bytes") or cell.get("path")):
        raise InputError("no audio in this row", source, line)
    try:
        if cell.get("bytes"):
            return decode_audio(cell["bytes"], cell.get("path") or f"row {line}")
        return load_audio(Path(cell["path"]))
    except AudioError as err:
        raise InputError(str(err), source, line) from err


def read_hf_dataset(
    name_or_path: Any,
    split: str,
    *,
    audio_column: str = "audio",
    text_column: str = "text",
    cache_dir: str | os.PathLike,
    require_text: bool = True,
    skip_bad: bool = False,
) -> ManifestReadResult:
    """Turn a dataset with an Audio column into 16 kHz WAV files under `cache_dir`, as utterances.

    Audio is read undecoded (`Audio(decode=False)`) and decoded with soundfile, so no
    torchcodec/FFmpeg is needed. Files are named by the dataset's fingerprint and row, and a file
    already there is reused, so an interrupted conversion resumes. `id` is the row's `id` column
    if any, else `{split}-{row}`; `line` is the 1-based row number; other columns with JSON
    scalar values go to `extra` (they are written to JSONL outputs later).
    """
    datasets = _import_datasets()
    dataset = _load_split(datasets, name_or_path, split)
    for column in (audio_column, text_column) if require_text else (audio_column,):
        if column not in dataset.column_names:
            raise BlspError(f"dataset has no column {column!r} (it has: {', '.join(dataset.column_names)})")
    out_dir = Path(cache_dir) / dataset._fingerprint
    dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    source = f"{name_or_path if isinstance(name_or_path, (str, os.PathLike)) else 'dataset'}[{split}]"
    collect = _Collector(skip_bad)
    for index, row in enumerate(dataset):
        line = index + 1
        wav = out_dir / f"{index:08d}.wav"
        try:
            utt = Utterance(
                id=_id(row, f"{split}-{index}", source, line),
                audio=AudioRef(str(wav)),
                text=_text(row, text_column, require_text, source, line),
                extra={k: v for k, v in row.items()
                       if k not in (audio_column, text_column, "id") and isinstance(v, JSON_SCALARS)},
                source=source,
                line=line,
            )
            collect.check_unique(utt)
            if not wav.exists():
                write_wav(wav, _row_audio(row[audio_column], source, line))
        except InputError as err:
            collect.bad(err)
        else:
            collect.add(utt)
    return collect.result


# ----------------------------------------------------------------------------------------------
# Transcripts
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _english_normalizer() -> EnglishTextNormalizer:
    # Whisper's British->American spelling table (english.json in openai/whisper) ships with
    # neither transformers nor any package installed here, so spellings are left as written;
    # everything else is Whisper's normaliser, as the original used.
    return EnglishTextNormalizer({})


@lru_cache(maxsize=1)
def _basic_normalizer() -> Any:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer(remove_diacritics=False)


def normalize_transcript(text: str, language: str = "en") -> str:
    """Whisper's English normaliser, which the original applied to transcripts before step 1;
    Whisper's basic normaliser for any other language (as Whisper scores them: lower case, no
    punctuation, letters and their accents kept).

    English: lower-cases, removes punctuation and bracketed noise tags, expands contractions and
    writes numbers as digits (so "twenty-one" becomes "21"). Callers make it optional.
    """
    if language != "en":
        return " ".join(_basic_normalizer()(text).split())
    return _english_normalizer()(text)


def utterance_language(utt: Utterance) -> str:
    """The line's `language` (blsp data synth writes it for speech not in English); English if none."""
    value = utt.extra.get("language")
    return value if isinstance(value, str) and value else "en"


def common_language(utterances: Sequence[Utterance]) -> str:
    """The one language of these lines (a WER needs one normaliser), or an error naming two."""
    found: dict[str, Utterance] = {}
    for utt in utterances:
        found.setdefault(utterance_language(utt), utt)
    if len(found) > 1:
        (a, ua), (b, ub) = list(found.items())[:2]
        raise BlspError(f"these lines mix languages ({ua.id}: {a}, {ub.id}: {b}); score each language apart "
                        "(a task per language, or `where: {language: ...}`)")
    return next(iter(found), "en")


def prompt_transcript(utt: Utterance) -> str:
    """The transcript as step 1 fed it to the LLM (normalised or not); the raw text if absent."""
    value = utt.extra.get("prompt_transcript")
    return value if isinstance(value, str) and value.strip() else utt.text


def is_copy_continuation(utt: Utterance) -> bool:
    """The LLM repeated the transcript instead of continuing it (29% of SmolLM2-135M's continuations
    on the demo's sentences)."""
    language = utterance_language(utt)
    return (normalize_transcript(utt.extra["continuation"], language)
            == normalize_transcript(prompt_transcript(utt), language))
