"""Losses as small modules (torchtune style), each checked on seeded tensors in the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .whisper import mask_padding


class ForwardKLLoss(nn.Module):
    """Sum over positions of KL(teacher || student) of next-token distributions, at temperature T.

    BLSP-KD style distillation: the teacher is the frozen LLM reading the transcript, the
    student the same LLM reading speech; both are scored on the same continuation tokens, so
    position i of one is position i of the other. Computed `chunk` positions at a time: a
    49k-way softmax over every position at once would dominate memory. Multiplied by T^2 so its
    gradient scale does not depend on T (Hinton et al.).
    """

    def __init__(self, temperature: float = 1.0, chunk: int = 256):
        super().__init__()
        self.temperature, self.chunk = temperature, chunk

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
        t = self.temperature
        total = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, student_logits.shape[0], self.chunk):
            s = F.log_softmax(student_logits[start : start + self.chunk].float() / t, dim=-1)
            p = F.log_softmax(teacher_logits[start : start + self.chunk].float() / t, dim=-1)
            total = total + F.kl_div(s, p, log_target=True, reduction="sum")
        return total * t * t


class TopKKLLoss(nn.Module):
    """`ForwardKLLoss` against a teacher known only by its top-k tokens per position (saved by
    `blsp continue --save-topk K`, so step 2 skips the teacher's forward pass).

    The teacher's k log-probabilities are renormalised over its k tokens (at temperature T); the
    student's full-vocabulary log-probabilities are read at those tokens. With k = the whole
    vocabulary this is exactly ForwardKLLoss; with k of 10-50 the teacher's tail (a few percent
    of its mass) is left out, as in top-k distillation of LLMs.
    """

    def __init__(self, temperature: float = 1.0, chunk: int = 256):
        super().__init__()
        self.temperature, self.chunk = temperature, chunk

    def forward(self, student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor) -> torch.Tensor:
        if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[0] != student_logits.shape[0]:
            raise ValueError(f"student {tuple(student_logits.shape)}, teacher ids {tuple(teacher_ids.shape)} and "
                             f"log-probs {tuple(teacher_logprobs.shape)} do not line up")
        t = self.temperature
        teacher = F.log_softmax(teacher_logprobs.float() / t, dim=-1)  # renormalised over its top k
        total = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, student_logits.shape[0], self.chunk):
            end = start + self.chunk
            student = F.log_softmax(student_logits[start:end].float() / t, dim=-1).gather(-1, teacher_ids[start:end])
            p = teacher[start:end]
            total = total + (p.exp() * (p - student)).sum()
        return total * t * t


def correction_penalty(vectors: torch.Tensor, lengths: torch.Tensor, target_tokens: list[int] | torch.Tensor,
                       embedding_scale: torch.Tensor | float) -> torch.Tensor:
    """Sum over clips of (the clip's mean squared vector norm / `embedding_scale`) x its target tokens.

    For the token bridge's adapter, whose vectors are a correction added to the tokens the LLM
    reads: the size of the correction relative to a token embedding's (the LLM's mean squared
    embedding norm), weighted like the other losses, which are sums over target tokens, so that
    divided by the batch's target tokens it is a per-token penalty. `vectors` [B, T, d] are
    valid up to `lengths` [B]; a clip with no vector costs nothing.
    """
    lengths = lengths.to(vectors.device)
    squared = mask_padding(vectors.float(), lengths).pow(2).sum((1, 2))
    per_clip = squared / lengths.clamp(min=1).to(squared.dtype)
    tokens = torch.as_tensor(target_tokens, dtype=per_clip.dtype, device=per_clip.device)
    return (per_clip * tokens).sum() / embedding_scale
