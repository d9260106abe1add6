"""From Whisper's decoder states to the LLM's own token embeddings, through the two vocabularies.

Why: an adapter that reads Whisper's decoder states (`speech_states="decoder"`) must learn which
of the LLM's ~50k embeddings each of Whisper's ~50k tokens stands for, and step 2 on a few
thousand clips teaches it too few of them: on the default demo's data a fresh adapter over the
decoder states closed 17.7% of the gap (docs/warm_start_probe.md, "Whisper's decoder"). Yet that
map needs no speech at all: a decoder state scores Whisper's tokens through the decoder's own
(tied) output projection, and each Whisper token is a piece of text the LLM's tokenizer splits
into its own tokens (on the demo's test transcripts 99.4% of Whisper's tokens into exactly one).
So each state becomes the mix, under the decoder's posterior, of the LLM embeddings of the text
of Whisper's likeliest tokens: what the LLM would read for Whisper's transcript, but soft and
differentiable, and the adapter learns a correction on top of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TOP_K = 8  # Whisper tokens mixed per state: the posterior's tail beyond them is noise (and 50k rows' cost)


@torch.no_grad()
def bridge_table(whisper_tokenizer, llm_tokenizer, llm_embeddings: torch.Tensor, n_text: int) -> torch.Tensor:
    """[n_text, d_llm]: for each of Whisper's text tokens (ids below its first special one), the
    mean of the LLM's input embeddings of the LLM tokens its text splits into (zeros when none)."""
    texts = [whisper_tokenizer.decode([i]) for i in range(n_text)]
    pieces = llm_tokenizer(texts, add_special_tokens=False).input_ids
    flat = torch.tensor([t for ids in pieces for t in ids], dtype=torch.long)
    owner = torch.tensor([row for row, ids in enumerate(pieces) for _ in ids], dtype=torch.long)
    counts = torch.bincount(owner, minlength=n_text).clamp(min=1).to(torch.float32)
    table = torch.zeros(n_text, llm_embeddings.shape[1], dtype=torch.float32)
    table.index_add_(0, owner, llm_embeddings.detach().float().cpu()[flat])
    return table / counts[:, None]


class TokenBridge(nn.Module):
    """Decoder states [B, S, d_whisper] -> [B, S, d_llm]: each the posterior mix of the bridge
    table's rows over Whisper's `TOP_K` likeliest text tokens. No trainable weights: the table is
    rebuilt from the two tokenizers on loading, and the scores are Whisper's own (its frozen, tied
    output projection `output_weight`, [vocab, d_whisper], passed in)."""

    def __init__(self, table: torch.Tensor, top_k: int = TOP_K):
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.top_k = top_k

    @torch.no_grad()
    def forward(self, states: torch.Tensor, output_weight: torch.Tensor) -> torch.Tensor:
        weight = output_weight[: self.table.shape[0]].to(states.device, states.dtype)
        scores, ids = (states @ weight.T).float().topk(self.top_k, dim=-1)
        probs = F.softmax(scores, dim=-1)  # the posterior renormalised over the top k
        return (probs[..., None] * self.table[ids]).sum(-2)
