"""Losses as small modules (torchtune style), each checked on seeded tensors in the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class EmbeddingCTCHead(nn.Module):
    """Reads the adapter's output as tokens through the LLM's own frozen input embeddings.

    logits = scale * x @ [blank; E[vocab]]^T + bias, so a speech vector scores high on a token
    when it lies close to that token's embedding: training it with CTC on the transcript pulls
    the adapter's output towards the words' embeddings, with no LLM forward pass at all.
    `vocab` restricts the projection to the tokens of the corpus (a few thousand of 49k), which
    was half the cost of the stage when projecting onto the whole vocabulary.
    """

    def __init__(self, embeddings: torch.Tensor, vocab: list[int]):
        super().__init__()
        # Not saved with the weights: the vocabulary is listed in the model's config and the rows
        # are the frozen LLM's own, taken again on loading.
        self.register_buffer("rows", embeddings[vocab].detach().clone(), persistent=False)
        self.index = {tok: i + 1 for i, tok in enumerate(vocab)}  # 0 is the blank
        self.blank = nn.Parameter(torch.zeros(embeddings.shape[1]))
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(len(vocab) + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scale * (x . row) + bias, arranged for speed (the head is most of the warm start's cost at
        # a few thousand tokens): the scale on x, not on the [frames, vocab] product; the bias added
        # inside the product (addmm); the blank's score apart from the frozen rows', since a product
        # with [blank; rows] would make autograd compute a gradient for every row to keep the blank's.
        flat = (x * self.scale.to(x.dtype)).reshape(-1, x.shape[-1])
        bias = self.bias.to(x.dtype)
        tokens = torch.addmm(bias[1:], flat, self.rows.T.to(x.dtype))
        blank = torch.addmm(bias[:1], flat, self.blank.to(x.dtype)[:, None])
        return torch.cat([blank, tokens], dim=-1).reshape(*x.shape[:-1], -1)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self(x).float(), dim=-1)

    def token_mix(self, logits: torch.Tensor) -> torch.Tensor:
        """Each frame as the mix of its tokens' embeddings under the head's posterior without the
        blank: a vector the LLM has seen (a token's own embedding) wherever the head is sure, and
        differentiable, so step 2's loss still reaches the adapter through the head."""
        probs = F.softmax(logits[..., 1:].float(), dim=-1)
        return probs @ self.rows.float()

    def targets(self, token_ids: list[int]) -> list[int]:
        """Head classes of LLM token ids; tokens outside the head's vocabulary are left out."""
        return [self.index[t] for t in token_ids if t in self.index]

    def loss(self, x: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss per target token; clips too short for their transcript contribute 0."""
        log_probs = self.log_probs(x).transpose(0, 1)  # [S, B, C]
        flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long, device=x.device)
        target_lengths = torch.tensor([len(seq) for seq in targets], dtype=torch.long, device=x.device)
        per_clip = F.ctc_loss(log_probs, flat, lengths, target_lengths, blank=0, reduction="none", zero_infinity=True)
        return per_clip.sum() / target_lengths.sum().clamp(min=1)
