"""The warm start's alignment and embedding pull, on seeded tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from blsp.readers.ctc import EmbeddingCTCHead
from blsp.warmstart import ctc_viterbi, embedding_pull


def collapse(path: list[int]) -> list[int]:
    out, prev = [], 0
    for c in path:
        if c and c != prev:
            out.append(c)
        prev = c
    return out


def brute_force_best(log_probs: torch.Tensor, target: list[int]) -> tuple[float, list[int]]:
    """Every frame labelling that CTC-collapses to the target; the most likely one."""
    n, c = log_probs.shape
    best = (-math.inf, None)
    for path in itertools.product(range(c), repeat=n):
        if collapse(list(path)) == target:
            score = sum(float(log_probs[t, k]) for t, k in enumerate(path))
            best = max(best, (score, list(path)), key=lambda x: x[0])
    return best


def test_viterbi_finds_the_most_likely_alignment_of_each_clip_in_a_batch():
    g = torch.Generator().manual_seed(0)
    log_probs = F.log_softmax(torch.randn(3, 6, 4, generator=g) * 2, -1)
    targets = [[1, 2, 2], [3], [2, 1]]  # a repeated label needs a blank between
    lengths = torch.tensor([6, 4, 5])
    paths = ctc_viterbi(log_probs, lengths, targets)
    for i, (path, target) in enumerate(zip(paths, targets)):
        n = int(lengths[i])
        score, _ = brute_force_best(log_probs[i, :n], target)
        assert len(path) == n and collapse(path) == target
        assert sum(float(log_probs[i, t, k]) for t, k in enumerate(path)) == pytest.approx(score, abs=1e-5)


def test_viterbi_gives_none_for_a_clip_too_short_for_its_target():
    log_probs = F.log_softmax(torch.zeros(1, 2, 3), -1)
    assert ctc_viterbi(log_probs, torch.tensor([2]), [[1, 1]]) == [None]  # needs 3 frames


def test_embedding_pull_is_zero_on_the_aligned_tokens_embeddings_and_ignores_blanks():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(20, 8, generator=g)
    head = EmbeddingCTCHead(emb, vocab=[4, 9, 13])
    paths = [[0, 1, 1, 0, 3], [2, 0]]
    x = torch.randn(2, 5, 8, generator=g)
    x[0, 1] = x[0, 2] = emb[4]
    x[0, 4] = emb[13]
    x[1, 0] = emb[9]
    assert float(embedding_pull(x, head, paths)) < 1e-10
    x[0, 4] = emb[13] + 1.0
    expected = 8.0 / 4 / float(emb[[4, 9, 13]].pow(2).sum(-1).mean())  # one of 4 aligned frames off by 1 in 8 dims
    assert float(embedding_pull(x, head, paths)) == pytest.approx(expected, abs=1e-6)


def test_spec_augment_zeroes_spans_and_bands_inside_each_clip_and_is_seeded():
    from blsp.warmstart import MASK_FRAMES, spec_augment

    feats = torch.randn(2, 50, 32) + 5  # no zero before masking
    lengths = torch.tensor([50, 30])
    out = spec_augment(feats, lengths, 2, 0, torch.Generator().manual_seed(0))
    again = spec_augment(feats, lengths, 2, 0, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and not torch.equal(out, feats)  # seeded, and it masks
    zeroed = (out == 0).all(-1)  # whole frames
    assert zeroed.sum(1).le(2 * MASK_FRAMES).all() and not zeroed[1, 30:].any()  # within the clip's frames
    kept = ~zeroed
    assert torch.equal(out[kept], feats[kept])
    bands = spec_augment(feats, lengths, 0, 3, torch.Generator().manual_seed(1))
    channels = (bands[0] == 0).all(0)  # whole channels of clip 0
    assert 0 < channels.sum() <= 3 * 2 and torch.equal(bands[0][:, ~channels], feats[0][:, ~channels])
    assert torch.equal(spec_augment(feats, lengths, 0, 0, torch.Generator()), feats)


def test_spec_augment_time_masks_reach_every_frame_the_last_included():
    """A time span may start anywhere it fits, so the clip's last frame can be masked too (and a
    span longer than a short clip covers the clip, never its padding)."""
    from blsp.warmstart import spec_augment

    feats = torch.randn(2, 12, 4) + 5
    lengths = torch.tensor([12, 3])
    gen = torch.Generator().manual_seed(0)
    masked = torch.stack([(spec_augment(feats, lengths, 1, 0, gen) == 0).all(-1) for _ in range(300)])
    assert masked[:, 0, 11].any() and masked[:, 1, 2].any()  # each clip's last frame
    assert masked[:, 0].any(0).all() and not masked[:, 1, 3:].any()
