"""Step 2: train the adapter so that speech in place of the transcript yields the same continuation.

Only the adapter learns; the encoder and LLM are frozen (checked after training: their weights'
digests are unchanged and no gradient ever reached them). The loss is the LLM's cross-entropy on
the continuation (and its end-of-turn token) only.

Reproducibility: the data order is a seeded permutation per epoch, and a step's samples follow
from the step number alone, so `--resume` from a checkpoint (adapter, optimizer, scheduler, RNG)
ends exactly where an uninterrupted run would. Each step's loss is normalised by the number of
target tokens in the whole global batch (all ranks, all accumulation micro-batches), so one
process and N processes with the same global batch compute the same update.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import InitVar, asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_scheduler

from .data import Utterance, is_copy_continuation, read_manifest
from .distributed import DistInfo, all_reduce_sum, barrier, default_device, init_distributed
from .errors import BlspError, CheckpointError, InputError, SpeechStatesError
from .features import FeatureCache
from .io import append_jsonl, atomic_write_json, repair_jsonl_tail, replace_dir
from .modeling import (ADAPTER_WEIGHTS, SPEECH_STATES, SPEECH_VECTORS, BlspModel, check_bridge_adapter,
                       initial_speech_vectors, shared_prefix)
from .packaged import CACHE_DIR
from .sharding import digest_across_ranks, is_sharded, shard_model
from .processing import Example
from .losses import ForwardKLLoss, TopKKLLoss
from .lora import LoraSettings, lora_parameters, parse_modules
from .prompts import CONTINUATION_INSTRUCTION, task_instruction
from .vocabulary import ctc_vocabulary
from .warmstart import METHODS as WARM_STARTS, WarmStartOptions, ctc_targets, ctc_warm_start, transcript_tokens

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class TrainOptions:
    encoder: str = "whisper-base"
    llm: str = "smollm2-135m-instruct"
    adapter: str = "conv"
    adapter_downsample: int = 8  # encoder frames per speech vector (50 Hz / 8 = 6.25 Hz, the paper's)
    # What the adapter reads (blsp.modeling.SPEECH_STATES): encoder (the paper) | decoder (Whisper's
    # decoder states along its greedy transcript, one per token).
    speech_states: str = "encoder"
    speech_language: str = "en"  # with decoder states: the language Whisper transcribes, or auto (its guess per clip)
    instruction: str = CONTINUATION_INSTRUCTION
    system_prompt: str | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # any transformers scheduler name: linear, cosine, constant_with_warmup
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or fp32, bf16
    llm_dtype: str = "auto"  # the frozen LLM's stored weights: auto (bf16 when the step runs in bf16), fp32, bf16
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    feature_cache: str | None = None  # default: $BLSP_CACHE/features
    # Cached features kept in memory after their first read, per process. None: 1024 on a GPU, where
    # the step waits for the CPU and a file read per clip shows; 0 on a CPU, where a read costs
    # ~0.3 ms against a step's seconds and memory is the scarcer.
    feature_memory_mb: float | None = None
    # What step 2 learns from (README: the levers of `blsp train`).
    loss: str = "ce"  # ce | kl | ce+kl: cross-entropy on the continuation, and/or BLSP-KD distillation
    kl_temperature: float = 1.0
    kl_weight: float = 1.0
    mix_transcribe: float = 0.0  # share of utterances whose target is their transcript
    mix: str = ""  # task=share,...: shares trained on step 1's other answers (`responses`) or `transcribe`
    drop_copies: bool = False  # leave out continuations that merely repeat the transcript
    max_target_tokens: int | None = None  # train on each continuation's first N tokens (its opening
    # words depend most on the speech; later ones on the LLM's own text): shorter, cheaper steps
    # A saved model (a `blsp train` output) to go on training: its adapter, CTC head and LoRA, on
    # new or more data; there is no warm start then (the model had one).
    init_from: str | None = None
    warm_start: str = "none"  # none | ctc | embed: first train the adapter on cached features alone
    warm_start_steps: int = 0
    warm_start_lr: float = 2e-3
    warm_start_batch_size: int = 32
    warm_start_data: tuple[str, ...] = ()  # more manifests (transcripts, no step 1 needed) for the warm start
    embed_weight: float = 1.0  # weight of the pull onto the tokens' embeddings (--warm-start embed)
    compress_speech: str = "none"  # none | ctc: the LLM reads one speech vector per CTC token
    ctc_weight: float = 0.5  # with compression: CTC on the transcript beside step 2's loss
    # The CTC head's tokens (blsp.vocabulary): those of the transcripts seen at least this often, the
    # rarer ones spelled with them by undoing BPE merges. 1: every token seen, as before.
    ctc_min_count: int = 1
    # adapter | tokens: with compression, what the LLM reads per token run; with decoder states,
    # tokens: the token bridge's vectors (blsp.bridge) plus the adapter's as a correction
    speech_vectors: str = "adapter"
    # LoRA on the LLM (blsp.lora): rank 0 keeps the LLM frozen, as in the paper.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # on LoRA's input, in training only (peft's lora_dropout)
    lora_where: str = "speech"  # speech: at speech positions only (text prompts unchanged); all: everywhere
    lora_modules: str = "attention"  # projections: attention, mlp, all, or names (q_proj,v_proj)
    lora_lr: float | None = None  # LoRA's own peak learning rate; None: the adapter's (lr)
    # The encoder's top N layers train too; features are then cached below them and the N layers
    # run in every step (the warm start's included).
    unfreeze_encoder_layers: int = 0
    # Their own peak learning rate, in the warm start and step 2 alike: they start pretrained, and a
    # fresh adapter's rate (1e-3..3e-3) moves them far. None: the stage's own rate.
    encoder_lr: float | None = None
    # Scale (README "Scale"): shard the frozen LLM across ranks; sharded data's shuffle buffer.
    fsdp: bool = False
    shuffle_buffer: int = 1000  # --data DIR of tar shards: items mixed within each rank's stream
    # Speed and memory (benchmarks/train_step.py measures both).
    bucket_by_length: bool = True  # each global batch holds sequences of similar length: less padding
    warm_start_bucket_by_length: bool | None = None  # the warm start's batches; None: as bucket_by_length
    warm_start_time_masks: int = 0  # SpecAugment on the warm start's features (blsp.warmstart.spec_augment)
    warm_start_feature_masks: int = 0
    gradient_checkpointing: bool = False  # recompute the frozen LLM's layers in backward: less memory
    # Not a setting (no field: never saved or compared): (recipe, the options whose values it gave
    # because the caller gave none), so that an error about such a value blames the recipe, not a
    # flag the user never typed. Set by `from_recipe`.
    recipe_origin: InitVar[tuple[str, tuple[str, ...]] | None] = None

    # Settings that may change between a run and its resumption. fsdp: the same math. The warm
    # start's own switches: a resumed run (from a checkpoint after step 0) does not re-run it.
    RESUMABLE_CHANGES = ("save_every", "keep_checkpoints", "feature_cache", "feature_memory_mb", "fsdp",
                         "warm_start_time_masks", "warm_start_feature_masks", "warm_start_bucket_by_length")

    def __post_init__(self, recipe_origin: tuple[str, tuple[str, ...]] | None) -> None:
        object.__setattr__(self, "warm_start_data", tuple(str(p) for p in self.warm_start_data))
        object.__setattr__(self, "origin", recipe_origin)
        check_options(self)  # at construction: before any model is loaded or clip encoded

    @classmethod
    def from_recipe(cls, recipe: str, **options) -> "TrainOptions":
        """A recipe's settings (RECIPES), with `options` over them."""
        if recipe not in RECIPES:
            raise BlspError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        by_recipe = tuple(name for name in RECIPES[recipe] if name not in options)
        return cls(**{**RECIPES[recipe], **options}, recipe_origin=(recipe, by_recipe))

    def by_recipe(self, name: str) -> bool:
        """Whether the recipe, not a flag, gave option `name` its value."""
        return name in (self.origin or ("", ()))[1]

    def recipe_note(self, *names: str) -> str:
        """For an error about options `names`: which of their values the recipe set (the user
        typed no such flag) and how to avoid them; '' when the user set them all."""
        blamed = [name for name in names if self.by_recipe(name)]
        if not blamed:
            return ""
        recipe = self.origin[0]
        alternative = next(r for r in RECIPES if not any(name in RECIPES[r] for name in blamed))
        flags = lambda values: " ".join(f"--{name.replace('_', '-')} {values[name]}" for name in blamed)
        return (f" ({flags(asdict(self))} set by --recipe {recipe}, not by a flag: pass --recipe {alternative}, "
                f"or {flags(DEFAULTS)})")


# `blsp train --recipe NAME`: the values each recipe gives the options it names (a flag given on the
# command line wins). `paper`: the original's recipe, the dataclass's own defaults.
# `decoder` (the command line's default): the winner of the step-2 ablation on held-out sentences in
# an unseen voice (docs/ablation.md, recipes/ablation.yaml; 2.5x the gap `fast` closed there, 99-102%
# against 40%): Whisper's decoder states along its greedy transcript (one per token), each read as
# the LLM embeddings of Whisper's likeliest tokens (blsp.bridge) plus the adapter's correction (the
# stack adapter over one state: nothing to downsample); no warm start (the states already hold the
# words) and no compression (one per token already). 30% of the clips are trained on their
# transcript under the transcribe instruction, LoRA learning at 3e-3: the same gap (99.2% against
# 101.9%, within either's CI), and transcription at 15% WER where without them the LLM continues
# instead (96%). Its greedy continuations agree less with the text path's than the untrained
# bridge's do (BLEU 23.1 against 27.3); `--loss ce+kl` keeps them close (27.6) for 7 points of gap.
# `fast`: the best recipe over the encoder's frames (the words and more: voice, any language at
# once): the adapter at 12.5 Hz, a CTC warm start on cached features through the LLM's frozen
# embeddings, CTC-compressed speech, and rank-8 LoRA on the LLM's attention and MLP projections at
# speech positions only (text-only prompts keep the frozen LLM's answers; attention and MLP closed
# 2.2 points more of the gap than attention alone, over two seeds, for 1.1x step 2's time:
# docs/warm_start_probe.md, "LoRA's size"). Its CTC head emits the tokens seen 5+ times, rarer ones
# spelled with them (blsp.vocabulary): the same gap after step 2 for half the warm start's time.
RECIPES: dict[str, dict] = {
    "paper": {},
    "decoder": {"speech_states": "decoder", "speech_vectors": "tokens", "adapter": "stack", "adapter_downsample": 1,
                "lora_rank": 8, "lora_modules": "all", "mix_transcribe": 0.3, "lora_lr": 3e-3},
    "fast": {"adapter_downsample": 4, "warm_start": "ctc", "warm_start_steps": 500, "warm_start_lr": 3e-3,
             "compress_speech": "ctc", "lora_rank": 8, "lora_modules": "all", "ctc_min_count": 5},
}
DEFAULT_RECIPE = "decoder"  # `blsp train` without --recipe
RECIPE_OPTIONS = sorted({name for values in RECIPES.values() for name in values})
DEFAULTS = {f.name: f.default for f in fields(TrainOptions)}  # the paper's values (recipe `paper`)


LOSSES = ("ce", "kl", "ce+kl")
LLM_DTYPES = ("auto", "fp32", "bf16")
COMPRESSIONS = ("none", "ctc")


@dataclass
class BehaviorItem:
    """One training sequence: the speech prompt, its text twin (the KD teacher), the target."""

    utterance: Utterance
    prompt: list
    teacher_prompt: list
    target: list[int]
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None  # step 1's saved (ids, log-probs) [n, K]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def read_behavior_data(paths: Sequence[str | Path], skip_bad: bool = False) -> tuple[list[Utterance], list[InputError]]:
    """Behavior data lines: manifest lines that also carry a non-empty `continuation`."""
    utterances, skipped, empty = [], [], 0
    for path in paths:
        result = read_manifest(path, skip_bad=skip_bad)
        skipped += result.skipped
        for utt in result.utterances:
            cont = utt.extra.get("continuation")
            if isinstance(cont, str) and cont.strip():
                utterances.append(utt)
                continue
            if isinstance(cont, str):  # the LLM ended its turn at once: nothing to learn from
                empty += 1
                continue
            err = InputError("no `continuation` (is this step 1's output? run `blsp continue` first)", utt.source, utt.line)
            if not skip_bad:
                raise err
            skipped.append(err)
    if empty:
        print(f"step 2: left out {empty} line(s) whose continuation is empty", file=sys.stderr)
    if not utterances:
        raise BlspError(f"no usable training lines in {', '.join(map(str, paths))}")
    return utterances, skipped


def sample_order(n: int, epoch: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _clip(utt: Utterance) -> tuple:
    """What makes two utterances the same clip: the same samples of the same file."""
    ref = utt.audio
    return os.path.realpath(ref.path), ref.start, ref.num_samples


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
def checkpoint_dirs(output_dir: Path) -> list[Path]:
    dirs = [d for d in (output_dir / "checkpoints").glob("step-*") if (d / STATE_FILE).exists()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def module_digest(module: torch.nn.Module, trained: frozenset[str] = frozenset()) -> str:
    """Exact digest of every weight byte but the `trained` ones (LoRA's, the encoder's top layers):
    proves a frozen part did not change."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if name in trained:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model: BlspModel, utterances: list[Utterance], options: TrainOptions,
                 output_dir: str | Path, info: DistInfo | None = None, skip_bad: bool = False):
        # ru_maxrss is the process's lifetime peak: when other work ran in this process first (the
        # demo runs every stage in one), the summary's peak may be that work's, not training's.
        self.peak_rss_before_mb = peak_rss_mb()
        self.model, self.options = model, options
        self.output_dir = Path(output_dir)
        self.info = info or DistInfo()
        self.device = next(model.adapter.parameters()).device
        unfreeze_encoder(model, options)
        check_behavior_data(utterances, options)  # before every clip is encoded
        memory_mb = options.feature_memory_mb
        if memory_mb is None:
            memory_mb = 1024 if self.device.type == "cuda" else 0
        self.cache = FeatureCache(options.feature_cache or CACHE_DIR / "features", model.config.feature_key,
                                  memory_mb=memory_mb)
        # What filling the feature cache cost this run (0 where it was filled before): with decoder
        # states it is a Whisper decoding per clip, a cost the step-2 clock alone would hide.
        self.feature_timing = {"features_s": 0.0, "clips_encoded": 0}
        self.skipped = self.prepare_features(utterances, skip_bad)
        self.items = build_items(model.processor, [u for u in utterances if self.cache.has(u.audio)], options,
                                 model.config.llm_fingerprint)
        if not self.items:
            raise BlspError("no utterance with readable audio to train on")
        self.transcript_tokens = [transcript_tokens(model.processor.tokenizer, it.utterance) for it in self.items]
        self.warm_start_extra = self.read_warm_start_data(skip_bad)
        if options.compress_speech == "ctc" and model.ctc_head is None:
            extra = [transcript_tokens(model.processor.tokenizer, u) for u in self.warm_start_extra]
            model.enable_ctc_compression(ctc_vocabulary(self.transcript_tokens + extra, model.processor.tokenizer,
                                                        options.ctc_min_count), options.speech_vectors)
        self.ctc_targets = (ctc_targets(model.ctc_head, model.processor.tokenizer, self.transcript_tokens)
                            if model.ctc_head is not None else None)
        self.n_examples = len(self.items)
        self.lengths, self.frames = self.bucketing_lengths() if options.bucket_by_length else (None, None)
        model.set_llm_checkpointing(options.gradient_checkpointing)
        self.global_batch = options.batch_size * options.grad_accum * self.info.world_size
        self.total_steps = options.max_steps or max(1, math.ceil(options.epochs * len(self.items) / self.global_batch))
        self.setup_optimization()

    def setup_optimization(self) -> None:
        """Loss, optimizer, schedule and precision (needs `total_steps`; shared with blsp.streaming)."""
        model, options = self.model, self.options
        if options.lora_rank and model.lora_gate is None:
            model.enable_lora(lora_settings(options))
        self.kl = ForwardKLLoss(options.kl_temperature) if "kl" in options.loss else None
        self.topk_kl = TopKKLLoss(options.kl_temperature)
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(parameter_groups(model, options), lr=options.lr,
                                           weight_decay=options.weight_decay)
        self.scheduler = get_scheduler(options.lr_schedule, self.optimizer, options.warmup_steps, self.total_steps)
        self.step = 0
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=runs_in_bf16(options, self.device))
        if stores_llm_in_bf16(options, self.device):
            store_frozen_llm(model, torch.bfloat16)

    # -- features ------------------------------------------------------------------------------
    def prepare_features(self, utterances: list[Utterance], skip_bad: bool) -> list[InputError]:
        """Encode every clip once (each rank its share), then wait for all ranks.

        With `skip_bad`, clips that cannot be read are left out (every rank then sees the same
        set: whatever has no cached features after the barrier).
        """
        t0, todo = time.perf_counter(), len({u.audio for u in utterances if not self.cache.has(u.audio)})
        errors = self.cache.fill(self.model, utterances, rank=self.info.rank,
                                 world_size=self.info.world_size, skip_bad=skip_bad)
        barrier()
        self.feature_timing["features_s"] = round(self.feature_timing["features_s"] + time.perf_counter() - t0, 1)
        self.feature_timing["clips_encoded"] += todo
        return errors

    def read_warm_start_data(self, skip_bad: bool) -> list[Utterance]:
        """--warm-start-data: utterances with transcripts only, for the warm start (and the CTC
        head's vocabulary). Step 1 costs an LLM generation per sentence; these cost none, so
        the warm start can hear far more words than step 2 has continuations for."""
        # A clip both in --data and here (the demo passes its whole train manifest, of which step 1
        # continued a part) is heard once, not twice as often as the rest.
        heard = {_clip(it.utterance) for it in self.items}
        extra: list[Utterance] = []
        for path in self.options.warm_start_data:
            result = read_manifest(path, skip_bad=skip_bad)
            self.skipped += result.skipped
            for u in result.utterances:
                clip = _clip(u)
                if clip not in heard:
                    heard.add(clip)
                    extra.append(u)
        if extra:
            self.skipped += self.prepare_features(extra, skip_bad)
        return [u for u in extra if self.cache.has(u.audio)]

    def bucketing_lengths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per item, the LLM positions it takes (prompt, speech vectors, target: what a batch pads
        to) and its speech frames. Reads only the cached features' headers."""
        frames = tuple(self.cache.frames(it.utterance.audio) for it in self.items)
        speech = [self.model.processor.speech_lengths(f) for f in frames]
        positions = tuple(sum(len(p) if isinstance(p, list) else s for p in it.prompt) + len(it.target)
                          for it, s in zip(self.items, speech))
        return positions, frames

    def example(self, item: BehaviorItem) -> Example:
        return Example(pieces=item.prompt, features=[self.cache.load(item.utterance.audio, dtype=None)], target=item.target)

    def micro_batch_loss(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss to backpropagate, summed parts by name, detached) over the items' target tokens."""
        items = [self.items[i] for i in indices]
        batch, prefix = self.on_device(self.model.processor.collate([self.example(it) for it in items]))
        with self.autocast:
            out = self.model(**batch, return_target_logits=self.kl is not None, shared_prefix=prefix)
        loss = out.loss_sum if "ce" in self.options.loss.split("+") else out.loss_sum * 0
        # Parts stay on the device until the step ends: reading one here would make the CPU wait
        # for the GPU's forward before it may queue the backward.
        parts = {"loss": out.loss_sum.detach()}
        if self.kl is not None:
            kl = self.distillation(items, out.target_logits)
            loss = loss + self.options.kl_weight * kl
            parts["kl"] = kl.detach()
        head = self.model.ctc_head
        if head is not None and self.options.ctc_weight > 0:
            # Keeps the head that decides what the LLM sees in step with the adapter it reads.
            targets = [self.ctc_targets[i] for i in indices]
            ctc = head.loss(*out.speech, targets) * sum(map(len, targets))
            loss = loss + self.options.ctc_weight * ctc
            parts["ctc"] = ctc.detach()
        return loss, parts

    def on_device(self, batch: dict) -> tuple[dict, list[int]]:
        """A collated batch moved to the training device, and its shared prompt prefix (read on
        the CPU side, so no GPU sync). On CUDA through pinned memory, without blocking."""
        prefix = shared_prefix(batch["input_ids"], batch["attention_mask"], batch.get("labels"))
        if self.device.type != "cuda":
            return {k: v.to(self.device) for k, v in batch.items()}, prefix
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}, prefix

    def distillation(self, items: list[BehaviorItem], student_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) over the items' target tokens, item by item: from the top-k step 1
        saved where an item has it, else from the frozen LLM reading the transcript now (run on
        those items alone). Both losses are sums over positions, so their sum is the loss over
        all rows at once: a micro-batch mixing the two (`--mix` draws items without a saved
        top-k) costs the teacher forward of its unsaved rows only."""
        rows = student_logits.split([len(it.target) for it in items])
        saved = [i for i, it in enumerate(items) if it.teacher_topk is not None]
        live = [i for i, it in enumerate(items) if it.teacher_topk is None]
        total = student_logits.new_zeros((), dtype=torch.float32)
        if saved:
            ids = torch.cat([items[i].teacher_topk[0] for i in saved]).to(self.device)
            logprobs = torch.cat([items[i].teacher_topk[1] for i in saved]).to(self.device)
            total = total + self.topk_kl(torch.cat([rows[i] for i in saved]), ids, logprobs)
        if self.runs_teacher(bool(live)):
            # A rank with no unsaved item still runs the forward when another rank does (a
            # sharded LLM's forward is collective); it reads its first item and ignores it.
            teacher_logits = self.teacher_logits([items[i] for i in live] or items[:1])
            if live:
                total = total + self.kl(torch.cat([rows[i] for i in live]), teacher_logits)
        return total

    def runs_teacher(self, needed: bool) -> bool:
        """Whether this micro-batch runs the live teacher. Every forward of a sharded LLM is a
        collective: there all ranks run it when any one needs it (an all-reduce of the flag),
        or those that skip it would leave the others waiting forever."""
        if not is_sharded(self.model):
            return needed
        return bool(all_reduce_sum(torch.tensor([float(needed)])).item() > 0)

    def teacher_logits(self, items: list[BehaviorItem]) -> torch.Tensor:
        """The frozen LLM's logits at the items' target tokens, reading their transcripts."""
        teacher, prefix = self.on_device(self.model.processor.collate(
            [Example(pieces=it.teacher_prompt, target=it.target) for it in items]))
        with torch.no_grad(), self.autocast, self.model.lora_off():
            return self.model(**teacher, return_target_logits=True, shared_prefix=prefix).target_logits

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        indices = global_batch_indices(step, len(self.items), self.global_batch, self.options.seed, self.lengths,
                                       self.frames)
        # Normaliser: target tokens of the whole global batch, known to every rank without talking.
        n_tokens = sum(len(self.items[i].target) for i in indices)
        scale = self.info.world_size / n_tokens  # the gradient all-reduce below divides by world
        self.model.adapter.train()
        sums: dict[str, torch.Tensor] = {}
        for mb in micro_batches(indices, self.options.batch_size, self.info):
            loss, parts = self.micro_batch_loss(mb)
            (loss * scale).backward()
            for name, value in parts.items():
                sums[name] = sums[name] + value if name in sums else value
        self.all_reduce_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**step_record(sums, grad_norm, n_tokens), "lr": lr, "tokens": n_tokens, "samples": len(indices)}

    def all_reduce_gradients(self) -> None:
        """Average the adapter's gradients over ranks in one flat all-reduce (data parallel)."""
        if not dist.is_initialized():
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.info.world_size
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        torch.manual_seed(self.options.seed)
        if resume:
            self.load_latest_checkpoint()
        elif checkpoint_dirs(self.output_dir) and self.info.is_main:
            raise BlspError(f"{self.output_dir} already holds checkpoints: pass --resume, or use a new --output-dir")
        frozen_before = self.frozen_digests()
        log_path = self.output_dir / LOG_FILE
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(log_path, self.step)
        self.timings = {}
        if self.step == 0 and runs_warm_start(self.options):
            t0 = time.perf_counter()
            self.warm_start()
            self.timings["warm_start_s"] = round(time.perf_counter() - t0, 1)
        start, first_step = time.perf_counter(), self.step
        bar = tqdm(total=self.total_steps, initial=self.step, desc="step 2: training", unit="step",
                   disable=not self.info.is_main)
        while self.step < self.total_steps:
            record = self.train_step(self.step)
            self.step += 1
            elapsed = time.perf_counter() - start
            record = {"step": self.step, **record, "elapsed_s": round(elapsed, 3),
                      "samples_per_s": round((self.step - first_step) * self.global_batch / elapsed, 3)}
            if self.info.is_main:
                append_jsonl(log_path, [record])
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            bar.update(1)
            if self.step % self.options.save_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.timings["train_s"] = round(time.perf_counter() - start, 1)
        self.check_frozen(frozen_before)
        if self.info.is_main:
            self.model.save_pretrained(self.output_dir)
            summary = {"steps": self.step, "global_batch": self.global_batch, "examples": self.n_examples,
                       "warm_start_clips": len(self.warm_start_utterances()) if runs_warm_start(self.options) else 0,
                       "options": asdict(self.options), "world_size": self.info.world_size,
                       "peak_rss_mb": peak_rss_mb(), "peak_rss_before_training_mb": self.peak_rss_before_mb,
                       **self.feature_timing, **self.timings}
            atomic_write_json(self.output_dir / "train_summary.json", summary)
            plot_loss(log_path, self.output_dir / "train_loss.png")
        barrier()
        return {"steps": self.step, "output_dir": str(self.output_dir)}

    def warm_start_utterances(self) -> list[Utterance]:
        """What the warm start hears: every training item's clip, then --warm-start-data's others."""
        return [it.utterance for it in self.items] + self.warm_start_extra

    def warm_start(self) -> None:
        """The CTC warm start on cached features (see blsp.warmstart); its log beside the run's."""
        o = self.options
        bucket = o.bucket_by_length if o.warm_start_bucket_by_length is None else o.warm_start_bucket_by_length
        options = WarmStartOptions(method=o.warm_start, steps=o.warm_start_steps, lr=o.warm_start_lr,
                                   batch_size=o.warm_start_batch_size, seed=o.seed, embed_weight=o.embed_weight,
                                   bucket_by_length=bucket, time_masks=o.warm_start_time_masks,
                                   feature_masks=o.warm_start_feature_masks, vocab_min_count=o.ctc_min_count,
                                   encoder_lr=o.encoder_lr)
        log = ctc_warm_start(self.model, self.warm_start_utterances(), self.cache, options,
                             show_progress=self.info.is_main)
        if self.info.is_main:
            atomic_write_json(self.output_dir / "warm_start_log.json", log)

    # -- frozen parts --------------------------------------------------------------------------
    def trained_names(self, part: torch.nn.Module) -> frozenset[str]:
        """The names of a backbone's parameters that train (LoRA's, the encoder's top layers)."""
        trained = {id(p) for p in self.model.trainable_parameters()}
        return frozenset(n for n, p in part.named_parameters() if id(p) in trained)

    def frozen_parts(self) -> tuple[str, ...]:
        return ("audio_tower", "language_model") + (("speech_decoder",) if self.model.speech_decoder is not None else ())

    def frozen_digests(self) -> dict[str, str]:
        if is_sharded(self.model):  # nothing of a sharded LLM trains (LoRA is refused with --fsdp)
            return {name: digest_across_ranks(getattr(self.model, name)) for name in self.frozen_parts()}
        return {name: module_digest(getattr(self.model, name), self.trained_names(getattr(self.model, name)))
                for name in self.frozen_parts()}

    def check_frozen(self, before: dict[str, str]) -> None:
        for name, digest in self.frozen_digests().items():
            part = getattr(self.model, name)
            if digest != before[name]:
                raise RuntimeError(f"the frozen {name} changed during training")
            trained = self.trained_names(part)
            frozen = (p for n, p in part.named_parameters() if n not in trained)
            if any(p.requires_grad or p.grad is not None for p in frozen):
                raise RuntimeError(f"a gradient reached the frozen {name}")

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not self.info.is_main:
            barrier()
            return
        final = self.output_dir / "checkpoints" / f"step-{self.step}"
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        torch.save({
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "options": asdict(self.options),
            "world_size": self.info.world_size,
        }, tmp / STATE_FILE)
        replace_dir(tmp, final)
        for old in checkpoint_dirs(self.output_dir)[: -self.options.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load_latest_checkpoint(self) -> None:
        dirs = checkpoint_dirs(self.output_dir)
        if not dirs:
            print(f"resume: no checkpoint in {self.output_dir}, starting from step 0", file=sys.stderr)
            return
        latest = dirs[-1]
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=False)
        check_resumable(latest, state["options"], self.options)
        from safetensors.torch import load_file

        self.model.load_trainable_state_dict(load_file(str(latest / ADAPTER_WEIGHTS)), latest / ADAPTER_WEIGHTS)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        if self.info.is_main:
            print(f"resume: from {latest} (step {self.step} of {self.total_steps})", file=sys.stderr)


def check_resumable(checkpoint: Path, saved: dict, options: TrainOptions) -> None:
    """Refuse to resume a checkpoint under other settings (but RESUMABLE_CHANGES). An option the
    checkpoint lacks was added since it was written: it had that option's default."""
    current = asdict(options)
    before = {name: saved.get(name, DEFAULTS[name]) for name in current}
    changed = [name for name in current
               if name not in TrainOptions.RESUMABLE_CHANGES and before[name] != current[name]]
    if not changed:
        return
    detail = ", ".join(f"{name}: {before[name]!r} -> {current[name]!r}" for name in changed)
    raise CheckpointError(f"{checkpoint}: cannot resume with other training settings ({detail})"
                          + recipe_hint(before, changed))


def recipe_hint(before: dict, changed: Sequence[str]) -> str:
    """For changed options that a recipe sets: the recipe whose values the run started with (the
    command line's default recipe may not be the one it was started under)."""
    by_recipe = [name for name in changed if name in RECIPE_OPTIONS]
    if not by_recipe:
        return ""
    flags = ", ".join(f"--{name.replace('_', '-')}" for name in by_recipe)
    started = [r for r, values in RECIPES.items()
               if all(before[name] == values.get(name, DEFAULTS[name]) for name in RECIPE_OPTIONS)]
    how = f"pass --recipe {started[0]}, whose values it started with" if started else "give them the run's values"
    return f"; --recipe sets {flags}: {how}"


def mix_shares(options: TrainOptions) -> dict[str, float]:
    """`--mix summarize=0.1,transcribe=0.1` (and `--mix-transcribe`) as {task: share}, checked."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in options.mix.split(","))):
        task, eq, share = part.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not eq or not task.strip() or not 0 <= value <= 1:
            raise BlspError(f"--mix {options.mix!r}: write task=share pairs, shares from 0 to 1 "
                            "(e.g. transcribe=0.1,summarize=0.2)")
        if task.strip() in shares:
            raise BlspError(f"--mix {options.mix!r}: task {task.strip()!r} given twice")
        if task.strip() == "continuation":
            raise BlspError(f"--mix {options.mix!r}: the continuation is what every utterance not drawn for "
                            "another task trains on; give only the other tasks' shares")
        shares[task.strip()] = value
    recipe_note = ""
    if options.mix_transcribe:
        if "transcribe" not in shares:
            shares["transcribe"] = options.mix_transcribe
            recipe_note = options.recipe_note("mix_transcribe")  # '' where the user typed it
        elif not options.by_recipe("mix_transcribe"):
            raise BlspError("give the transcribe share once: --mix-transcribe or --mix transcribe=...")
        # else a typed --mix transcribe=... wins over the recipe's share
    if sum(shares.values()) > 1 + 1e-9:
        raise BlspError(f"the --mix shares add up to {sum(shares.values()):g}, more than 1" + recipe_note)
    return {task: share for task, share in shares.items() if share > 0}


def choose_task(draw: float, shares: dict[str, float]) -> str | None:
    """The task a uniform `draw` in [0, 1) falls on (shares laid end to end); None: the continuation."""
    edge = 0.0
    for task, share in shares.items():
        edge += share
        if draw < edge:
            return task
    return None


def check_options(options: TrainOptions) -> None:
    """Refuse settings that cannot work before any minute is spent on them."""
    mix_shares(options)
    for name, value, known in (("--loss", options.loss, LOSSES), ("--warm-start", options.warm_start, WARM_STARTS),
                               ("--compress-speech", options.compress_speech, COMPRESSIONS),
                               ("--speech-states", options.speech_states, SPEECH_STATES)):
        if value not in known:
            raise BlspError(f"unknown {name} {value!r}; choose from {', '.join(known)}")
    if options.speech_language != "en":
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        if options.speech_states != "decoder":
            raise BlspError(f"--speech-language {options.speech_language}: only Whisper's decoder transcribes in a "
                            "language; add --speech-states decoder (the encoder's frames have none)")
        if options.speech_language not in (*LANGUAGES, "auto"):
            raise BlspError(f"--speech-language {options.speech_language!r}: auto, or one of Whisper's language codes "
                            f"({', '.join(list(LANGUAGES)[:8])}, ...)")
    if options.speech_states == "decoder":
        # the decoder's states come one per token: nothing for CTC to align, no frames to drop
        for name, value, off in (("warm_start", options.warm_start, "none"),
                                 ("compress_speech", options.compress_speech, "none"),
                                 ("unfreeze_encoder_layers", options.unfreeze_encoder_layers, 0)):
            if value != off:
                raise BlspError(f"--{name.replace('_', '-')} {value}: not with --speech-states decoder (one state per "
                                f"token of Whisper's transcript); use --{name.replace('_', '-')} {off}"
                                + options.recipe_note(name, "speech_states"))
    if options.speech_vectors == "tokens" and options.speech_states == "decoder":
        try:
            check_bridge_adapter(options.adapter, options.adapter_downsample)
        except BlspError as err:  # say so where the recipe, not the user, asked for the bridge
            raise BlspError(str(err) + options.recipe_note("speech_states", "speech_vectors")) from None
    n = options.adapter_downsample
    if not (n >= 2 and n & (n - 1) == 0 if options.adapter == "conv" else n >= 1):
        raise BlspError(f"--adapter-downsample {options.adapter_downsample}: the conv adapter downsamples by a power "
                        "of 2 (2, 4, 8, ...), the stack adapter by any positive whole number"
                        + options.recipe_note("adapter_downsample"))
    if options.speech_vectors not in SPEECH_VECTORS:
        raise BlspError(f"unknown --speech-vectors {options.speech_vectors!r}; choose from {', '.join(SPEECH_VECTORS)}")
    if options.speech_vectors == "tokens" and options.compress_speech != "ctc" and options.speech_states != "decoder":
        raise BlspError("--speech-vectors tokens reads each CTC token run, or each of Whisper's decoder states, as token "
                        "embeddings: add --compress-speech ctc or --speech-states decoder"
                        + options.recipe_note("speech_vectors"))
    if options.max_target_tokens is not None and options.max_target_tokens < 1:
        raise BlspError(f"--max-target-tokens {options.max_target_tokens}: keep at least 1 token")
    if options.llm_dtype not in LLM_DTYPES:
        raise BlspError(f"unknown --llm-dtype {options.llm_dtype!r}; choose from {', '.join(LLM_DTYPES)}")
    if options.feature_memory_mb is not None and options.feature_memory_mb < 0:
        raise BlspError(f"--feature-memory-mb {options.feature_memory_mb}: 0 (read from disk every time) or more")
    if options.warm_start_time_masks < 0 or options.warm_start_feature_masks < 0:
        raise BlspError("--warm-start-time-masks / --warm-start-feature-masks: 0 (off) or more masks per clip")
    if options.unfreeze_encoder_layers < 0:
        raise BlspError(f"--unfreeze-encoder-layers {options.unfreeze_encoder_layers}: 0 or more")
    if options.unfreeze_encoder_layers and options.fsdp:
        raise BlspError("--unfreeze-encoder-layers with --fsdp is not supported: the sharded model must stay frozen")
    if options.encoder_lr is not None and (not options.unfreeze_encoder_layers or options.encoder_lr <= 0):
        raise BlspError(f"--encoder-lr {options.encoder_lr}: needs --unfreeze-encoder-layers N (N > 0) and a rate "
                        "above 0")
    # (a recipe's LoRA rate goes unused when a typed --lora-rank 0 turns LoRA off)
    if options.lora_lr is not None and (options.lora_lr <= 0 or not options.lora_rank and not options.by_recipe("lora_lr")):
        raise BlspError(f"--lora-lr {options.lora_lr}: needs --lora-rank R (R > 0) and a rate above 0")
    if options.lora_rank:
        lora_settings(options)  # its own checks (where, rank, module names)
        if options.fsdp:
            raise BlspError("--lora-rank with --fsdp is not supported: the sharded LLM must stay frozen"
                            + options.recipe_note("lora_rank"))
    no_warm_start = options.warm_start == "none" or options.warm_start_steps <= 0
    if options.init_from:
        # The saved model had its warm start; a recipe's (--recipe fast) is skipped, a flag's refused.
        if (options.warm_start != "none" and not options.by_recipe("warm_start")) or options.warm_start_data:
            raise BlspError(f"--init-from {options.init_from} goes on from a trained model, without a warm start: "
                            "drop --warm-start and --warm-start-data")
        return
    if options.warm_start_data and no_warm_start:
        raise BlspError("--warm-start-data is heard by the warm start only: add --warm-start ctc|embed "
                        "--warm-start-steps N (N > 0), or leave it out")
    if options.compress_speech == "ctc" and no_warm_start:
        raise BlspError("--compress-speech ctc needs a CTC-trained head: add --warm-start ctc|embed "
                        "--warm-start-steps N (N > 0)" + options.recipe_note("compress_speech"))


def runs_warm_start(options: TrainOptions) -> bool:
    return options.warm_start != "none" and not options.init_from


def init_model(options: TrainOptions) -> BlspModel:
    """--init-from DIR: the saved model (adapter, CTC head, LoRA) on the run's backbones, which must
    be the ones it was trained against; its shape and prompt must be what the run asks for."""
    model = BlspModel.from_pretrained(options.init_from, encoder=options.encoder, llm=options.llm)
    c = model.config
    saved_lora = c.lora or {}
    asked_lora = lora_settings(options).to_dict() if options.lora_rank else {}
    pairs = [("speech_states", c.speech_states, options.speech_states),
             ("speech_language", c.speech_language or "en", options.speech_language),
             ("adapter", c.adapter_type, options.adapter),
             ("adapter_downsample", c.adapter_downsample, options.adapter_downsample),
             ("compress_speech", c.speech_compression or "none", options.compress_speech),
             ("lora_rank", saved_lora.get("rank", 0), options.lora_rank),
             ("system_prompt", c.system_prompt, options.system_prompt)]
    if c.speech_compression or c.speech_states == "decoder":
        pairs.append(("speech_vectors", c.speech_vectors, options.speech_vectors))
    if saved_lora and asked_lora:
        pairs += [("lora_alpha", saved_lora["alpha"], asked_lora["alpha"]),
                  ("lora_where", saved_lora["where"], asked_lora["where"]),
                  ("lora_modules", ",".join(saved_lora["target_modules"]), ",".join(asked_lora["target_modules"]))]
    differ = [(name, saved, asked) for name, saved, asked in pairs if saved != asked]
    if differ:
        flags = lambda i: " ".join(f"--{d[0].replace('_', '-')} {d[i]!r}" for d in differ)
        raise BlspError(f"--init-from {options.init_from}: the saved model was trained with {flags(1)}, this run "
                        f"asks for {flags(2)}; give the saved values"
                        + options.recipe_note(*(d[0] for d in differ)))
    return model


def unfreeze_encoder(model: BlspModel, options: TrainOptions) -> None:
    """--unfreeze-encoder-layers N, before any feature is cached (they are cached below those layers)."""
    if options.unfreeze_encoder_layers == model.config.encoder_trainable_layers:
        return
    if model.config.encoder_trainable_layers:
        raise CheckpointError(f"the model trains {model.config.encoder_trainable_layers} encoder layer(s); "
                              f"--unfreeze-encoder-layers {options.unfreeze_encoder_layers} asks otherwise")
    model.unfreeze_encoder_layers(options.unfreeze_encoder_layers)


def parameter_groups(model: BlspModel, options: TrainOptions) -> list[dict]:
    """The optimizer's groups: LoRA and the unfrozen encoder layers may learn at their own rates
    (the schedule scales every group alike)."""
    own = []
    if options.lora_lr is not None:
        own.append((lora_parameters(model.language_model), options.lora_lr))
    if options.encoder_lr is not None:
        own.append((model.trainable_encoder_parameters(), options.encoder_lr))
    own = [(params, lr) for params, lr in own if params]
    taken = {id(p) for params, _ in own for p in params}
    rest = [p for p in model.trainable_parameters() if id(p) not in taken]
    return [{"params": rest}] + [{"params": params, "lr": lr} for params, lr in own]


def lora_settings(options: TrainOptions) -> LoraSettings:
    return LoraSettings(rank=options.lora_rank, alpha=options.lora_alpha, dropout=options.lora_dropout,
                        where=options.lora_where, target_modules=parse_modules(options.lora_modules))


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def speech_prompts(proc, options: TrainOptions) -> dict[str, list]:
    """The speech prompt of each instruction step 2 trains under, built once (others on first use)."""
    return {i: proc.speech_prompt(i) for i in (options.instruction, task_instruction("transcribe"))}


def step1_answer(utt: Utterance, task: str) -> dict | None:
    """The line's step-1 answer {instruction, text, truncated} to a task of the instruction set, if any."""
    responses = utt.extra.get("responses")
    response = responses.get(task) if isinstance(responses, dict) else None
    if isinstance(response, dict) and isinstance(response.get("text"), str) \
            and isinstance(response.get("instruction"), str):
        return response
    return None


def task_target(utt: Utterance, task: str) -> tuple[str, str, bool]:
    """(instruction, target text, truncated) of a mixed-in task: the transcript, or step 1's answer."""
    if task == "transcribe":
        return task_instruction("transcribe"), utt.text, False
    response = step1_answer(utt, task)
    if response is None:
        raise InputError(f"--mix {task}=...: this line has no step-1 answer for task {task!r} (run `blsp continue "
                         f"--instruction-set FILE` with a task of that name)", utt.source, utt.line)
    return response["instruction"], response["text"], bool(response.get("truncated"))


def check_behavior_data(utterances: Sequence[Utterance], options: TrainOptions) -> None:
    """What the lines alone can show to be wrong, checked before minutes go into loading the
    models and encoding every clip: a `--mix` task some line has no answer to (any line may be
    drawn for it), and saved top-k of differing K (the KL loss stacks them)."""
    for task in mix_shares(options):
        if task != "transcribe":
            check_mixed_task(utterances, task)
    if "kl" in options.loss:
        check_topk_width(utterances)


def check_mixed_task(utterances: Sequence[Utterance], task: str) -> None:
    missing = [u for u in utterances if step1_answer(u, task) is None]
    if len(missing) == len(utterances):  # most likely a misspelt task: say which there are
        known = sorted({t for u in utterances if isinstance(u.extra.get("responses"), dict)
                        for t in u.extra["responses"]})
        files = ", ".join(sorted({u.source for u in utterances}))
        raise BlspError(f"--mix {task}=...: no line of {files} has a step-1 answer for task {task!r} "
                        f"({'its tasks: ' + ', '.join(known) if known else 'step 1 ran without --instruction-set'})")
    if missing:
        task_target(missing[0], task)  # raises, naming the line


def topk_width(saved) -> int | None:
    """K of a line's saved top-k (its rows' width); None where there is none to read (a
    malformed one is reported by `saved_topk`)."""
    ids = saved.get("ids") if isinstance(saved, dict) else None
    return len(ids[0]) if isinstance(ids, list) and ids and isinstance(ids[0], list) else None


def check_topk_width(utterances: Sequence[Utterance]) -> None:
    first: tuple[int, Utterance] | None = None
    for utt in utterances:
        k = topk_width(utt.extra.get("teacher_topk"))
        if k is None:
            continue
        if first is None:
            first = (k, utt)
        elif k != first[0]:
            raise InputError(f"teacher_topk: K {k} here, but K {first[0]} at {first[1].source}:{first[1].line} "
                             "(lines of two step-1 runs?): distil from one --save-topk K, or train with --loss ce",
                             utt.source, utt.line)


def behavior_item(proc, utt: Utterance, options: TrainOptions, task: str | None,
                  prompts: dict[str, list], llm_fingerprint: str | None = None) -> BehaviorItem:
    """One training sequence: the utterance's continuation under the continuation instruction, or
    with a mixed-in `task` that task's target under its instruction (`transcribe`: the transcript);
    the teacher reads the transcript under the same instruction. `llm_fingerprint`: the model's
    LLM, which a saved top-k must come from (None: not checked)."""
    transcript = utt.extra.get("prompt_transcript") or utt.text
    if task is None:
        instruction, text, truncated = options.instruction, utt.extra["continuation"], bool(utt.extra.get("truncated"))
    else:
        instruction, text, truncated = task_target(utt, task)
    target = proc.prompt.target_ids(text, truncated)
    if task is None:
        target = target[: options.max_target_tokens]
    if instruction not in prompts:
        prompts[instruction] = proc.speech_prompt(instruction)
    teacher_prompt = proc.transcript_prompt(instruction, transcript)
    saved = utt.extra.get("teacher_topk") if task is None and "kl" in options.loss else None
    topk = saved_topk(utt, saved, teacher_prompt, target, llm_fingerprint) if saved is not None else None
    return BehaviorItem(utt, prompts[instruction], teacher_prompt, target, topk)


def saved_topk(utt: Utterance, saved, teacher_prompt: list, target: list[int],
               llm_fingerprint: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1's saved teacher (`--save-topk`) as (ids, log-probs) [n, K] for the target's tokens,
    checked to be the teacher step 2 would run: the same LLM weights (`llm_fingerprint`, the
    model's), the same prompt and the same target tokens."""
    from .continuation import prompt_digest
    from .prompts import pieces_to_ids

    def bad(why: str) -> InputError:
        return InputError(f"teacher_topk: {why}", utt.source, utt.line)

    if not isinstance(saved, dict) or not all(k in saved for k in ("prompt", "target_ids", "ids", "logprobs")):
        raise bad("expected {prompt, target_ids, ids, logprobs} as written by `blsp continue --save-topk K`")
    if llm_fingerprint is not None and saved.get("llm") != llm_fingerprint:
        # Another LLM (a fine-tune, say) can share the tokenizer and template, so the prompt's
        # digest alone cannot tell; its top-k would teach another model's answers.
        raise bad(f"saved by LLM {saved.get('llm') or '(not recorded: an older `blsp continue`)'}, but the "
                  f"model's is {llm_fingerprint}: run step 1 with step 2's --llm, or train with --loss ce")
    if saved["prompt"] != prompt_digest(pieces_to_ids(teacher_prompt)):
        raise bad("saved for another prompt than step 2's teacher reads (another system prompt, instruction or "
                  "LLM?): run step 1 with step 2's settings, or train with --loss ce")
    n = len(target)
    if list(saved["target_ids"][:n]) != list(target) or len(saved["ids"]) < n:
        raise bad("saved for other continuation tokens than step 2 trains on (another tokenizer?)")
    try:
        ids = torch.tensor(saved["ids"][:n], dtype=torch.long)
        logprobs = torch.tensor(saved["logprobs"][:n], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise bad(f"ids and logprobs must be equal-length lists of numbers per token ({err})") from None
    if ids.shape != logprobs.shape or ids.dim() != 2:
        raise bad(f"ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must both be [tokens, K]")
    return ids, logprobs


def build_items(proc, utterances: list[Utterance], options: TrainOptions,
                llm_fingerprint: str | None = None) -> list[BehaviorItem]:
    """Training sequences: continuation targets, and with `--mix` seeded shares of the utterances
    trained instead on another task: `transcribe` (the paper's variant; it keeps the exact words in
    view) or an instruction of step 1's instruction set (summarise, answer, ...)."""
    rng = random.Random(options.seed)
    prompts = speech_prompts(proc, options)
    shares = mix_shares(options)
    if options.drop_copies:
        kept = [u for u in utterances if not is_copy_continuation(u)]
        print(f"step 2: left out {len(utterances) - len(kept)} of {len(utterances)} continuations that repeat "
              "the transcript (--drop-copies)", file=sys.stderr)
        utterances = kept
    return [behavior_item(proc, u, options, choose_task(rng.random(), shares), prompts, llm_fingerprint)
            for u in utterances]


def step_record(sums: dict[str, torch.Tensor], grad_norm: torch.Tensor, n_tokens: int) -> dict[str, float]:
    """A step's log record: each summed loss part per target token (over all ranks), and the
    gradient norm. Read back in one transfer, once the whole step is queued."""
    names = sorted(sums)
    values = torch.stack([sums[name].float() for name in names] + [grad_norm.float()]).tolist()
    record = {name: all_reduce_scalar(value) / max(1, n_tokens) for name, value in zip(names, values)}
    return {**record, "grad_norm": values[-1]}


def all_reduce_scalar(value: float) -> float:
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64)))


def truncate_log(path: Path, step: int) -> None:
    """Keep only log lines up to `step` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    repair_jsonl_tail(path)
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    from .io import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in kept))


def draw_loss_curve(ax, log_paths: Path | Sequence[Path]) -> bool:
    """The step log's loss per step and its moving mean on `ax`; False when there is no log.

    Several logs (rounds of training, each going on from the one before) are drawn one after
    the other, a dotted line where each later round starts."""
    steps, losses, starts = [], [], []
    for path in [log_paths] if isinstance(log_paths, (str, Path)) else log_paths:
        path = Path(path)
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        if records and steps:
            starts.append(steps[-1])
        offset = steps[-1] if steps else 0
        steps += [offset + r["step"] for r in records]
        losses += [r["loss"] for r in records]
    if not losses:
        return False
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="per step")
    window = max(1, len(losses) // 20)  # a step's batch is small: show the trend beside the noise
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"mean of {window} steps")
        ax.legend()
    for x in starts:
        ax.axvline(x, color="grey", ls=":", lw=1)
    return True


def plot_loss(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if not draw_loss_curve(ax, log_path):
        plt.close(fig)
        return
    ax.set_xlabel("step")
    ax.set_ylabel("loss on continuation (nats/token)")
    ax.set_title("step 2 training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def run_train(data: Sequence[str | Path], output_dir: str | Path, options: TrainOptions,
              resume: bool = False, skip_bad: bool = False, model: BlspModel | None = None) -> dict:
    """`blsp train`: load the backbones, build a fresh adapter (or resume one), train, save."""
    from .cpu import flush_denormals

    flush_denormals()  # a no-op after `blsp`'s own call; for callers of this function
    from .shards import is_shard_corpus

    info = init_distributed()
    streamed = is_shard_corpus(data)
    if streamed:
        from .streaming import StreamingTrainer, check_streaming_options

        check_streaming_options(options)  # before minutes go into loading the models
    else:
        utterances, skipped = read_behavior_data(data, skip_bad=skip_bad)
        check_behavior_data(utterances, options)  # before minutes go into loading the models
    if model is None:
        try:
            model = init_model(options) if options.init_from else BlspModel.from_components(
                options.encoder, options.llm, adapter_type=options.adapter, adapter_downsample=options.adapter_downsample,
                system_prompt=options.system_prompt, seed=options.seed, speech_states=options.speech_states,
                speech_vectors=initial_speech_vectors(options.speech_states, options.speech_vectors),
                speech_language=options.speech_language)
        except SpeechStatesError as err:  # e.g. an encoder saved without Whisper's tokenizer
            raise SpeechStatesError(str(err) + options.recipe_note("speech_states")) from None
    place_model(model, options, info)
    if streamed:
        trainer = StreamingTrainer(model, data[0], options, output_dir, info, skip_bad=skip_bad)
        skipped = []
    else:
        trainer = Trainer(model, utterances, options, output_dir, info, skip_bad=skip_bad)
    result = trainer.train(resume=resume)
    result["skipped_bad"] = [str(e) for e in skipped + trainer.skipped]
    return result


def runs_in_bf16(options: TrainOptions, device: torch.device) -> bool:
    """Whether step 2 runs under bf16 autocast (--precision; auto: on a GPU)."""
    return options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda")


def stores_llm_in_bf16(options: TrainOptions, device: torch.device) -> bool:
    """Whether the frozen LLM's weights are kept in bf16 (--llm-dtype; auto: when the step runs in bf16)."""
    return options.llm_dtype == "bf16" or (options.llm_dtype == "auto" and runs_in_bf16(options, device))


def store_frozen_llm(model: BlspModel, dtype: torch.dtype) -> None:
    """Keep the frozen LLM's weights in `dtype` (what it trains with stays float32: LoRA).

    Why: under bf16 autocast every matrix product casts its fp32 weight to bf16 on every forward
    (autocast caches casts only of weights that train), so a frozen fp32 LLM costs a cast of all
    its weights per step and twice the memory of a bf16 one. A sharded LLM (--fsdp) keeps its
    dtype: its parameters are flattened into shards. Buffers (rotary frequencies) stay as they are.
    """
    if is_sharded(model):
        return
    for param in model.language_model.parameters():
        if not param.requires_grad and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)


def place_model(model: BlspModel, options: TrainOptions, info: DistInfo) -> None:
    """The model on this rank's device: whole, or with `--fsdp` its LLM sharded across ranks."""
    device = default_device(info)
    if options.fsdp:
        shard_model(model, device)
    else:
        model.to(device)
