"""Turning prompts, speech features and targets into padded model inputs.

The prompt is one contiguous sequence per example: [prompt tokens, speech slots, prompt tokens,
target tokens]. Padding goes only at the ends (left for generation, right for training), and the
model derives position ids from the attention mask, so where the padding sits never changes a
result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .prompts import AudioSlot, ChatPrompt, Piece, speech_message, transcript_message

# The input id of a speech slot: a negative sentinel no vocabulary uses (as LLaVA's
# IMAGE_TOKEN_INDEX); the model scatters the speech vectors into the embedded prompt there.
SPEECH_TOKEN_ID = -200
IGNORE_INDEX = -100  # a label the loss skips: a real long -100 (the original filled a bool tensor: token 1)


@dataclass
class Example:
    """One sequence: prompt pieces, the encoder features of each audio slot, the target ids."""

    pieces: list[Piece]
    features: list[torch.Tensor] = field(default_factory=list)  # [T_enc, d_enc] per slot
    target: list[int] = field(default_factory=list)


class BlspProcessor:
    """Holds the tokenizer and prompt renderer of a BLSP model; builds batches."""

    def __init__(
        self,
        tokenizer: Any,
        n_mels: int,
        system_prompt: str | None,
        speech_lengths: Callable[[int], int],
    ):
        self.tokenizer = tokenizer
        self.n_mels = n_mels
        self.prompt = ChatPrompt(tokenizer, system_prompt)
        self.speech_lengths = speech_lengths
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -- prompts -------------------------------------------------------------------------------
    def speech_prompt(self, instruction: str) -> list[Piece]:
        return self.prompt.render(speech_message(instruction))

    def transcript_prompt(self, instruction: str, transcript: str) -> list[Piece]:
        return self.prompt.render(transcript_message(instruction, transcript))

    def stop_ids(self) -> list[int]:
        return self.prompt.stop_ids

    # -- batching ------------------------------------------------------------------------------
    def sequence(self, example: Example) -> tuple[list[int], list[int], list[torch.Tensor]]:
        """input ids (speech slots expanded), labels, and the features in slot order."""
        ids: list[int] = []
        features: list[torch.Tensor] = []
        for piece in example.pieces:
            if isinstance(piece, AudioSlot):
                feats = example.features[piece.index]
                ids += [SPEECH_TOKEN_ID] * self.speech_lengths(feats.shape[0])
                features.append(feats)
            else:
                ids += piece
        labels = [IGNORE_INDEX] * len(ids) + list(example.target)
        return ids + list(example.target), labels, features

    def collate(self, examples: Sequence[Example], padding_side: str = "right") -> dict[str, torch.Tensor]:
        seqs = [self.sequence(ex) for ex in examples]
        width = max(len(ids) for ids, _, _ in seqs)

        def padded(rows: list[list[int]], value: int) -> torch.Tensor:
            # Padded as Python lists, then one tensor: a tensor op per row costs more CPU time than
            # the whole list work, and on a GPU the step waits for the CPU.
            if padding_side == "left":
                return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long)
            return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        batch = {"input_ids": padded([ids for ids, _, _ in seqs], self.pad_id),
                 "attention_mask": padded([[1] * len(ids) for ids, _, _ in seqs], 0),
                 "labels": padded([lab for _, lab, _ in seqs], IGNORE_INDEX)}
        features = [f for _, _, feats in seqs for f in feats]
        if features:
            batch["encoder_features"], batch["encoder_lengths"] = pad_features(features)
        return batch


def pad_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [T_i, d] tensors into [N, max T, d] (zero padded) and their lengths."""
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True), lengths
