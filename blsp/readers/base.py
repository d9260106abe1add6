"""The interface every speech reader has, and the plain reader of the paper."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class SpeechReader(nn.Module):
    """How the adapter's speech vectors become what the LLM reads.

    Two hooks, both identity here:
    - `correct(states, vectors, source)`: the vectors given the states the adapter read (the token
      bridge adds its own vector to the adapter's);
    - `select(vectors, lengths)`: which vectors the LLM sees, as (vectors, keep flags [B, S] or
      None for all): CTC compression keeps one per token run.
    Weights a reader trains are saved in the checkpoint under `checkpoint_prefix`.
    """

    name: ClassVar[str]
    checkpoint_prefix: ClassVar[str] = ""

    def __init__(self, config, embeddings: torch.Tensor):
        """`config`: the model's BlspConfig; `embeddings`: the LLM's input embeddings [vocab, d_llm]."""
        super().__init__()

    def correct(self, states: torch.Tensor, vectors: torch.Tensor, source: nn.Module) -> torch.Tensor:
        return vectors

    def select(self, vectors: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return vectors, None

    @property
    def slots_per_vector(self) -> int:
        """Speech slots the LLM's prompt holds for each adapter vector (the transcript bridge: 2)."""
        return 1

    def read(self, states: torch.Tensor, vectors: torch.Tensor, lengths: torch.Tensor, source: nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Both hooks: (the corrected vectors, those the LLM reads [B, slots, d], their keep flags
        or None, each clip's slots). A reader whose slots are not one per vector overrides it."""
        corrected = self.correct(states, vectors, source)
        selected, keep = self.select(corrected, lengths)
        return corrected, selected, keep, lengths

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class PlainReader(SpeechReader):
    """The paper's: the LLM reads every adapter vector as it is."""

    name = "plain"
