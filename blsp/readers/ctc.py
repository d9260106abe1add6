"""CTC-compressed speech: the LLM reads one speech vector per token the CTC head hears.

`EmbeddingCTCHead` reads the adapter's output as tokens through the LLM's own frozen input
embeddings (trained by the CTC warm start, blsp.warmstart); `ctc_compress` drops the frames it
reads as blank and merges each run of one token into one vector. Why: a frozen LLM reads a
sequence shaped like its own embedded text far more easily than 6.25 vectors a second with blanks
between the words (Speech-LLaMA's CTC compressor; Wu et al., 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BlspError
from .base import SpeechReader

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


def ctc_compress(x: torch.Tensor, lengths: torch.Tensor, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse speech vectors the way a CTC decode collapses frames into tokens.

    Frames the head reads as blank are dropped; each run of frames read as the same token
    becomes one vector, the run's mean, at the run's first frame. Returns the vectors and a
    keep mask [B, S]: the caller hides the other frames from the LLM (attention mask 0, no
    position), so the LLM reads about one vector per spoken token, as it reads text. Every clip
    keeps at least its least-blank frame.
    """
    b, s, d = x.shape
    valid = torch.arange(s, device=x.device)[None, :] < lengths[:, None]
    labels = log_probs.argmax(-1)
    nonblank = (labels != 0) & valid
    prev_label = F.pad(labels[:, :-1], (1, 0), value=-1)
    prev_nonblank = F.pad(nonblank[:, :-1], (1, 0), value=False)
    start = nonblank & ~(prev_nonblank & (labels == prev_label))
    empty = ~start.any(1) & (lengths > 0)
    if empty.any():
        least_blank = log_probs[..., 0].masked_fill(~valid, float("inf")).argmin(1)
        rows = empty.nonzero().squeeze(1)
        start[rows, least_blank[rows]] = True
        nonblank[rows, least_blank[rows]] = True
    run = (start.long().cumsum(1) - 1).clamp(min=0)  # the run each frame belongs to
    member = (nonblank & (start.long().cumsum(1) > 0)).to(x.dtype)[..., None]
    index = run[..., None].expand(-1, -1, d)
    sums = torch.zeros_like(x).scatter_add(1, index, x * member)
    counts = torch.zeros(b, s, 1, dtype=x.dtype, device=x.device).scatter_add(1, run[..., None], member)
    means = (sums / counts.clamp(min=1)).gather(1, index)
    return torch.where(start[..., None], means, x), start


class CTCReader(SpeechReader):
    """CTC-compressed speech (`BlspConfig.speech_compression` "ctc"): the head over `config.ctc_vocab`
    decides which vectors the LLM sees. With `speech_vectors` "tokens" each token run becomes the
    mix of the LLM's own token embeddings that the head's posterior gives it; "adapter": the
    adapter's vector of the run."""

    name = "ctc"
    checkpoint_prefix = "ctc_head."

    def __init__(self, config, embeddings: torch.Tensor):
        super().__init__(config, embeddings)
        if not config.ctc_vocab:
            raise BlspError("CTC compression needs the CTC head's vocabulary (ctc_vocab)")
        self.ctc_head = EmbeddingCTCHead(embeddings, config.ctc_vocab).to(embeddings.device)
        self.token_vectors = config.speech_vectors == "tokens"

    def select(self, vectors: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.token_vectors:
            logits = self.ctc_head(vectors)
            log_probs = F.log_softmax(logits.detach().float(), dim=-1)
            vectors = self.ctc_head.token_mix(logits)
        else:
            with torch.no_grad():
                log_probs = self.ctc_head.log_probs(vectors)
        return ctc_compress(vectors, lengths, log_probs)
