"""Step 2 on a shard corpus (`blsp train --data DIR`): each rank streams only its own shards.

Nothing but the current step's items is held in memory: a shard is read item by item (headers
and JSON; clips or features by offset when their step comes), through a bounded shuffle buffer.

The order (a pure function of the seed, the epoch, the rank and the world size):
  1. epoch e's shard order is a seeded permutation of the shards (seed, e);
  2. rank r reads shards order[r], order[r + world], ... one after the other;
  3. its items pass a shuffle buffer of `--shuffle-buffer` items seeded by (seed, e, r);
  4. each optimizer step every rank takes the next `batch_size * grad_accum` items of its stream.
An epoch lasts as many steps as the rank with the most items needs; a rank whose stream has run
out runs its remaining micro-batches on a stand-in item with weight zero, so every rank runs the
same forwards (FSDP needs that) and every utterance is used exactly once per epoch. Epochs
follow one another until `--max-steps` or `--epochs` steps; a step never spans two epochs.

Guarantees: every utterance exactly once per epoch across ranks; two runs with the same
settings and world size give the same adapter; `--resume` rebuilds the stream of the step it
resumes at by skipping the items earlier steps consumed (headers only), so it ends where an
uninterrupted run would. Not guaranteed: equality between world sizes (the ranks' streams, so
the batches, depend on the world size; with JSONL `--data` they do not). Steps are normalised
by the target tokens of the whole global batch (one all-reduce of a count per step).

Not supported on shards: the CTC/embed warm start and CTC compression (they make passes over
every clip's features before step 2; use JSONL manifests and the feature cache for those).
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Iterator

import torch

from .data import Utterance, is_copy_continuation
from .distributed import all_reduce_sum
from .errors import BlspError, InputError
from .features import encode_waveforms
from .io import append_jsonl
from .processing import Example
from .shards import ShardIndex, ShardItem, iter_shard
from .options import TrainOptions, choose_task, mix_shares
from .behavior import VOICE_MIX, BehaviorItem, behavior_item, draw_voice_task, speech_prompts
from .sampling import sample_order
from .trainer import Trainer, step_record, truncate_log

ORDER_DIR = "data_order"  # per rank, per step: the ids it trained on (an audit of the order)


# ----------------------------------------------------------------------------------------------
# The order
# ----------------------------------------------------------------------------------------------
def rank_shards(n_shards: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """Shard i of epoch e's seeded permutation goes to rank i % world."""
    return sample_order(n_shards, epoch, seed)[rank::world]


def shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: hold `buffer` items, emit a random one as each new one arrives."""
    held: list = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        k = rng.randrange(buffer)
        yield held[k]
        held[k] = item
    rng.shuffle(held)
    yield from held


def rank_stream(index: ShardIndex, epoch: int, seed: int, rank: int, world: int, buffer: int) -> Iterator[ShardItem]:
    def chained() -> Iterator[ShardItem]:
        for i in rank_shards(len(index.shards), epoch, seed, rank, world):
            yield from iter_shard(index.path(i))

    return shuffled(chained(), max(1, buffer), random.Random(f"{seed}/{epoch}/{rank}"))


def rank_count(index: ShardIndex, epoch: int, seed: int, rank: int, world: int) -> int:
    return sum(index.shards[i].count for i in rank_shards(len(index.shards), epoch, seed, rank, world))


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class StreamingTrainer(Trainer):
    """`Trainer` with its data from a shard stream instead of an in-memory list (`load_data`,
    `train_step`); `self.items` holds only the current micro-batch (what `micro_batch_loss` indexes).
    `blsp data shard` encoded the features, so `feature_timing` stays 0 here."""

    def load_data(self, root: str | Path) -> None:
        """The shard index; nothing is read of the items until their step comes."""
        check_streaming_options(self.options)
        self.index = ShardIndex.load(root)
        self.check_index()
        self.features: dict = {}  # the current step's, by audio reference
        self.per_rank = self.options.optim.batch_size * self.options.optim.grad_accum
        self.n_examples = self.index.n_utterances
        self.total_steps = self.options.optim.max_steps or self.steps_for_epochs(self.options.optim.epochs)
        self.stream: Iterator[ShardItem] | None = None
        self.stream_at: tuple[int, int] | None = None  # (epoch, step in epoch) the stream is at
        self.stand_in: ShardItem | None = None
        self.prompts = speech_prompts(self.model.processor, self.options)
        self.shares = mix_shares(self.options)
        # The stream's order is the shard shuffle and the shuffle buffer's (--bucket-by-length
        # needs every length up front, so it applies to manifests only).

    def check_index(self) -> None:
        if len(self.index.shards) < self.info.world_size:
            raise BlspError(f"{self.index.root}: {len(self.index.shards)} shard(s) for {self.info.world_size} ranks; "
                            "each rank needs at least one (re-shard with a smaller --shard-size)")
        fp = self.index.encoder_fingerprint
        if fp is not None and self.model.config.encoder_trainable_layers:
            raise BlspError(f"{self.index.root}: these shards hold the whole encoder's features, but "
                            "--unfreeze-encoder-layers trains its top layers: write the shards without features")
        if fp is not None and self.model.config.speech_states == "decoder":
            raise BlspError(f"{self.index.root}: these shards hold the encoder's features, but --speech-states decoder "
                            "reads Whisper's decoder states: write the shards without features"
                            + self.options.preset_note("speech_states"))
        if fp is not None and fp != self.model.config.encoder_fingerprint:
            raise BlspError(f"{self.index.root}: the shards hold features of encoder {fp}, but --encoder "
                            f"{self.options.model.encoder} is {self.model.config.encoder_fingerprint}")

    # -- the schedule --------------------------------------------------------------------------
    @lru_cache(maxsize=None)
    def epoch_steps(self, epoch: int) -> int:
        """Steps of an epoch: enough for the rank with the most items (all ranks know the counts)."""
        most = max(rank_count(self.index, epoch, self.options.optim.seed, r, self.info.world_size)
                   for r in range(self.info.world_size))
        return math.ceil(most / self.per_rank)

    def steps_for_epochs(self, epochs: float) -> int:
        whole, part = int(epochs), epochs - int(epochs)
        return max(1, sum(self.epoch_steps(e) for e in range(whole)) + math.ceil(part * self.epoch_steps(whole)))

    def locate(self, step: int) -> tuple[int, int]:
        epoch = 0
        while step >= self.epoch_steps(epoch):
            step -= self.epoch_steps(epoch)
            epoch += 1
        return epoch, step

    def step_items(self, step: int) -> list[ShardItem]:
        """This rank's raw items of a step: the next `per_rank` of its epoch stream (fewer at its end)."""
        epoch, k = self.locate(step)
        if self.stream_at != (epoch, k):  # a new epoch, or a resumed run: rebuild and skip
            o, info = self.options, self.info
            self.stream = rank_stream(self.index, epoch, o.optim.seed, info.rank, info.world_size, o.run.shuffle_buffer)
            for _ in islice(self.stream, k * self.per_rank):
                pass
        self.stream_at = (epoch, k + 1)
        return list(islice(self.stream, self.per_rank))

    # -- items ---------------------------------------------------------------------------------
    def behavior_item(self, utt: Utterance) -> BehaviorItem | None:
        """As `build_items`, per utterance: the transcribe share is seeded by the utterance's id."""
        cont = utt.extra.get("continuation")
        if not isinstance(cont, str):
            raise InputError("no `continuation` (is this step 1's output? run `blsp continue` first)", utt.source,
                             utt.line)
        if not cont.strip() or (self.options.objective.drop_copies and is_copy_continuation(utt)):
            return None
        rng = random.Random(f"{self.options.optim.seed}/{utt.id}")
        task = choose_task(rng.random(), self.shares)
        if task == VOICE_MIX:  # a stream has no class counts to weigh its questions by: drawn uniformly
            task = draw_voice_task(rng, utt)
        return behavior_item(self.model.processor, utt, self.options, task, self.prompts,
                             self.model.config.llm_fingerprint)

    def load_step(self, raw: list[ShardItem]) -> list[BehaviorItem]:
        """The step's training items with their features (read, or encoded from the audio now)."""
        items, waves = [], []
        for x in raw:
            try:
                item = self.behavior_item(x.utterance)
                if item is None:
                    continue
                if x.has_features:
                    self.features[x.utterance.audio] = x.features()
                else:
                    waves.append((x.utterance.audio, x.waveform()))
            except InputError as err:
                if not self.skip_bad:
                    raise
                self.skipped.append(err)
                continue
            items.append(item)
        if waves:
            with torch.no_grad():
                for (ref, _), f in zip(waves, encode_waveforms(self.model, [w for _, w in waves])):
                    self.features[ref] = f
        return items

    def example(self, item: BehaviorItem) -> Example:
        return Example(pieces=item.prompt, features=[self.features[item.utterance.audio]], target=item.target)

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        if self.stream_at is None:  # this run's first step (0, or the one resumed at)
            self.order_log.parent.mkdir(parents=True, exist_ok=True)
            truncate_log(self.order_log, step)
        self.features.clear()
        items = self.load_step(self.step_items(step))
        n_tokens = int(all_reduce_sum(torch.tensor([sum(len(it.target) for it in items)])))
        n_samples = int(all_reduce_sum(torch.tensor([len(items)])))
        self.model.adapter.train()
        sums: dict[str, torch.Tensor] = {}
        scale = self.info.world_size / max(1, n_tokens)
        for m in range(self.options.optim.grad_accum):
            chunk = items[m * self.options.optim.batch_size : (m + 1) * self.options.optim.batch_size]
            weight = 1.0 if chunk else 0.0  # a rank out of items still runs its forwards (FSDP)
            self.items = chunk or [self.stand_in_item()]
            loss, parts = self.micro_batch_loss(list(range(len(self.items))))
            (loss * (scale * weight)).backward()
            for name, value in parts.items():
                sums[name] = sums[name] + value * weight if name in sums else value * weight
        self.all_reduce_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.options.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if n_tokens:  # every rank agrees (the count is all-reduced): no target at all, no update
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        append_jsonl(self.order_log, [{"step": step + 1, "ids": [it.utterance.id for it in items]}])
        return {**step_record(sums, grad_norm, n_tokens), "lr": lr, "tokens": n_tokens, "samples": n_samples}

    def stand_in_item(self) -> BehaviorItem:
        """A weight-zero item for a micro-batch this rank has no items for: the first usable one
        of its epoch-0 stream (fixed, so runs and resumed runs use the same)."""
        if self.stand_in is None:
            o, info = self.options, self.info
            for raw in rank_stream(self.index, 0, o.optim.seed, info.rank, info.world_size, o.run.shuffle_buffer):
                if self.load_step([raw]):
                    self.stand_in = raw
                    break
            else:
                raise BlspError(f"rank {self.info.rank}: no usable utterance in its shards")
        return self.load_step([self.stand_in])[0]

    @property
    def order_log(self) -> Path:
        return self.output_dir / ORDER_DIR / f"rank-{self.info.rank}.jsonl"


def check_streaming_options(options: TrainOptions) -> None:
    if options.warm_start.method != "none" or options.objective.compress_speech != "none":
        raise BlspError("--warm-start and --compress-speech need every clip's features before step 2; with "
                        "--data DIR of shards use neither (or train on JSONL manifests)"
                        + options.preset_note("warm_start", "compress_speech"))
    if options.model.voice_attributes:
        raise BlspError("--voice-attributes fits its classifiers on every clip's voice statistics before step 2; with "
                        "--data DIR of shards train on JSONL manifests, or use --voice-vectors alone")
    if options.run.shuffle_buffer < 1:
        raise BlspError("--shuffle-buffer must be at least 1")
