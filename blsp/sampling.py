"""The order step 2 (and the warm start) read their items in: a pure function of the step and seed.

A step's samples follow from the step number alone (a seeded permutation per epoch, optionally
bucketed by length), so `--resume` ends exactly where an uninterrupted run would, and every rank
computes the same global batch without talking to the others.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from .distributed import DistInfo


def sample_order(n: int, epoch: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def global_batch_indices(step: int, n: int, global_batch: int, seed: int,
                         lengths: tuple[int, ...] | None = None, frames: tuple[int, ...] | None = None) -> list[int]:
    """The dataset indices of optimizer step `step` (0-based): a window over seeded epochs.

    With `lengths` (one per item), each epoch's order is length-bucketed (`bucketed_order`), and
    with `frames` (speech frames per item) bucketed by those too within similar lengths.
    Either way the result depends on nothing but the arguments, so every rank and a resumed run
    compute the same batches without talking.
    """
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, k = divmod(pos, n)
        if k == 0 or not out or epoch != (pos - 1) // n:
            order = (sample_order(n, epoch, seed) if lengths is None
                     else bucketed_order(lengths, epoch, seed, global_batch, frames))
        out.append(order[k])
    return out


BUCKET_SPAN = 50  # global batches sorted together: wide enough to find similar lengths, narrow
# enough that what is batched together still changes from epoch to epoch
BUCKET_GROUP = 6  # with speech frames: runs of this many batches of similar length re-cut by frames.
# On the demo's clips (batch 8): LLM-position padding 0.8% -> 2.8%, speech-frame padding 24.9% -> 8.3%
# (groups of 4: 2.0% / 10.5%; of 16: 6.1% / 4.9%).


@lru_cache(maxsize=4)
def bucketed_order(lengths: tuple[int, ...], epoch: int, seed: int, global_batch: int,
                   frames: tuple[int, ...] | None = None) -> list[int]:
    """An epoch's order in which each global batch holds items of similar length.

    The epoch's seeded permutation is cut into spans of BUCKET_SPAN global batches, each span is
    sorted by length and cut into batches, and the batches are shuffled, so batches of short and
    long sequences still alternate. Why: padding a batch to its longest sequence spends compute
    on nothing; with random batches that is a fifth or more of the LLM's tokens. With `frames`,
    each run of BUCKET_GROUP batches' worth of sorted items (lengths within a few tokens) is
    sorted again by speech frames before it is cut, so the speech padded at the adapter's (and a
    trained encoder layer's) input falls too, for a little more LLM padding: the continuation's
    length, not the speech's, sets most of a sequence's.

    Batches are cut where `global_batch_indices` cuts its windows: when the dataset size is not
    a multiple of the global batch, an epoch starts part-way into a window, so its first
    `head` items (shortest of the first span) complete the previous epoch's last window and its
    leftover longest items open the next epoch's first one. Those two stay in place.
    """
    n = len(lengths)
    order = sample_order(n, epoch, seed)
    span = BUCKET_SPAN * global_batch
    ranked = [i for start in range(0, n, span) for i in sorted(order[start : start + span], key=lengths.__getitem__)]
    if frames is not None:
        group = BUCKET_GROUP * global_batch
        ranked = [i for start in range(0, n, span) for g in range(start, min(start + span, n), group)
                  for i in sorted(ranked[g : min(g + group, start + span, n)], key=frames.__getitem__)]
    head = min(n, (-epoch * n) % global_batch)
    full = (n - head) // global_batch * global_batch
    batches = [ranked[head + b : head + b + global_batch] for b in range(0, full, global_batch)]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)  # not the permutation's stream
    shuffled = [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]
    return ranked[:head] + shuffled + ranked[head + full :]


def padding_waste(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of a padded batch's positions that are padding, over batches padded to their longest."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0


def micro_batches(indices: list[int], batch_size: int, info: DistInfo) -> list[list[int]]:
    """This rank's micro-batches of a global batch: micro-batch m of rank r is slot m*world+r."""
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return chunks[info.rank :: info.world_size]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
