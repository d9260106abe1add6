"""Warm start of the adapter on cached encoder features, with no LLM forward pass.

Why: the paper's recipe learns from about a million utterances; a 2-core CPU pushes a few
thousand through the LLM in 20 minutes, and an adapter starting from random weights spends them
finding the LLM's embedding space at all. CTC through the LLM's own frozen input embeddings
(`EmbeddingCTCHead`) moves the adapter's output towards the embeddings of the words spoken at a
fraction of the cost per clip, and step 2 then starts from there. `embed` adds a pull of each
speech vector that the CTC alignment assigns to a token onto that token's own embedding, so the
vectors look like the text the LLM was trained on, not only point towards it (the first CTC
prototype left them at cosine 0.28 and twice the norm of the words' embeddings).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import Utterance, normalize_transcript
from .features import FeatureCache
from .llm import token_embeddings
from .options import WARM_STARTS
from .readers.ctc import EmbeddingCTCHead
from .vocabulary import Speller, ctc_vocabulary
from .processing import pad_features
from .sampling import global_batch_indices


METHODS = WARM_STARTS  # none | ctc | embed


@dataclass(frozen=True)
class WarmStartRun:
    """What one warm start runs with (`blsp train` fills it from its options: blsp.options.WarmStartOptions)."""

    method: str = "none"  # none | ctc | embed (ctc + the pull onto the aligned tokens' embeddings)
    steps: int = 0
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    embed_weight: float = 1.0
    # Batches of clips of similar length: random batches of the demo's clips are half padding
    # (49.6% of the frames the adapter runs over), bucketed ones 6%.
    bucket_by_length: bool = True
    # SpecAugment on the cached features (Park et al., 2019): per clip, `time_masks` spans of up
    # to 10 frames (0.2 s) and `feature_masks` bands of up to 1/16 of the channels set to zero.
    # Why: the warm start memorises its few thousand clips (CTC loss 0.03 after 9 epochs, 54% WER
    # on held-out sentences); masking is the classic cure for small-data CTC. 0: off.
    time_masks: int = 0
    feature_masks: int = 0
    # The head of a warm start without CTC compression (thrown away after it): the tokens it emits
    # (blsp.vocabulary.ctc_vocabulary; 1: every token of the transcripts).
    vocab_min_count: int = 1
    # The encoder's trained top layers (`unfreeze_encoder_layers`) learn at this rate: they start
    # pretrained, and the fresh adapter's rate would wreck them. None: `lr`.
    encoder_lr: float | None = None


def transcript_tokens(tokenizer, utt: Utterance) -> list[int]:
    """The transcript's tokens exactly as they stand in the text prompt (leading space included)."""
    text = utt.extra.get("prompt_transcript") or normalize_transcript(utt.text)
    return list(tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])


def ctc_targets(head: EmbeddingCTCHead, tokenizer, token_seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    """The head's classes for each transcript's LLM tokens; tokens outside the head's vocabulary
    are spelled with the tokens it has (blsp.vocabulary.Speller)."""
    speller = Speller(tokenizer, head.index)
    return [head.targets(speller(seq)) for seq in token_seqs]


def ctc_min_length(target: list[int]) -> int:
    """CTC needs a frame per token plus a blank between each pair of equal neighbours."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:]))


def count_too_short(model, frames: Sequence[int], targets: list[list[int]]) -> int:
    """Clips (by encoder frames) whose speech vectors are fewer than CTC needs for their target."""
    lengths = model.adapter.output_lengths(torch.tensor(list(frames)))
    return sum(int(n) < ctc_min_length(t) for n, t in zip(lengths, targets))


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ctc_viterbi(log_probs: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> list[list[int] | None]:
    """The most likely CTC alignment of each clip: a class per frame (0 blank, else the target's).

    `log_probs` [B, S, C]. A clip too short for its target gets None. Dynamic programming over
    the 2L+1 blank-interleaved states, batched over clips, one step per frame.
    """
    b, s, _ = log_probs.shape
    k = 2 * max(1, max(len(t) for t in targets)) + 1
    ext = torch.zeros(b, k, dtype=torch.long, device=log_probs.device)
    for i, t in enumerate(targets):
        if t:
            ext[i, 1 : 2 * len(t) : 2] = torch.tensor(t, device=log_probs.device)
    n_states = torch.tensor([2 * len(t) + 1 for t in targets], device=log_probs.device)
    in_range = torch.arange(k, device=log_probs.device)[None, :] < n_states[:, None]
    # A state may be entered from two back (skipping a blank) unless it is a blank or repeats that label.
    skip_ok = (ext != 0) & (ext != F.pad(ext, (2, 0), value=-1)[:, :k])
    emit = log_probs.gather(2, ext[:, None, :].expand(b, s, k)).masked_fill(~in_range[:, None, :], -math.inf)
    delta = torch.full((b, k), -math.inf, device=log_probs.device)
    delta[:, :2] = emit[:, 0, :2]
    back = torch.zeros(b, s, k, dtype=torch.long, device=log_probs.device)
    for t in range(1, s):
        cands = torch.stack([
            delta,
            F.pad(delta, (1, 0), value=-math.inf)[:, :k],
            F.pad(delta, (2, 0), value=-math.inf)[:, :k].masked_fill(~skip_ok, -math.inf),
        ], -1)
        best, arg = cands.max(-1)
        active = (t < lengths)[:, None]
        delta = torch.where(active, best + emit[:, t], delta)
        back[:, t] = torch.where(active, arg, 0)
    paths: list[list[int] | None] = []
    back_l, ext_l, delta_l = back.tolist(), ext.tolist(), delta.tolist()
    for i, n in enumerate(lengths.tolist()):
        last = int(n_states[i]) - 1
        ends = [st for st in (last, last - 1) if st >= 0 and delta_l[i][st] > -math.inf]
        if n == 0 or not ends:
            paths.append(None)
            continue
        state = max(ends, key=lambda st: delta_l[i][st])
        states = [state]
        for t in range(n - 1, 0, -1):
            state -= back_l[i][t][state]
            states.append(state)
        paths.append([ext_l[i][st] for st in reversed(states)])
    return paths


def embedding_pull(x: torch.Tensor, head: EmbeddingCTCHead, paths: list[list[int] | None]) -> torch.Tensor:
    """Mean squared distance of token-aligned speech vectors to their tokens' embeddings,
    relative to the embeddings' mean squared norm (so it reads the same for any LLM)."""
    rows, cols, classes = [], [], []
    for i, path in enumerate(paths):
        for t, c in enumerate(path or []):
            if c:
                rows.append(i), cols.append(t), classes.append(c - 1)
    if not rows:
        return x.sum() * 0
    target = head.rows[torch.tensor(classes, device=x.device)].to(x.dtype)
    scale = head.rows.pow(2).sum(-1).mean().to(x.dtype)
    return (x[rows, cols] - target).pow(2).sum(-1).mean() / scale


MASK_FRAMES = 10  # longest time mask (encoder frames, 50 a second)
MASK_CHANNELS_SHARE = 1 / 16  # widest feature mask, as a share of the channels


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, time_masks: int, feature_masks: int,
                 generator: torch.Generator) -> torch.Tensor:
    """`feats` [B, T, C] with random time spans and channel bands zeroed in each clip's own frames
    (a copy; seeded by `generator`, so the warm start stays a function of its seed and step)."""
    out = feats.clone()
    n_channels = feats.shape[-1]
    widest = max(1, int(n_channels * MASK_CHANNELS_SHARE))
    for b, n in enumerate(lengths.tolist()):
        for _ in range(time_masks):
            width = min(n, int(torch.randint(0, MASK_FRAMES + 1, (), generator=generator)))
            # randint's upper bound is exclusive: starts 0 .. n - width, so the span may end on
            # the clip's last frame
            start = int(torch.randint(0, n - width + 1, (), generator=generator))
            out[b, start : start + width] = 0
        for _ in range(feature_masks):
            width = int(torch.randint(0, widest + 1, (), generator=generator))
            start = int(torch.randint(0, n_channels - width + 1, (), generator=generator))
            out[b, :, start : start + width] = 0
    return out


def ctc_warm_start(model, utterances: Sequence[Utterance], cache: FeatureCache, options: WarmStartRun,
                   show_progress: bool = True) -> list[dict]:
    """Train the adapter (and a CTC head) for `options.steps`; returns the step log.

    The head is the model's own when it compresses speech with it (it is kept), else a
    throw-away one. Deterministic given the seed, so under torchrun every rank computes the
    same warm start.
    """

    if options.method not in ("ctc", "embed"):
        raise ValueError(f"unknown warm start {options.method!r}; choose from {', '.join(METHODS)}")
    cache.check_model(model)
    tokens = [transcript_tokens(model.processor.tokenizer, u) for u in utterances]
    device = next(model.adapter.parameters()).device
    head = model.ctc_head
    if head is None:
        vocab = ctc_vocabulary(tokens, model.processor.tokenizer, options.vocab_min_count)
        head = EmbeddingCTCHead(token_embeddings(model.language_model), vocab).to(device)
    targets = ctc_targets(head, model.processor.tokenizer, tokens)
    frames = tuple(cache.frames(u.audio) for u in utterances)  # from the cached files' headers
    too_short = count_too_short(model, frames, targets)
    if too_short and show_progress:
        print(f"warm start: {too_short} of {len(utterances)} clips have fewer speech vectors than CTC needs "
              "for their transcript; they add nothing to it", file=sys.stderr)
    fresh = list(model.adapter.parameters()) + list(head.parameters())
    encoder = model.trainable_encoder_parameters()
    params = fresh + encoder
    pull = options.method == "embed"
    groups = [{"params": fresh}]
    if encoder:
        groups.append({"params": encoder, "lr": options.encoder_lr or options.lr})
    optimizer = torch.optim.AdamW(groups, lr=options.lr, weight_decay=0.0)
    warmup = max(1, options.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, options.steps, warmup))
    model.adapter.train()
    log, start = [], time.perf_counter()
    bar = tqdm(range(options.steps), desc=f"warm start ({options.method})", unit="step", disable=not show_progress)
    bucket_lengths = frames if options.bucket_by_length else None
    for step in bar:
        idx = global_batch_indices(step, len(utterances), options.batch_size, options.seed, bucket_lengths)
        feats, lengths = pad_features([cache.load(utterances[i].audio) for i in idx])
        if options.time_masks or options.feature_masks:
            masks = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
            feats = spec_augment(feats, lengths, options.time_masks, options.feature_masks, masks)
        x, out_lengths = model.speech_embeddings(feats.to(device), lengths.to(device))
        batch_targets = [targets[i] for i in idx]
        ctc = head.loss(x, out_lengths, batch_targets)
        record = {"step": step + 1, "ctc_loss": float(ctc.detach())}
        loss = ctc
        if pull:
            with torch.no_grad():
                paths = ctc_viterbi(head.log_probs(x), out_lengths, batch_targets)
            embed = embedding_pull(x, head, paths)
            loss = loss + options.embed_weight * embed
            record["embed_loss"] = float(embed.detach())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({**record, "grad_norm": float(grad_norm), "elapsed_s": round(time.perf_counter() - start, 3)})
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k.endswith("loss")})
    return log
