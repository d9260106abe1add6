"""Speech readers: how the adapter's vectors enter the LLM (see `base.SpeechReader`).

- `plain` (the paper): every adapter vector, as it is;
- `ctc`: CTC-compressed, one vector per token the CTC head hears (over encoder frames);
- `bridge`: over Whisper's decoder states, each state read as the LLM embeddings of Whisper's
  likeliest tokens, plus the adapter's correction.

A new reader is a module here and one entry in `READERS` (and in `reader_name`, which says which
config settings choose it).
"""

from __future__ import annotations

import torch

from .base import PlainReader, SpeechReader
from .bridge import TokenBridgeReader
from .ctc import CTCReader

READERS: dict[str, type[SpeechReader]] = {"plain": PlainReader, "ctc": CTCReader, "bridge": TokenBridgeReader}


def reader_name(config) -> str:
    """The reader a `BlspConfig` reads speech with."""
    if config.speech_compression == "ctc":
        return "ctc"
    if config.reads_token_bridge:
        return "bridge"
    return "plain"


def build_reader(config, embeddings: torch.Tensor) -> SpeechReader:
    """The reader `config` names, over the LLM's input embeddings [vocab, d_llm]."""
    return READERS[reader_name(config)](config, embeddings)


__all__ = ["READERS", "CTCReader", "PlainReader", "SpeechReader", "TokenBridgeReader", "build_reader", "reader_name"]
