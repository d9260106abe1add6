"""The text rows' greedy answers, kept on disk between evaluations.

Why: the behaviour measures (blsp/parity.py) ask every instruction three times, with the
transcript (the text row), with Whisper's transcript (the cascade) and with the speech. The first
two depend on the frozen LLM and the prompts only (and Whisper's transcripts, on the clips only),
not on the adapter, yet they cost two thirds of the suite's time; comparing checkpoints or an ablation's rows re-asked them every time. A batch
of prompts is answered once per LLM, decoding and machine; an adapter or LoRA that reaches the
text path (LoRA everywhere) turns the cache off for that model.

Entries are keyed by everything an answer depends on (the LLM's weights' fingerprint, the
batch's prompt tokens in order, since padding the batch is part of the arithmetic, the token
budget, the decoding options, the stop ids, dtype, device and library versions), one JSON file
each, written atomically: a run stopped half-way loses nothing it already answered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from .io import atomic_write_json


def text_path_is_frozen(model: Any) -> bool:
    """Whether a prompt without speech reads the frozen LLM alone (no LoRA, or LoRA that acts on
    speech requests only: `where` speech or request), and the LLM's weights have a fingerprint to
    key its answers by."""
    lora = model.config.lora
    return model.config.llm_fingerprint is not None and (not lora or lora.get("where", "speech") != "all")


def _digest(what: dict) -> str:
    what = {**what, "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class AnswerCache:
    """Greedy answers of text-only prompt batches (and the cascade Whisper's transcripts of clip
    batches), under `root`/<key[:2]>/<key>.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, model: Any, prompts: Sequence[Any], max_new_tokens: int, generate_kwargs: dict) -> str | None:
        """The entry of one batch of rendered prompts (token pieces), or None: not cacheable."""
        if not text_path_is_frozen(model):
            return None
        return _digest({"llm": model.config.llm_fingerprint, "prompts": list(prompts),
                        "max_new_tokens": int(max_new_tokens), "generate": generate_kwargs,
                        "stop": model.processor.stop_ids(), "dtype": str(model.dtype),
                        "device": model.language_model.device.type})

    def asr_key(self, fingerprint: str | None, audio: Sequence[np.ndarray], language: str, device: str) -> str | None:
        """The entry of one batch of clips transcribed by the cascade's Whisper (weights `fingerprint`)."""
        if fingerprint is None:
            return None
        clips = [hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest() for a in audio]
        return _digest({"asr": fingerprint, "clips": clips, "language": language, "device": device})

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str | None, n: int) -> list[str] | None:
        """The batch's `n` answers, or None when not cached (or the entry is unreadable: answered again)."""
        if key is None:
            return None
        try:
            answers = json.loads(self._path(key).read_text())["answers"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return answers if isinstance(answers, list) and len(answers) == n else None

    def put(self, key: str | None, answers: Sequence[str]) -> None:
        if key is not None:
            atomic_write_json(self._path(key), {"answers": list(answers)})
