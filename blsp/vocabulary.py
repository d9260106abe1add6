"""Which LLM tokens the CTC head may emit, and how a transcript is spelled with them.

Why: a CTC head over every token of a few thousand training sentences is data-starved. Most of
those tokens occur once or twice, and 14% of the held-out sentences' tokens never occur at all,
so the head can never emit them (docs/warm_start_probe.md). Speech recognisers trained on little
data use a few hundred to a few thousand sub-word units for this reason. Here the units stay the
LLM's own tokens, so the LLM can still read what the head emits: the tokenizer's BPE merges are
undone for the rare tokens. A token seen fewer than `min_count` times hands its count down to the
two tokens its merge joined ("Ġneutralizing" -> "Ġneutral" + "izing"), from the last merge to the
first, so a piece is kept when it occurs often enough inside the corpus's words, not only as a
word of its own. The 256 single-byte tokens are always kept: every word of any sentence, heard
before or not, then has targets the head can emit.

The spelling depends only on the tokenizer and the kept tokens, and the kept tokens are saved in
the model's config (`ctc_vocab`), so a loaded model spells a transcript exactly as in training.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence


@lru_cache(maxsize=4)
def bpe_merges(tokenizer) -> dict[int, tuple[int, int]]:
    """token id -> the ids of the two tokens its BPE merge joined (from a fast tokenizer's JSON),
    in merge order; an empty dict for tokenizers that are not BPE. Parsed once per tokenizer
    (~0.3 s for SmolLM2's 49k merges; a training run asks for it three times): read, never change."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        return {}
    vocab = tokenizer.get_vocab()
    out: dict[int, tuple[int, int]] = {}
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = vocab.get(left + right)
        if token is not None and left in vocab and right in vocab and token not in out:
            out[token] = (vocab[left], vocab[right])
    return out


def single_byte_tokens(tokenizer) -> list[int]:
    """The ids of the tokenizer's one-character tokens: in a byte-level BPE, its 256 bytes, with
    which every string can be spelled."""
    return sorted(i for s, i in tokenizer.get_vocab().items() if len(s) == 1)


def ctc_vocabulary(token_seqs: Iterable[Sequence[int]], tokenizer=None, min_count: int = 1) -> list[int]:
    """The LLM token ids a CTC head over these transcripts emits (sorted).

    min_count 1: every token that occurs (nothing is spelled). Above 1: merges are undone, last
    first, for tokens whose count (their own plus what their parents handed down) is below
    `min_count`; the tokens left at or above it are kept, with the single-byte tokens.
    """
    counts = Counter(t for seq in token_seqs for t in seq)
    if min_count <= 1:
        return sorted(counts)
    if tokenizer is None:
        raise ValueError("a CTC vocabulary with min_count > 1 needs the tokenizer to spell the tokens it leaves out")
    merges = bpe_merges(tokenizer)
    for token in reversed(list(merges)):  # a merge's parts are always older than the merge
        n = counts.get(token, 0)
        if 0 < n < min_count:
            del counts[token]
            for part in merges[token]:
                counts[part] += n
    kept = {t for t, n in counts.items() if n >= min_count}
    return sorted(kept | set(single_byte_tokens(tokenizer)))


class Speller:
    """Rewrites LLM token ids with the ids of `vocab` only: a token outside it is split by its BPE
    merge, again and again, until every part is in the vocabulary. Tokens with no merge that are
    not in it (special tokens) are left out, as a head without a speller leaves them."""

    def __init__(self, tokenizer, vocab: Iterable[int]):
        self.vocab = set(int(t) for t in vocab)
        self.merges = bpe_merges(tokenizer)
        self.spellings: dict[int, list[int]] = {}

    def __call__(self, token_ids: Sequence[int]) -> list[int]:
        out: list[int] = []
        for t in token_ids:
            out.extend(self.spell(int(t)))
        return out

    def spell(self, token: int) -> list[int]:
        if token in self.vocab:
            return [token]
        if token not in self.spellings:
            parts = self.merges.get(token)
            self.spellings[token] = [p for part in parts for p in self.spell(part)] if parts else []
        return self.spellings[token]
