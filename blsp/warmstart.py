"""Warm start of the adapter on cached encoder features, with no LLM forward pass.

Why: the paper's recipe learns from about a million utterances; a 2-core CPU pushes a few
thousand through the LLM in 20 minutes, and an adapter starting from random weights spends them
finding the LLM's embedding space at all. CTC through the LLM's own frozen input embeddings
(`EmbeddingCTCHead`) moves the adapter's output towards the embeddings of the words spoken at a
fraction of the cost per clip, and step 2 then starts from there.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from .data import Utterance, normalize_transcript
from .features import FeatureCache
from .losses import EmbeddingCTCHead
from .processing import pad_features


@dataclass(frozen=True)
class WarmStartOptions:
    method: str = "none"  # none | ctc
    steps: int = 0
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0


def transcript_tokens(tokenizer, utt: Utterance) -> list[int]:
    """The transcript's tokens exactly as they stand in the text prompt (leading space included)."""
    text = utt.extra.get("prompt_transcript") or normalize_transcript(utt.text)
    return list(tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])


def ctc_min_length(target: list[int]) -> int:
    """CTC needs a frame per token plus a blank between each pair of equal neighbours."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:]))


def count_too_short(model, utterances: Sequence[Utterance], cache: FeatureCache, targets: list[list[int]]) -> int:
    lengths = model.adapter.output_lengths(torch.tensor([cache.load(u.audio).shape[0] for u in utterances]))
    return sum(int(n) < ctc_min_length(t) for n, t in zip(lengths, targets))


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ctc_warm_start(model, utterances: Sequence[Utterance], cache: FeatureCache, options: WarmStartOptions,
                   show_progress: bool = True) -> list[dict]:
    """Train the adapter (and a throw-away CTC head) for `options.steps`; returns the step log.

    Deterministic given the seed, so under torchrun every rank computes the same warm start.
    """
    from .training import global_batch_indices

    tokens = [transcript_tokens(model.processor.tokenizer, u) for u in utterances]
    vocab = sorted({t for seq in tokens for t in seq})
    device = next(model.adapter.parameters()).device
    head = EmbeddingCTCHead(model.language_model.get_input_embeddings().weight, vocab).to(device)
    targets = [head.targets(seq) for seq in tokens]
    too_short = count_too_short(model, utterances, cache, targets)
    if too_short and show_progress:
        print(f"warm start: {too_short} of {len(utterances)} clips have fewer speech vectors than CTC needs "
              "for their transcript; they add nothing to it", file=sys.stderr)
    params = list(model.adapter.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    warmup = max(1, options.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, options.steps, warmup))
    model.adapter.train()
    log, start = [], time.perf_counter()
    bar = tqdm(range(options.steps), desc="warm start (ctc)", unit="step", disable=not show_progress)
    for step in bar:
        idx = global_batch_indices(step, len(utterances), options.batch_size, options.seed)
        feats, lengths = pad_features([cache.load(utterances[i].audio) for i in idx])
        x, out_lengths = model.speech_embeddings(feats.to(device), lengths.to(device))
        loss = head.loss(x, out_lengths, [targets[i] for i in idx])
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "ctc_loss": float(loss.detach()), "grad_norm": float(grad_norm),
                    "elapsed_s": round(time.perf_counter() - start, 3)})
        bar.set_postfix(ctc=f"{log[-1]['ctc_loss']:.3f}")
    return log
