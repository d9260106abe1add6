"""A corpus as tar shards, for data that does not fit in memory (`blsp data shard`).

Layout of a shard directory:

    index.json              written last: its presence means every shard is complete
    shard-00000.tar ...     plain (uncompressed) tar files, each holding `--shard-size` utterances

Each utterance is two members with the same key (its 9-digit position in the corpus):
`KEY.json`, the manifest line (every field but `audio`, plus `id`, `origin` = manifest:line and
`data` = the name of the other member) and `KEY.<ext>`: the clip's bytes as they were on disk
(`.wav`, `.flac`, ...; a segment `path:start:n` is cut and stored as `.wav`), or with
`--with-features` the frozen encoder's features as float16 `.npy` (the encoder's fingerprint is
in the index, and training refuses features of another encoder).

Why tar: a shard is one sequential read (object stores and network filesystems like that), it
needs nothing beyond the standard library, and `tar tf` shows what is in it. Members are read by
offset, so skipping items (resume) reads headers only, and a shuffle buffer holds references,
not clips.

Every bad input names the shard and member (`shard-00003.tar: 000000042.json: not valid JSON`);
an utterance's `source`/`line` are its shard and its 1-based position in the shard.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import numpy as np
import torch

from .audio import AudioError, AudioRef, decode_audio, load_audio
from .data import Utterance, _id, _text, read_manifest
from .errors import BlspError, InputError
from .io import atomic_write_json

INDEX_FILE = "index.json"
FORMAT = "blsp-shards/1"
FEATURES_EXT = ".npy"


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    file: str
    count: int  # utterances in the shard
    size: int  # bytes, checked on reading: a shard replaced or cut after indexing is refused


@dataclass(frozen=True)
class ShardIndex:
    root: Path
    shards: tuple[ShardInfo, ...]
    encoder_fingerprint: str | None  # set when the shards hold features instead of audio

    @property
    def n_utterances(self) -> int:
        return sum(s.count for s in self.shards)

    def path(self, i: int) -> Path:
        return self.root / self.shards[i].file

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ShardIndex":
        root = Path(root)
        index_path = root / INDEX_FILE
        if not index_path.exists():
            raise BlspError(f"{root}: no {INDEX_FILE} (not the output of `blsp data shard`, or it did not finish)")
        try:
            raw = json.loads(index_path.read_text())
            if raw.get("format") != FORMAT:
                raise InputError(f"format {raw.get('format')!r}, expected {FORMAT!r}", str(index_path))
            shards = tuple(ShardInfo(s["file"], int(s["count"]), int(s["size"])) for s in raw["shards"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise InputError(f"not a valid shard index ({type(err).__name__}: {err})", str(index_path)) from None
        if not shards:
            raise InputError("lists no shards", str(index_path))
        for s in shards:
            path = root / s.file
            if not path.exists():
                raise InputError(f"shard {s.file} is missing", str(index_path))
            if path.stat().st_size != s.size:
                raise InputError(f"{path.stat().st_size} bytes, the index says {s.size} (changed after "
                                 "`blsp data shard`?)", str(path))
        return cls(root, shards, raw.get("encoder_fingerprint"))


def is_shard_corpus(data: Sequence[str | os.PathLike]) -> bool:
    """`--data DIR` (one directory) names a shard corpus; anything else is JSONL manifests."""
    if len(data) == 1 and Path(data[0]).is_dir():
        return True
    for d in data:
        if Path(d).is_dir():
            raise BlspError(f"--data {d}: a shard directory must be the only --data")
    return False


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardItem:
    """One utterance of a shard: its manifest line now, its data on demand (by offset)."""

    utterance: Utterance
    shard: Path
    member: str
    offset: int
    size: int

    @property
    def has_features(self) -> bool:
        return self.member.endswith(FEATURES_EXT)

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise self.error("truncated (the shard ends inside this member)")
        return data

    def features(self) -> torch.Tensor:
        try:
            return torch.from_numpy(np.load(io.BytesIO(self.read_bytes()), allow_pickle=False)).float()
        except (ValueError, OSError) as err:
            raise self.error(f"not a readable .npy ({err})") from None

    def waveform(self) -> np.ndarray:
        try:
            return decode_audio(self.read_bytes(), f"{self.shard.name}: {self.member}")
        except AudioError as err:
            raise InputError(str(err), self.utterance.source, self.utterance.line) from None

    def error(self, reason: str) -> InputError:
        return InputError(f"{self.member}: {reason}", str(self.shard))


def _item(record: dict, shard: Path, data: tarfile.TarInfo, position: int) -> ShardItem:
    source, member = str(shard), data.name
    utt = Utterance(id=_id(record, member, source, position), audio=AudioRef(f"{shard}/{member}"),
                    text=_text(record, "text", True, source, position),
                    extra={k: v for k, v in record.items() if k not in ("id", "text", "data")},
                    source=source, line=position)
    return ShardItem(utt, shard, member, data.offset_data, data.size)


def iter_shard(shard: str | os.PathLike) -> Iterator[ShardItem]:
    """The utterances of one shard in order, reading headers and JSON only (data by offset)."""
    shard = Path(shard)
    try:
        tar = tarfile.open(shard, "r:")  # uncompressed: members are read by offset
    except FileNotFoundError:
        raise InputError("file not found", str(shard)) from None
    except tarfile.TarError as err:
        raise InputError(f"not an uncompressed tar file ({err})", str(shard)) from None
    with tar:
        pending: dict | None = None
        position = 0
        try:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if not info.isfile() or "/" in info.name:
                    raise InputError(f"{info.name}: unexpected member (a shard holds KEY.json and KEY.<data> files)",
                                     str(shard))
                if ext == "json":
                    if pending is not None:
                        raise InputError(f"{pending['name']}: no data member before the next record", str(shard))
                    pending = {"name": info.name, "key": key, "record": _read_record(tar, info, shard)}
                    continue
                if pending is None or pending["key"] != key or pending["record"].get("data") != info.name:
                    raise InputError(f"{info.name}: data member without its KEY.json record just before it",
                                     str(shard))
                position += 1
                yield _item(pending["record"], shard, info, position)
                pending = None
        except (tarfile.TarError, EOFError, OSError) as err:
            raise InputError(f"truncated or corrupt tar after {position} utterance(s) ({err})", str(shard)) from None
        if pending is not None:
            raise InputError(f"{pending['name']}: no data member (truncated shard?)", str(shard))


def _read_record(tar: tarfile.TarFile, info: tarfile.TarInfo, shard: Path) -> dict:
    raw = tar.extractfile(info).read()
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{info.name}: not valid UTF-8", str(shard)) from None
    except json.JSONDecodeError as err:
        raise InputError(f"{info.name}: not valid JSON: {err.msg} (column {err.colno})", str(shard)) from None
    if not isinstance(record, dict) or not isinstance(record.get("data"), str):
        raise InputError(f"{info.name}: not a JSON object with a `data` member name", str(shard))
    return record


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardWriteOptions:
    shard_size: int = 1000
    encoder: str | None = None  # set: store this encoder's features instead of the audio
    feature_cache: str | None = None  # where features are computed first (default $BLSP_CACHE/features)
    skip_bad: bool = False


class _EncoderOnly:
    """What `FeatureCache.fill` needs of a BlspModel, without loading an LLM."""

    def __init__(self, name: str):
        from .fingerprint import weights_fingerprint
        from .whisper import load_whisper

        whisper = load_whisper(name)
        self.tower = whisper.get_encoder()
        self.config = SimpleNamespace(encoder_config=whisper.config, encoder_fingerprint=weights_fingerprint(self.tower))

    def encode_mel(self, mel: torch.Tensor, lengths: torch.Tensor):
        from .whisper import run_whisper_encoder

        with torch.no_grad():
            return run_whisper_encoder(self.tower, mel, lengths)


def audio_member(utt: Utterance) -> tuple[str, bytes]:
    """(extension, bytes) of the clip: the file as it is, or a cut segment as 16-bit WAV."""
    ref = utt.audio
    try:
        if ref.start is None and ref.num_samples is None:
            return Path(ref.path).suffix.lower() or ".wav", Path(ref.path).read_bytes()
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, load_audio(ref), 16000, subtype="PCM_16", format="WAV")
        return ".wav", buf.getvalue()
    except (AudioError, OSError) as err:
        raise InputError(str(err), utt.source, utt.line) from None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> int:
    """Write one tar atomically (a temporary file renamed when complete); returns its size."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                _add(tar, name, data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def write_shards(manifests: Sequence[str | os.PathLike], output: str | os.PathLike,
                 options: ShardWriteOptions) -> dict:
    """Write the manifests' utterances as tar shards of `shard_size` and then the index."""
    if options.shard_size < 1:
        raise BlspError("--shard-size must be at least 1")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_FILE).unlink(missing_ok=True)  # a half-rewritten directory must not read as complete
    utterances, skipped = [], []
    for manifest in manifests:
        result = read_manifest(manifest, skip_bad=options.skip_bad)
        utterances += result.utterances
        skipped += result.skipped
    cache, encoder = _features_source(utterances, options, skipped)
    shards: list[dict] = []
    written = 0
    for start in range(0, len(utterances), options.shard_size):
        members = []
        for pos, utt in enumerate(utterances[start : start + options.shard_size], start=start):
            try:
                data = _data_member(utt, cache)
            except InputError as err:
                if not options.skip_bad:
                    raise
                skipped.append(err)
                continue
            key = f"{pos:09d}"
            record = {"id": utt.id, "text": utt.text, **utt.extra, "origin": f"{utt.source}:{utt.line}",
                      "data": f"{key}{data[0]}"}
            members += [(f"{key}.json", json.dumps(record, ensure_ascii=False).encode()), (f"{key}{data[0]}", data[1])]
        if not members:
            continue
        name = f"shard-{len(shards):05d}.tar"
        shards.append({"file": name, "count": len(members) // 2, "size": write_shard(out / name, members)})
        written += len(members) // 2
    if not shards:
        raise BlspError("no utterance to write")
    _remove_stale_shards(out, {s["file"] for s in shards})
    atomic_write_json(out / INDEX_FILE, {"format": FORMAT, "shards": shards, "n_utterances": written,
                                        "encoder_fingerprint": encoder,
                                        "sources": [str(m) for m in manifests]})
    return {"shards": len(shards), "utterances": written, "output": str(out), "skipped_bad": [str(e) for e in skipped]}


def _features_source(utterances: list[Utterance], options: ShardWriteOptions, skipped: list):
    """(FeatureCache filled with every clip, encoder fingerprint) with --with-features, else (None, None)."""
    if options.encoder is None:
        return None, None
    from .features import FeatureCache
    from .packaged import CACHE_DIR

    encoder = _EncoderOnly(options.encoder)
    cache = FeatureCache(options.feature_cache or CACHE_DIR / "features", encoder.config.encoder_fingerprint)
    skipped += cache.fill(encoder, utterances, skip_bad=options.skip_bad)
    return cache, encoder.config.encoder_fingerprint


def _data_member(utt: Utterance, cache) -> tuple[str, bytes]:
    if cache is None:
        return audio_member(utt)
    if not cache.has(utt.audio):  # left out by fill(skip_bad=True)
        raise InputError("audio could not be encoded", utt.source, utt.line)
    return FEATURES_EXT, cache.path(utt.audio).read_bytes()


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Shards of an earlier, larger run in the same directory would otherwise linger."""
    for old in out.glob("shard-*.tar"):
        if old.name not in keep:
            old.unlink()


# ----------------------------------------------------------------------------------------------
# `blsp data shard`
# ----------------------------------------------------------------------------------------------
def cmd_shard(args: argparse.Namespace) -> int:
    options = ShardWriteOptions(shard_size=args.shard_size, encoder=args.encoder if args.with_features else None,
                                feature_cache=args.feature_cache, skip_bad=args.skip_bad)
    summary = write_shards(args.manifest, args.output, options)
    if summary["skipped_bad"]:
        print(f"skipped {len(summary['skipped_bad'])} bad line(s):", file=sys.stderr)
        for s in summary["skipped_bad"]:
            print(f"  {s}", file=sys.stderr)
    print(f"data shard: wrote {summary['utterances']} utterance(s) in {summary['shards']} shard(s) to "
          f"{summary['output']} ({INDEX_FILE} lists them)")
    return 0


def add_shard_parser(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser("shard", help="write manifests (e.g. step 1's behavior data) as tar shards that "
                                          "`blsp train --data DIR` streams, each rank its own shards")
    p.add_argument("--manifest", required=True, nargs="+", help="JSONL manifest(s); all their fields are kept")
    p.add_argument("--output", required=True, help="directory for shard-NNNNN.tar and index.json")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="utterances per shard; for an even split use at least as many shards as training ranks, "
                        "ideally a multiple")
    p.add_argument("--with-features", action="store_true",
                   help="store the encoder's features (float16 .npy) instead of the audio: encoded once, here")
    p.add_argument("--encoder", default="whisper-base", help="with --with-features: the encoder training will use")
    p.add_argument("--feature-cache", default=None, help="with --with-features (default: $BLSP_CACHE/features)")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad lines and unreadable clips, and list them")
    p.set_defaults(func=cmd_shard)
