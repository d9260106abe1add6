"""From Whisper's decoder states to the LLM's own token embeddings, through the two vocabularies.

Why: an adapter that reads Whisper's decoder states (speech states "decoder", blsp.speech_sources) must learn which
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

import bisect
import hashlib
import itertools
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BlspError, CheckpointError
from .base import SpeechReader

TOP_K = 8  # Whisper tokens mixed per state: the posterior's tail beyond them is noise (and 50k rows' cost)


def bridge_pieces(whisper_tokenizer, llm_tokenizer, n_text: int) -> list[list[int]]:
    """For each of Whisper's text tokens (the ids below its end-of-text), the LLM tokens its text splits into."""
    texts = [whisper_tokenizer.decode([i]) for i in range(n_text)]
    return [list(ids) for ids in llm_tokenizer(texts, add_special_tokens=False).input_ids]


def pieces_fingerprint(pieces: list[list[int]]) -> str:
    """What a trained adapter's correction depends on besides the backbones: which LLM tokens each
    Whisper token stands for (the embeddings themselves are the LLM's, fingerprinted with it)."""
    return hashlib.sha256(json.dumps(pieces).encode()).hexdigest()[:16]


@torch.no_grad()
def bridge_table(pieces: list[list[int]], llm_embeddings: torch.Tensor) -> torch.Tensor:
    """[len(pieces), d_llm]: each Whisper token's row the mean of the LLM's input embeddings of its
    LLM tokens (zeros when none)."""
    n_text = len(pieces)
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
    output projection `output_weight`, [vocab, d_whisper], passed in).

    `read` also says which states are sure: Whisper's greedy token there (the tokens its decoding
    never emits, `never`, left out) has a posterior of at least a threshold and is one LLM token,
    whose embedding `exact` holds: what the cascade would feed the LLM at that position."""

    def __init__(self, table: torch.Tensor, top_k: int = TOP_K, single: torch.Tensor | None = None,
                 never: Sequence[int] = ()):
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        # which Whisper tokens are exactly one LLM token (their row is that token's embedding)
        single = torch.ones(table.shape[0], dtype=torch.bool) if single is None else single
        self.register_buffer("single", single, persistent=False)
        never_mask = torch.zeros(table.shape[0], dtype=torch.bool)
        never_mask[[i for i in never if i < table.shape[0]]] = True
        self.register_buffer("never", never_mask, persistent=False)
        self.top_k = top_k

    @torch.no_grad()
    def forward(self, states: torch.Tensor, output_weight: torch.Tensor) -> torch.Tensor:
        return self.read(states, output_weight)[0]

    @torch.no_grad()
    def greedy(self, states: torch.Tensor, output_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, S] each state's greedy text token, as Whisper's decoding chose it; [B, S] whether the
        state would rather end the text (a clip heard as silence keeps only that state))."""
        with torch.autocast(states.device.type, enabled=False):
            n_text = self.table.shape[0]  # the text tokens: the ids below end-of-text
            weight = output_weight[: n_text + 1].to(states.device, torch.float32)
            logits = states.float() @ weight.T
            text = logits[..., :n_text].masked_fill(self.never, -torch.inf)
            best = text.argmax(-1)
            return best, logits[..., n_text] > text.gather(-1, best[..., None])[..., 0]

    @torch.no_grad()
    def read(self, states: torch.Tensor, output_weight: torch.Tensor,
             confidence: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the posterior mix [B, S, d_llm], and with a `confidence` the sure states [B, S] and the
        table rows of their greedy tokens [B, S, d_llm]; else None, None)."""
        # in float32 whatever the step's autocast: the top k and posterior of a clip stay the same
        with torch.autocast(states.device.type, enabled=False):
            weight = output_weight[: self.table.shape[0]].to(states.device, torch.float32)
            logits = states.float() @ weight.T
            scores, ids = logits.topk(self.top_k, dim=-1)
            probs = F.softmax(scores, dim=-1)  # the posterior renormalised over the top k
            mix = (probs[..., None] * self.table[ids]).sum(-2)
            if confidence is None:
                return mix, None, None
            logits = logits.masked_fill(self.never, -torch.inf)  # as Whisper's greedy decoding does
            best = logits.argmax(-1)
            posterior = (logits.gather(-1, best[..., None])[..., 0] - logits.logsumexp(-1)).exp()
            sure = (posterior >= confidence) & self.single[best]
            return mix, sure, self.table[best]


# With the transcript bridge, the LLM tokens one of Whisper's may become: the prompt holds this many
# slots a state, the unused ones masked. On the demo's test transcripts and the real-speech set no
# Whisper token became more than 2 (2.3% of them 2); a clip whose transcript needs more is read
# state by state, as the plain bridge reads it.
TRANSCRIPT_SLOTS_PER_STATE = 2


class TranscriptTokens:
    """Whisper's greedy transcript as the LLM's tokenizer splits it: what the cascade feeds the LLM.

    Read state by state, the bridge gives the LLM Whisper's tokenisation: a word Whisper holds as one
    token and the LLM as two (" wizard": " w" + "izard") became the mean of the two embeddings
    (read as "izard"), and words split differently (" whisper" + "ed") read otherwise than the
    text path's " whispered". On 24 real clips the two readings differed on 16; fed as text, the
    bridge's reading agreed with the transcript's answers at 28/22/24/32 BLEU (continue, summarise,
    keywords, speaker) where Whisper's own transcript did at 31/30/24/32."""

    def __init__(self, whisper_tokenizer: Any, llm_tokenizer: Any):
        self.whisper, self.llm = whisper_tokenizer, llm_tokenizer

    def __call__(self, whisper_ids: list[int]) -> tuple[list[int], list[int]]:
        """(the LLM's token ids of the transcript, as the text path reads it after its
        instruction: a space, then the words; for each, the index of the Whisper token that holds its
        first character)."""
        text = self.whisper.decode(whisper_ids)
        words = text.strip()
        if not words:
            return [], []
        encoded = self.llm(" " + words, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        ends = self._ends(whisper_ids, text)
        if ends is None:  # Whisper's tokens split a character's bytes: align by position instead
            return ids, [k * len(whisper_ids) // len(ids) for k in range(len(ids))]
        lead = len(text) - len(text.lstrip())  # characters of `text` before the words
        return ids, [bisect.bisect_right(ends, lead + max(start - 1, 0)) for start, _ in offsets]

    def _ends(self, whisper_ids: list[int], text: str) -> list[int] | None:
        """Where each Whisper token's text ends in `text` (the last token's end left open), or None
        where the tokens decoded one by one do not spell it."""
        parts = [self.whisper.decode([i]) for i in whisper_ids]
        if "".join(parts) != text:
            return None
        ends = list(itertools.accumulate(map(len, parts)))
        return ends[:-1] + [len(text) + 1] if ends else ends


def check_bridge_adapter(adapter_type: str, downsample: int) -> None:
    """The token bridge gives one vector per decoder state, and the adapter's correction is added to
    each: it must keep the states' number (the stack adapter over one state)."""
    if adapter_type != "stack" or downsample != 1:
        raise BlspError(f"the token bridge (speech vectors 'tokens' on decoder states) adds the adapter's vector to each "
                        f"state's: use --adapter stack --adapter-downsample 1, not --adapter {adapter_type} "
                        f"--adapter-downsample {downsample} (--preset decoder sets them)")


class TokenBridgeReader(SpeechReader):
    """Decoder states read as the LLM's own token embeddings (`TokenBridge`), plus the adapter's
    vector as a learned correction (it starts at zero: `BlspModel.init_adapter`). The bridge is
    built from the two tokenizers (`build`), never saved; the config keeps its fingerprint.

    With the config's `bridge_confidence` P, a state whose greedy token Whisper is at least P sure
    of (and that is one LLM token) is read as that token's embedding, with no correction: on the
    words Whisper is sure of the LLM reads what the cascade would feed it (the text path's own
    behaviour), and the adapter corrects only where Whisper hesitates."""

    name = "bridge"

    def __init__(self, config, embeddings: torch.Tensor):
        super().__init__(config, embeddings)
        check_bridge_adapter(config.adapter_type, config.adapter_downsample)
        self.config = config
        self.bridge: TokenBridge | None = None
        self.transcript: TranscriptTokens | None = None  # with the config's bridge_transcript
        self.embeddings: torch.Tensor | None = None  # the LLM's, which the transcript bridge reads

    def build(self, whisper_tokenizer: Any, llm_tokenizer: Any, embeddings: torch.Tensor, strict: bool = True) -> None:
        """The bridge from Whisper's tokenizer and the LLM's. A saved model's bridge must map Whisper's
        tokens to the LLM's as when it was trained (unless not `strict`)."""
        pieces = bridge_pieces(whisper_tokenizer, llm_tokenizer, self.config.decoder_ids["eot"])
        found, expected = pieces_fingerprint(pieces), self.config.bridge_fingerprint
        if strict and expected and found != expected:
            raise CheckpointError(f"the token bridge was built from other tokenizers (fingerprint {expected}, now "
                                  f"{found}): load with the tokenizers it was trained with, or pass strict=False")
        self.config.bridge_fingerprint = found
        single = torch.tensor([len(ids) == 1 for ids in pieces], dtype=torch.bool)
        never = self.config.decoder_ids.get("suppress") or []
        self.bridge = TokenBridge(bridge_table(pieces, embeddings), single=single, never=never).to(embeddings.device)
        if getattr(self.config, "bridge_transcript", False):
            # detached: the LLM's own matrix (no copy), not a weight of this reader's
            self.transcript, self.embeddings = TranscriptTokens(whisper_tokenizer, llm_tokenizer), embeddings.detach()
        else:
            self.transcript, self.embeddings = None, None

    @property
    def slots_per_vector(self) -> int:
        return TRANSCRIPT_SLOTS_PER_STATE if self.transcript is not None else 1

    def read(self, states: torch.Tensor, vectors: torch.Tensor, lengths: torch.Tensor, source: nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """With the transcript bridge: each clip's transcript as the LLM's tokens (`TranscriptTokens`),
        each token's embedding plus the adapter's correction of the state that holds it (none where
        Whisper is sure of it, with a bridge confidence), in the clip's first slots, the rest masked."""
        corrected = self.correct(states, vectors, source)
        if self.transcript is None:
            return corrected, corrected, None, lengths
        per_state = TRANSCRIPT_SLOTS_PER_STATE
        out = corrected.new_zeros(corrected.shape[0], corrected.shape[1] * per_state, corrected.shape[2])
        keep = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
        greedy, ends = self.bridge.greedy(states, source.output_weight)
        sure = self._sure(states, source)
        for row, n in enumerate(lengths.tolist()):
            said = [] if ends[row, 0] and n == 1 else greedy[row, :n].tolist()
            ids, owners = self.transcript(said)
            if not ids or len(ids) > n * per_state:  # silence, or more tokens than slots: state by state
                out[row, :n], keep[row, :n] = corrected[row, :n], True
                continue
            owner = torch.tensor(owners, device=out.device)
            correction = vectors[row, owner]
            if sure is not None:
                correction = correction.masked_fill(sure[row, owner][:, None], 0.0)
            tokens = self.embeddings[torch.tensor(ids, device=self.embeddings.device)].to(out.device, out.dtype)
            out[row, : len(ids)], keep[row, : len(ids)] = tokens + correction, True
        return corrected, out, keep, lengths * per_state

    def _sure(self, states: torch.Tensor, source: nn.Module) -> torch.Tensor | None:
        confidence = getattr(self.config, "bridge_confidence", None)
        if confidence is None:
            return None
        return self.bridge.read(states, source.output_weight, confidence)[1]

    def correct(self, states: torch.Tensor, vectors: torch.Tensor, source: nn.Module) -> torch.Tensor:
        if self.bridge is None:
            raise BlspError("this model reads Whisper's decoder through its token bridge: build it "
                            "(BlspModel.from_pretrained / from_components do)")
        confidence = getattr(self.config, "bridge_confidence", None)
        mix, sure, exact = self.bridge.read(states, source.output_weight, confidence)
        out = vectors + mix.to(vectors.dtype)
        if sure is None:
            return out
        # a sure token is read as the token itself, as the cascade would feed it: no correction there
        return torch.where(sure[..., None], exact.to(vectors.dtype), out)
