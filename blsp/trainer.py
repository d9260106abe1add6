"""The step-2 trainer: the optimisation loop over behaviour items, checkpoints, resume, the frozen check.

Only what trains learns (the adapter, and LoRA, the CTC head or top encoder layers where asked); the
encoder and LLM are frozen, checked after training: their weights' digests are unchanged and no
gradient ever reached them.

Reproducibility: the data order is a seeded permutation per epoch (blsp.sampling), and a step's
samples follow from the step number alone, so `--resume` from a checkpoint (adapter, optimizer,
scheduler, RNG) ends exactly where an uninterrupted run would. Each step's loss is normalised by
the number of target tokens in the whole global batch (all ranks, all accumulation micro-batches),
so one process and N processes with the same global batch compute the same update.
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
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_scheduler

from .behavior import BehaviorItem, build_items, check_behavior_data
from .data import Utterance, read_manifest
from .distributed import DistInfo, all_reduce_sum, barrier
from .errors import BlspError, CheckpointError, InputError
from .features import FeatureCache
from .io import append_jsonl, atomic_write_json, repair_jsonl_tail, replace_dir
from .fsdp import digest_across_ranks, is_sharded
from .llm import shared_prefix
from .losses import ForwardKLLoss, TopKKLLoss, correction_penalty
from .lora import lora_parameters
from .modeling import ADAPTER_WEIGHTS, BlspModel
from .options import TrainOptions, check_resumable, lora_settings
from .packaged import CACHE_DIR
from .processing import Example
from .sampling import global_batch_indices, micro_batches
from .vocabulary import ctc_vocabulary
from .voice import voice_attributes
from .voice_channel import fit_voice_heads, voice_rows
from .voice_gate import labelled_requests, prompt_prefix
from .warmstart import WarmStartRun, ctc_targets, ctc_warm_start, transcript_tokens

STATE_FILE = "trainer_state.pt"
VOICE_HEADS_LOG = "voice_heads.json"  # the voice channel's classifiers' fit (blsp.voice_channel)
VOICE_GATE_LOG = "voice_gate.json"  # the voice gate's fit (blsp.voice_gate)
LOG_FILE = "train_log.jsonl"


def _clip(utt: Utterance) -> tuple:
    """What makes two utterances the same clip: the same samples of the same file."""
    ref = utt.audio
    return os.path.realpath(ref.path), ref.start, ref.num_samples


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
    """Step 2's loop over behaviour items held in memory (JSONL lines), their features in the cache.

    Where the items come from is `load_data`'s, and how each step draws them `train_step`'s: a
    subclass changes those two (blsp.streaming.StreamingTrainer reads tar shards as a stream), and
    everything else (the model's preparation, optimisation, checkpoints, resume, the frozen check,
    the summary) is this class's, set up here for both.
    """

    def __init__(self, model: BlspModel, data, options: TrainOptions, output_dir: str | Path,
                 info: DistInfo | None = None, skip_bad: bool = False):
        # ru_maxrss is the process's lifetime peak: when other work ran in this process first (the
        # demo runs every stage in one), the summary's peak may be that work's, not training's.
        self.peak_rss_before_mb = peak_rss_mb()
        self.model, self.options = model, options
        self.output_dir = Path(output_dir)
        self.info = info or DistInfo()
        self.skip_bad = skip_bad
        self.device = next(model.adapter.parameters()).device
        unfreeze_encoder(model, options)
        self.global_batch = options.optim.batch_size * options.optim.grad_accum * self.info.world_size
        self.skipped: list[InputError] = []
        # What filling the feature cache cost this run (0 where it was filled before): with decoder
        # states it is a Whisper decoding per clip, a cost the step-2 clock alone would hide.
        self.feature_timing = {"features_s": 0.0, "clips_encoded": 0}
        self.items: list[BehaviorItem] = []
        self.warm_start_extra: list[Utterance] = []  # clips only the warm start hears
        self.ctc_targets: list[list[int]] | None = None  # per item, where a CTC head trains beside step 2
        self.load_data(data)  # sets n_examples and total_steps
        model.set_llm_checkpointing(options.run.gradient_checkpointing)
        self.setup_optimization()

    def load_data(self, utterances: list[Utterance]) -> None:
        """Behaviour lines: every clip encoded once into the feature cache, the items built, the CTC
        head's vocabulary and targets where speech is CTC-compressed, the lengths to bucket by."""
        model, options = self.model, self.options
        check_behavior_data(utterances, options)  # before every clip is encoded
        memory_mb = options.run.feature_memory_mb
        if memory_mb is None:
            memory_mb = 1024 if self.device.type == "cuda" else 0
        self.cache = FeatureCache(options.run.feature_cache or CACHE_DIR / "features", model.config.feature_key,
                                  memory_mb=memory_mb)
        self.skipped += self.prepare_features(utterances, self.skip_bad)
        self.items = build_items(model.processor, [u for u in utterances if self.cache.has(u.audio)], options,
                                 model.config.llm_fingerprint)
        if not self.items:
            raise BlspError("no utterance with readable audio to train on")
        self.transcript_tokens = [transcript_tokens(model.processor.tokenizer, it.utterance) for it in self.items]
        self.warm_start_extra = self.read_warm_start_data(self.skip_bad)
        if options.objective.compress_speech == "ctc" and model.ctc_head is None:
            extra = [transcript_tokens(model.processor.tokenizer, u) for u in self.warm_start_extra]
            model.enable_ctc_compression(ctc_vocabulary(self.transcript_tokens + extra, model.processor.tokenizer,
                                                        options.objective.ctc_min_count), options.model.speech_vectors)
        self.ctc_targets = (ctc_targets(model.ctc_head, model.processor.tokenizer, self.transcript_tokens)
                            if model.ctc_head is not None else None)
        self.n_examples = len(self.items)
        self.lengths, self.frames = self.bucketing_lengths() if options.run.bucket_by_length else (None, None)
        optim = options.optim
        self.total_steps = optim.max_steps or max(1, math.ceil(optim.epochs * len(self.items) / self.global_batch))

    def setup_optimization(self) -> None:
        """Loss, optimizer, schedule and precision (needs `total_steps`)."""
        model, options = self.model, self.options
        if options.lora.rank and model.lora_gate is None:
            model.enable_lora(lora_settings(options))
        self.kl = ForwardKLLoss(options.objective.kl_temperature) if "kl" in options.objective.loss else None
        self.topk_kl = TopKKLLoss(options.objective.kl_temperature)
        self._embedding_scale: torch.Tensor | None = None  # embedding_scale()
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(parameter_groups(model, options), lr=options.optim.lr,
                                           weight_decay=options.optim.weight_decay)
        self.scheduler = get_scheduler(options.optim.lr_schedule, self.optimizer, options.optim.warmup_steps,
                                       self.total_steps)
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
        for path in self.options.warm_start.data:
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
        features = self.cache.load(item.utterance.audio, dtype=None)
        return Example(pieces=item.prompt, features=[features], target=item.target)

    def micro_batch_loss(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss to backpropagate, summed parts by name, detached) over the items' target tokens."""
        items = [self.items[i] for i in indices]
        batch, prefix = self.on_device(self.model.processor.collate([self.example(it) for it in items]))
        with self.autocast:
            out = self.model(**batch, return_target_logits=self.kl is not None, shared_prefix=prefix)
        with_ce = "ce" in self.options.objective.loss.split("+")
        loss = out.loss_sum if with_ce else out.loss_sum * 0
        # Parts stay on the device until the step ends: reading one here would make the CPU wait
        # for the GPU's forward before it may queue the backward.
        parts = {"loss": out.loss_sum.detach()}
        if self.kl is not None:
            rows = out.target_logits.split([len(it.target) for it in items])
            exact = [i for i, it in enumerate(items) if it.exact]
            if exact and not with_ce:  # a transcript is learnt as its words (BehaviorItem.exact)
                targets = torch.tensor([t for i in exact for t in items[i].target], device=self.device)
                loss = loss + torch.nn.functional.cross_entropy(torch.cat([rows[i] for i in exact]).float(), targets,
                                                                reduction="sum")
            taught = [i for i, it in enumerate(items) if not it.exact]
            # called even with no item to distil: under a sharded LLM this rank must still join the
            # teacher's forward when another rank runs it (runs_teacher)
            kl = self.distillation([items[i] for i in taught],
                                   torch.cat([rows[i] for i in taught]) if taught else out.target_logits[:0])
            loss = loss + self.options.objective.kl_weight * kl
            parts["kl"] = kl.detach()
        weight = self.options.objective.correction_weight
        if weight > 0:
            penalty = correction_penalty(*out.adapted, [len(it.target) for it in items], self.embedding_scale())
            loss = loss + weight * penalty
            parts["correction"] = penalty.detach()
        head = self.model.ctc_head
        if head is not None and self.options.objective.ctc_weight > 0:
            # Keeps the head that decides what the LLM sees in step with the adapter it reads.
            targets = [self.ctc_targets[i] for i in indices]
            ctc = head.loss(*out.speech, targets) * sum(map(len, targets))
            loss = loss + self.options.objective.ctc_weight * ctc
            parts["ctc"] = ctc.detach()
        return loss, parts

    def embedding_scale(self) -> torch.Tensor:
        """The LLM's mean squared input-embedding norm (what a correction is measured against), once."""
        if self._embedding_scale is None:
            weight = self.model.language_model.get_input_embeddings().weight
            self._embedding_scale = weight.detach().float().pow(2).sum(-1).mean().to(self.device)
        return self._embedding_scale

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
        rows = student_logits.split([len(it.target) for it in items]) if items else ()
        saved = [i for i, it in enumerate(items) if it.teacher_topk is not None]
        live = [i for i, it in enumerate(items) if it.teacher_topk is None]
        total = student_logits.new_zeros((), dtype=torch.float32)
        if saved:
            ids = torch.cat([items[i].teacher_topk[0] for i in saved]).to(self.device)
            logprobs = torch.cat([items[i].teacher_topk[1] for i in saved]).to(self.device)
            total = total + self.topk_kl(torch.cat([rows[i] for i in saved]), ids, logprobs)
        if self.runs_teacher(bool(live)):
            # A rank with no unsaved item still runs the forward when another rank does (a
            # sharded LLM's forward is collective); it reads its first item (or the run's, when
            # every item of its micro-batch is an exact one) and ignores it.
            teacher_logits = self.teacher_logits([items[i] for i in live] or items[:1] or self.items[:1])
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
        indices = global_batch_indices(step, len(self.items), self.global_batch, self.options.optim.seed, self.lengths,
                                       self.frames)
        # Normaliser: target tokens of the whole global batch, known to every rank without talking.
        n_tokens = sum(len(self.items[i].target) for i in indices)
        scale = self.info.world_size / n_tokens  # the gradient all-reduce below divides by world
        self.model.adapter.train()
        sums: dict[str, torch.Tensor] = {}
        for mb in micro_batches(indices, self.options.optim.batch_size, self.info):
            loss, parts = self.micro_batch_loss(mb)
            (loss * scale).backward()
            for name, value in parts.items():
                sums[name] = sums[name] + value if name in sums else value
        self.all_reduce_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.options.optim.max_grad_norm)
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
        torch.manual_seed(self.options.optim.seed)
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
        if self.step == 0 and fits_voice_heads(self.model):
            self.fit_voice_heads()
        if self.step == 0 and fits_voice_gate(self.model):
            self.fit_voice_gate()
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
            if self.step % self.options.run.save_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.timings["train_s"] = round(time.perf_counter() - start, 1)
        self.check_frozen(frozen_before)
        if self.info.is_main:
            self.model.save_pretrained(self.output_dir)
            summary = {"steps": self.step, "global_batch": self.global_batch, "examples": self.n_examples,
                       "warm_start_clips": len(self.warm_start_utterances()) if runs_warm_start(self.options) else 0,
                       "options": self.options.flat(), "world_size": self.info.world_size,
                       "peak_rss_mb": peak_rss_mb(), "peak_rss_before_training_mb": self.peak_rss_before_mb,
                       **self.feature_timing, **self.timings}
            atomic_write_json(self.output_dir / "train_summary.json", summary)
            plot_loss(log_path, self.output_dir / "train_loss.png")
        barrier()
        return {"steps": self.step, "output_dir": str(self.output_dir)}

    def fit_voice_heads(self) -> None:
        """The voice channel's attribute classifiers, fitted on every training clip's statistics
        and the labels its line states (blsp.voice_channel.fit_voice_heads); the fit's log beside
        the run's. Every rank fits the same heads on the same clips."""
        channel = self.model.voice_channel
        clips = list({it.utterance.audio: it.utterance for it in self.items}.values())
        n = voice_rows(self.model.config)
        rows = torch.stack([self.cache.load(u.audio)[:n] for u in clips]).to(channel.feature_mean.device)
        labels = {a: [voice_attributes(u.extra).get(a) for u in clips] for a in channel.attributes}
        log = fit_voice_heads(channel, rows, labels)
        if self.info.is_main:
            atomic_write_json(self.output_dir / VOICE_HEADS_LOG, log)
            print("step 2: voice heads fitted (training accuracy): "
                  + ", ".join(f"{a} {v['train_accuracy']:.0%}" for a, v in log.items()), file=sys.stderr)

    def voice_gate_requests(self) -> dict[tuple[int, ...], bool]:
        """The voice gate's labelled requests, as the prefixes the LLM reads before the speech: each
        training item's (a question about the voice or not), then blsp.voice_gate.labelled_requests
        (a run may train on none of some)."""
        proc = self.model.processor
        requests: dict[tuple[int, ...], bool] = {}
        shared = labelled_requests(self.options.model.instruction)
        for pieces, about_voice in ([(it.prompt, it.about_voice) for it in self.items]
                                    + [(proc.speech_prompt(text), about_voice) for text, about_voice in shared]):
            requests.setdefault(prompt_prefix(pieces), about_voice)
        return requests

    def fit_voice_gate(self) -> None:
        """The voice gate, fitted on `voice_gate_requests` (BlspModel.fit_voice_gate); the fit's log
        beside the run's. Every rank fits the same gate on the same requests, and none then meets a
        training request it has not judged (which, with the LLM sharded, would stall the others)."""
        log = self.model.fit_voice_gate(self.voice_gate_requests())
        if self.info.is_main:
            atomic_write_json(self.output_dir / VOICE_GATE_LOG, log)
            print(f"step 2: voice gate fitted on {log['requests']} requests ({log['about_voice']} about the voice), "
                  f"training accuracy {log['train_accuracy']:.0%}", file=sys.stderr)

    def warm_start_utterances(self) -> list[Utterance]:
        """What the warm start hears: every training item's clip, then --warm-start-data's others."""
        return [it.utterance for it in self.items] + self.warm_start_extra

    def warm_start(self) -> None:
        """The CTC warm start on cached features (see blsp.warmstart); its log beside the run's."""
        o, w = self.options, self.options.warm_start
        bucket = o.run.bucket_by_length if w.bucket_by_length is None else w.bucket_by_length
        options = WarmStartRun(method=w.method, steps=w.steps, lr=w.lr, batch_size=w.batch_size, seed=o.optim.seed,
                               embed_weight=w.embed_weight, bucket_by_length=bucket, time_masks=w.time_masks,
                               feature_masks=w.feature_masks, vocab_min_count=o.objective.ctc_min_count,
                               encoder_lr=o.encoder_training.lr)
        log = ctc_warm_start(self.model, self.warm_start_utterances(), self.cache, options,
                             show_progress=self.info.is_main)
        if self.info.is_main:
            atomic_write_json(self.output_dir / "warm_start_log.json", log)

    # -- frozen parts --------------------------------------------------------------------------
    def trained_names(self, part: torch.nn.Module) -> frozenset[str]:
        """The names of a backbone's parameters that train (LoRA's, the encoder's top layers)."""
        trained = {id(p) for p in self.model.trainable_parameters()}
        return frozenset(n for n, p in part.named_parameters() if id(p) in trained)

    def frozen_digests(self) -> dict[str, str]:
        parts = self.model.frozen_parts()
        if is_sharded(self.model):  # nothing of a sharded LLM trains (LoRA is refused with --fsdp)
            return {name: digest_across_ranks(part) for name, part in parts.items()}
        return {name: module_digest(part, self.trained_names(part)) for name, part in parts.items()}

    def check_frozen(self, before: dict[str, str]) -> None:
        parts = self.model.frozen_parts()
        for name, digest in self.frozen_digests().items():
            part = parts[name]
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
            "options": self.options.flat(),
            "world_size": self.info.world_size,
        }, tmp / STATE_FILE)
        replace_dir(tmp, final)
        for old in checkpoint_dirs(self.output_dir)[: -self.options.run.keep_checkpoints]:
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


def fits_voice_heads(model: BlspModel) -> bool:
    """Whether the model's voice channel names attributes whose classifiers are not fitted yet
    (a model trained on from --init-from keeps its own)."""
    channel = model.voice_channel
    return channel is not None and bool(channel.attributes) and not bool(channel.fitted)


def fits_voice_gate(model: BlspModel) -> bool:
    """Whether the model's voice channel has a gate not fitted yet (--init-from keeps its own)."""
    channel = model.voice_channel
    return channel is not None and channel.gate is not None and not bool(channel.gate.fitted)


def runs_warm_start(options: TrainOptions) -> bool:
    return options.warm_start.method != "none" and not options.objective.init_from


def unfreeze_encoder(model: BlspModel, options: TrainOptions) -> None:
    """--unfreeze-encoder-layers N, before any feature is cached (they are cached below those layers)."""
    if options.encoder_training.layers == model.config.encoder_trainable_layers:
        return
    if model.config.encoder_trainable_layers:
        raise CheckpointError(f"the model trains {model.config.encoder_trainable_layers} encoder layer(s); "
                              f"--unfreeze-encoder-layers {options.encoder_training.layers} asks otherwise")
    model.unfreeze_encoder_layers(options.encoder_training.layers)


def parameter_groups(model: BlspModel, options: TrainOptions) -> list[dict]:
    """The optimizer's groups: LoRA and the unfrozen encoder layers may learn at their own rates
    (the schedule scales every group alike)."""
    own = []
    if options.lora.lr is not None:
        own.append((lora_parameters(model.language_model), options.lora.lr))
    if options.encoder_training.lr is not None:
        own.append((model.trainable_encoder_parameters(), options.encoder_training.lr))
    own = [(params, lr) for params, lr in own if params]
    taken = {id(p) for params, _ in own for p in params}
    rest = [p for p in model.trainable_parameters() if id(p) not in taken]
    return [{"params": rest}] + [{"params": params, "lr": lr} for params, lr in own]


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


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


def runs_in_bf16(options: TrainOptions, device: torch.device) -> bool:
    """Whether step 2 runs under bf16 autocast (--precision; auto: on a GPU)."""
    return options.optim.precision == "bf16" or (options.optim.precision == "auto" and device.type == "cuda")


def stores_llm_in_bf16(options: TrainOptions, device: torch.device) -> bool:
    """Whether the frozen LLM's weights are kept in bf16 (--llm-dtype; auto: when the step runs in bf16)."""
    return options.optim.llm_dtype == "bf16" or (options.optim.llm_dtype == "auto" and runs_in_bf16(options, device))


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
