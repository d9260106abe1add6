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

from .modeling import IGNORE_INDEX, SPEECH_TOKEN_ID
from .prompts import AudioSlot, ChatPrompt, Piece, speech_message, transcript_message


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
        ids = {self.prompt.end_of_turn_id}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

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
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (ids, lab, _) in enumerate(seqs):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            labels[row, span] = torch.tensor(lab, dtype=torch.long)
            attention_mask[row, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        features = [f for _, _, feats in seqs for f in feats]
        if features:
            batch["encoder_features"], batch["encoder_lengths"] = pad_features(features)
        return batch


def pad_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [T_i, d] tensors into [N, max T, d] (zero padded) and their lengths."""
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    out = features[0].new_zeros((len(features), int(lengths.max()), features[0].shape[1]))
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
    return out, lengths
