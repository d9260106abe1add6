"""Step 2's options: one dataclass, the `blsp train` flags derived from it, and presets as YAML.

Every `TrainOptions` field is a flag of the same name (`max_steps` -> `--max-steps`) whose default,
help, choices and group come from the field itself (`option(...)`), so a default is written once.
A preset (blsp/presets/NAME.yaml, or a user's YAML file) gives some options other values; a flag
typed on the command line wins over it. `decoder` is the default; `paper` sets nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import Field, InitVar, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import SPEECH_VECTORS, check_bridge_confidence, reads_tokens, tokens_unreadable
from .errors import BlspError, CheckpointError
from .lora import PLACES, LoraSettings, parse_modules
from .prompts import CONTINUATION_INSTRUCTION
from .readers.bridge import check_bridge_adapter
from .speech_sources import SPEECH_SOURCES
from .voice_channel import VOICE_PLACES

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "decoder"  # `blsp train` without --preset
LOSSES = ("ce", "kl", "ce+kl")
LLM_DTYPES = ("auto", "fp32", "bf16")
COMPRESSIONS = ("none", "ctc")
WARM_STARTS = ("none", "ctc", "embed")  # blsp.warmstart.METHODS


def option(default: Any, help: str = "", *, choices: Sequence[str] | None = None, metavar: str | None = None,
           flag: str | None = None) -> Any:
    """A field of an options section and what its flag says about it. The flag's name is the
    section's FLAG_PREFIX and the field's name (`LoraOptions.rank` -> `--lora-rank`) unless `flag`."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar, "flag": flag})


@dataclass(frozen=True)
class ModelOptions:
    """What is trained between which backbones, and what the adapter reads."""

    encoder: str = option("whisper-base", "the Whisper checkpoint (packaged name, directory or hub id)")
    llm: str = option("smollm2-135m-instruct", "the causal LM (packaged name, directory or hub id)")
    adapter: str = option("conv", "conv: the paper's three strided convolutions; stack: frame stacking + MLP "
                          "(Ultravox)", choices=("conv", "stack"))
    adapter_downsample: int = option(8, "speech states per speech vector: 8 is the paper's 6.25 Hz over the "
                                     "encoder's 50 Hz; conv needs a power of 2", metavar="N")
    speech_states: str = option(
        "encoder", "what the adapter reads: encoder, the Whisper encoder's frames (the paper); decoder, the hidden "
        "states of Whisper's decoder along its greedy transcript, one per token (the words as Whisper heard them; "
        "Whisper's decoding runs for every clip)", choices=tuple(SPEECH_SOURCES))
    speech_language: str = option(
        "en", "with --speech-states decoder: the language Whisper transcribes (en, fr, ...), or auto: Whisper's "
        "guess for each clip (multilingual Whispers)", metavar="CODE")
    speech_vectors: str = option(
        "adapter", "with --compress-speech ctc: adapter: the LLM reads the adapter's vector of each token run; "
        "tokens: the mix of the LLM's own token embeddings the CTC head hears there. With --speech-states decoder: "
        "adapter: the adapter's vector of each decoder state; tokens: the LLM embeddings of Whisper's likeliest "
        "tokens there, plus the adapter's vector as a correction", choices=SPEECH_VECTORS)
    bridge_confidence: float | None = option(
        None, "with --speech-vectors tokens on decoder states: read each token Whisper's posterior gives at least P "
        "as the LLM's own embedding of it, uncorrected (what the cascade would feed the LLM there); the adapter "
        "corrects the rest. Default: the posterior mix everywhere", metavar="P")
    bridge_transcript: bool = option(
        False, "with --speech-vectors tokens on decoder states: read Whisper's greedy transcript as the LLM's "
        "tokenizer splits it (what the cascade feeds the LLM), each token plus the adapter's correction of the "
        "state that holds it; default: one vector per Whisper token")
    voice_vectors: int = option(
        0, "a voice channel: N vectors of how the voice sounds (statistics of the Whisper encoder's middle layers "
        "through a small MLP), read by the LLM before the words; 0: the words alone (blsp/voice_channel.py)",
        metavar="N")
    voice_attributes: str = option(
        "", "voice attributes the channel names, comma-separated (gender,rate,pitch,whispered,noisy), or all: one "
        "vector each, the LLM's embedding of the class word a classifier on the same statistics hears (fitted on the "
        "lines' labels before training), that trains from there; beside the --voice-vectors free ones",
        metavar="NAMES")
    voice_place: str = option(
        "before", "where the LLM reads the voice channel's vectors: before each clip's words, or after them (every "
        "word then reads as in the words-only model, and the voice vectors read the instruction and the words)",
        choices=VOICE_PLACES)
    voice_gate: bool = option(
        False, "read the voice channel's vectors only where the request asks about the voice (a classifier of the "
        "request on the frozen LLM's state, fitted before training); elsewhere the LLM reads the words alone, as the "
        "words-only model (blsp/voice_gate.py)")
    instruction: str = option(CONTINUATION_INSTRUCTION, "the instruction the continuations were written under")
    system_prompt: str | None = option(None, "default: the chat template's own")


@dataclass(frozen=True)
class ObjectiveOptions:
    """What the adapter learns from."""

    loss: str = option("ce", "ce: cross-entropy on the continuation (the paper); kl: KL(LLM on transcript || LLM "
                       "on speech) over the continuation (BLSP-KD); ce+kl: both", choices=LOSSES)
    kl_temperature: float = option(1.0)
    kl_weight: float = option(1.0)
    # Adam moves every weight by about the learning rate a step, even where the KL barely asks for a
    # change: the correction then grows on words the bridge already reads right, and on speech unlike
    # the training clips (real voices) it moves answers the cascade would have kept.
    correction_weight: float = option(
        0.0, "with the token bridge: weight of a penalty on the adapter's correction (its mean squared norm over a "
        "clip's vectors, relative to the LLM's mean squared embedding norm, per target token); keeps the "
        "correction at zero where the loss gives it little to follow", metavar="W")
    mix_transcribe: float = option(0.0, "share of utterances trained to transcribe instead of continue (the "
                                   "paper's 9:1 is 0.1)", metavar="SHARE")
    mix: str = option("", "shares of utterances trained on other tasks instead of the continuation: transcribe, "
                      "or a task of step 1's --instruction-set (e.g. transcribe=0.1,summarize=0.2)",
                      metavar="TASK=SHARE,...")
    other_instructions: str = option(
        "", "`--mix other=SHARE`: a YAML file of name: instruction (recipes/instructions-distil.yaml); an item drawn "
        "for `other` is distilled along its continuation's tokens under one of these instead, the frozen LLM reading "
        "the transcript under the same instruction as its teacher (no step-1 answer needed)", metavar="FILE")
    drop_copies: bool = option(False, "leave out continuations that merely repeat the transcript")
    # A continuation's opening words depend most on the speech, later ones on the LLM's own text.
    max_target_tokens: int | None = option(None, "train on each continuation's first N tokens only (its "
                                           "end-of-turn token goes if cut)", metavar="N")
    compress_speech: str = option(
        "none", "ctc: the LLM reads one speech vector per token the CTC head hears (blank frames dropped, repeats "
        "merged); needs --warm-start ctc|embed; the head is saved", choices=COMPRESSIONS)
    ctc_weight: float = option(0.5, "with --compress-speech ctc: weight of CTC on the transcript beside step 2's "
                               "loss")
    ctc_min_count: int = option(
        1, "the CTC head's tokens (warm start and compression): the transcripts' tokens seen at least N times and "
        "every single byte; a rarer token is spelled with them by undoing its BPE merges, so unheard words can be "
        "emitted and the head is smaller (1: every token seen)", metavar="N")
    # A saved model to go on training: its adapter, CTC head and LoRA (it had its warm start).
    init_from: str | None = option(
        None, "go on training a saved model (a `blsp train` output directory) on --data: its adapter, CTC head "
        "and LoRA, a fresh optimizer and schedule, no warm start; the backbones and adapter settings must be the "
        "saved ones", metavar="DIR")


@dataclass(frozen=True)
class WarmStartOptions:
    """A warm start of the adapter on cached features alone, before step 2."""

    method: str = option(
        "none", "ctc: first train the adapter with CTC through the LLM's frozen embeddings, on cached features "
        "alone (no LLM forward), then step 2; embed: the same, and pull each speech vector CTC aligns to a token "
        "onto that token's embedding", flag="warm_start", choices=WARM_STARTS)
    steps: int = option(0)
    lr: float = option(2e-3)
    batch_size: int = option(32)
    data: tuple[str, ...] = option((), "more utterances (audio + transcript; no step 1 needed) for the "
                                   "warm start only", metavar="MANIFEST")
    embed_weight: float = option(1.0, "weight of the pull of --warm-start embed", flag="embed_weight")
    time_masks: int = option(0, "SpecAugment in the warm start: N time spans of up to 0.2 s zeroed in "
                             "each clip's features", metavar="N")
    feature_masks: int = option(0, "SpecAugment in the warm start: N bands of up to 1/16 of the "
                                "feature channels zeroed", metavar="N")
    bucket_by_length: bool | None = option(None, "the warm start's batches alone (default: as "
                                           "--bucket-by-length)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))


@dataclass(frozen=True)
class OptimOptions:
    """Optimisation: rates, batches, schedule, precision, seed."""

    lr: float = option(1e-3, "the adapter's peak learning rate")
    weight_decay: float = option(0.05)
    warmup_steps: int = option(20)
    lr_schedule: str = option("cosine", "any transformers scheduler: linear, cosine, constant_with_warmup, ...")
    batch_size: int = option(8, "per process and micro-batch")
    grad_accum: int = option(1)
    epochs: float = option(1.0)
    max_steps: int | None = option(None, "overrides --epochs")
    max_grad_norm: float = option(1.0)
    precision: str = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU",
                            choices=("auto", "fp32", "bf16"))
    llm_dtype: str = option("auto", "the frozen LLM's weights in memory; auto: bf16 when the step runs in bf16 "
                            "(half the memory, no per-step weight casts), else as loaded",
                            choices=LLM_DTYPES)
    seed: int = option(0)


@dataclass(frozen=True)
class LoraOptions:
    """LoRA on the LLM beside the adapter (rank 0: the LLM frozen, as in the paper)."""

    rank: int = option(0, "LoRA of rank R on the LLM's projections (peft), trained with the adapter and "
                       "saved in its checkpoint; 0: the LLM stays frozen, as in the paper",
                       metavar="R")
    alpha: float = option(16.0, "LoRA's scale is alpha / rank")
    dropout: float = option(0.0, "dropout on LoRA's input while training (peft's lora_dropout); 0: none", metavar="P")
    where: str = option("speech", "speech: LoRA acts at speech positions only, so text-only prompts get the "
                        "frozen LLM's answers; voice: at the voice channel's vectors only (the words and the answer "
                        "are the frozen LLM's); request: at every position of a prompt that holds speech (its "
                        "answer too), none of a text-only one; all: at every position", choices=PLACES)
    modules: str = option("attention", "attention (q,k,v,o), mlp (gate,up,down), all, or comma-separated "
                          "module names", metavar="NAMES")
    lr: float | None = option(None, "LoRA's peak learning rate (default: --lr, the adapter's)",
                              metavar="LR")


@dataclass(frozen=True)
class EncoderTrainingOptions:
    """The Whisper encoder's top layers trained with the adapter."""

    layers: int = option(
        0, "train the Whisper encoder's top N layers (and its final norm) too, saved in the checkpoint; features are "
        "cached below them and the N layers run in every step", flag="unfreeze_encoder_layers", metavar="N")
    # They start pretrained, and a fresh adapter's rate (1e-3..3e-3) moves them far.
    lr: float | None = option(
        None, "the unfrozen encoder layers' peak learning rate, in the warm start and step 2 (default: each "
        "stage's own; pretrained layers want ~10x less than a fresh adapter)", flag="encoder_lr", metavar="LR")


@dataclass(frozen=True)
class RunOptions:
    """How the run is carried out: checkpoints, the feature cache, scale, speed and memory."""

    save_every: int = option(100, "checkpoint every N steps")
    keep_checkpoints: int = option(2)
    feature_cache: str | None = option(None, "default: $BLSP_CACHE/features")
    # Cached features kept in memory after their first read, per process: on a GPU the step waits
    # for the CPU and a file read per clip shows; on a CPU a read costs ~0.3 ms against a step's
    # seconds and memory is the scarcer.
    feature_memory_mb: float | None = option(
        None, "keep up to this many MB of cached features in memory after their first read (0: read every clip "
        "from disk on every step); default 1024 on a GPU, 0 on a CPU")
    fsdp: bool = option(False, "shard the frozen LLM's decoder layers across ranks (PyTorch FSDP2), for an LLM "
                        "too large for one GPU; the adapter stays replicated; NCCL on GPU, gloo on CPU")
    shuffle_buffer: int = option(1000, "with --data DIR of shards: items mixed within each rank's stream (shards "
                                 "are shuffled per epoch too)", metavar="N")
    bucket_by_length: bool = option(
        True, "batch sequences of similar length together (less padding), in step 2 and in the warm start; still "
        "deterministic from the step and seed, the same on every rank and on resume")
    gradient_checkpointing: bool = option(False, "recompute the frozen LLM's layers in the backward pass: less "
                                          "memory, more time")


SECTIONS: dict[str, type] = {"model": ModelOptions, "objective": ObjectiveOptions, "warm_start": WarmStartOptions,
                             "optim": OptimOptions, "lora": LoraOptions, "encoder_training": EncoderTrainingOptions,
                             "run": RunOptions}
FLAG_PREFIXES = {"warm_start": "warm_start_", "lora": "lora_"}


def flat_name(section: str, f) -> str:
    """The flat name of a section's field: its flag (underscores for dashes) and its key in presets and JSON."""
    return f.metadata["flag"] or FLAG_PREFIXES.get(section, "") + f.name


# flat name -> (section, its field): the one table flags, presets, defaults and JSON are read from
FLAT_FIELDS: dict[str, tuple[str, Field]] = {flat_name(sec, f): (sec, f) for sec, cls in SECTIONS.items()
                                             for f in fields(cls)}


@dataclass(frozen=True)
class TrainOptions:
    """Every option of step 2, in sections (`options.lora.rank`). Flags, presets and saved JSON use
    the flat names (`--lora-rank`, `lora_rank`): `from_flat` and `flat` convert."""

    model: ModelOptions = field(default_factory=ModelOptions)
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    warm_start: WarmStartOptions = field(default_factory=WarmStartOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    encoder_training: EncoderTrainingOptions = field(default_factory=EncoderTrainingOptions)
    run: RunOptions = field(default_factory=RunOptions)
    # Not a setting (no field: never saved or compared): (preset, the options whose values it gave
    # because the caller gave none), so that an error about such a value blames the preset, not a
    # flag the user never typed. Set by `from_preset`.
    preset_origin: InitVar[tuple[str, tuple[str, ...]] | None] = None

    # Settings that may change between a run and its resumption. fsdp: the same math. The warm
    # start's own switches: a resumed run (from a checkpoint after step 0) does not re-run it.
    RESUMABLE_CHANGES = ("save_every", "keep_checkpoints", "feature_cache", "feature_memory_mb", "fsdp",
                         "warm_start_time_masks", "warm_start_feature_masks", "warm_start_bucket_by_length")

    def __post_init__(self, preset_origin: tuple[str, tuple[str, ...]] | None) -> None:
        object.__setattr__(self, "origin", preset_origin)
        check_options(self)  # at construction: before any model is loaded or clip encoded

    @classmethod
    def from_flat(cls, preset_origin: tuple[str, tuple[str, ...]] | None = None, **flat: Any) -> "TrainOptions":
        """Options from flat names (`lora_rank=8`), the others at their defaults."""
        unknown = sorted(set(flat) - set(FLAT_FIELDS))
        if unknown:
            raise BlspError(f"unknown option(s) {', '.join(unknown)} (see `blsp train --help`)")
        values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for name, value in flat.items():
            section, f = FLAT_FIELDS[name]
            values[section][f.name] = value
        return cls(**{section: SECTIONS[section](**kwargs) for section, kwargs in values.items()},
                   preset_origin=preset_origin)

    def flat(self) -> dict[str, Any]:
        """Every option by its flat name (what train_summary.json and checkpoints hold)."""
        return {name: getattr(getattr(self, section), f.name) for name, (section, f) in FLAT_FIELDS.items()}

    @classmethod
    def from_preset(cls, preset: str, **options) -> "TrainOptions":
        """A preset's settings (a name in blsp/presets, or a YAML file), with `options` (flat names) over them."""
        name, values = load_preset(preset)
        by_preset = tuple(key for key in values if key not in options)
        return cls.from_flat(preset_origin=(name, by_preset), **{**values, **options})

    def by_preset(self, name: str) -> bool:
        """Whether the preset, not a flag, gave option `name` (flat) its value."""
        return name in (self.origin or ("", ()))[1]

    def preset_note(self, *names: str) -> str:
        """For an error about options `names` (flat): which of their values the preset set (the user
        typed no such flag) and how to avoid them; '' when the user set them all."""
        blamed = [name for name in names if self.by_preset(name)]
        if not blamed:
            return ""
        preset = self.origin[0]
        # the preset that sets none of them and the fewest others (`paper`, which sets nothing)
        alternative = min((p for p in PRESETS if not any(name in PRESETS[p] for name in blamed)),
                          key=lambda p: len(PRESETS[p]))
        flags = lambda values: " ".join(f"--{name.replace('_', '-')} {values[name]}" for name in blamed)
        return (f" ({flags(self.flat())} set by --preset {preset}, not by a flag: pass --preset {alternative}, "
                f"or {flags(DEFAULTS)})")


# the paper's values (preset `paper`), by flat name
DEFAULTS = {name: f.default for name, (_, f) in FLAT_FIELDS.items()}


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
def read_preset_file(path: Path) -> dict[str, Any]:
    """A preset's options from YAML, checked to name TrainOptions fields."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise BlspError(f"preset {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise BlspError(f"preset {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise BlspError(f"preset {path} must be a mapping of option: value")
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise BlspError(f"preset {path}: unknown option(s) {', '.join(unknown)} (see `blsp train --help`)")
    return values


PRESETS: dict[str, dict[str, Any]] = {p.stem: read_preset_file(p) for p in sorted(PRESET_DIR.glob("*.yaml"))}
PRESET_OPTIONS = sorted({name for values in PRESETS.values() for name in values})


def load_preset(preset: str) -> tuple[str, dict[str, Any]]:
    """(name, options) of a shipped preset's name or a YAML file's path."""
    if preset in PRESETS:
        return preset, PRESETS[preset]
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise BlspError(f"preset file not found: {path}")
        return str(path), read_preset_file(path)
    raise BlspError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}, or give a YAML file")


# ----------------------------------------------------------------------------------------------
# Flags, from the fields
# ----------------------------------------------------------------------------------------------
def add_option_flags(parser: argparse.ArgumentParser, scale_help: str = "") -> None:
    """One flag per option, grouped by section (the section's docstring is the group's title). The
    options a preset sets default to None ("the preset's"), and their help lists each preset's value."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(cls.__doc__.strip().rstrip("."), scale_help if section == "run" else None)
        for f in fields(cls):
            name = flat_name(section, f)
            group.add_argument(f"--{name.replace('_', '-')}", **flag_settings(name, f))


def flag_settings(name: str, f) -> dict[str, Any]:
    """add_argument's keywords for the option `name` (flat), from its field `f`."""
    meta = f.metadata
    settings: dict[str, Any] = {"default": DEFAULTS[name], "help": meta["help"] or None}
    if name in PRESET_OPTIONS:
        values = ", ".join(f"{preset} {spec.get(name, DEFAULTS[name])}" for preset, spec in PRESETS.items())
        settings.update(default=None, help=f"{meta['help']} [preset: {values}]".strip())
    kind = str(f.type)
    if kind.startswith("bool"):
        settings["action"] = argparse.BooleanOptionalAction if negatable(name, f) else "store_true"
    elif kind.startswith("tuple"):
        settings["nargs"] = "+"
    else:
        settings["type"] = {"int": int, "float": float}.get(kind.split(" |")[0], str)
    if meta["choices"]:
        settings["choices"] = list(meta["choices"])
    if meta["metavar"]:
        settings["metavar"] = meta["metavar"]
    return settings


def negatable(name: str, f) -> bool:
    """A switch on (or unset) by default, or that a preset may turn on: its flag has a --no-X form
    (argparse.BooleanOptionalAction), so that a flag can turn off what the preset turned on
    (`--preset decoder --no-bridge-transcript`)."""
    return str(f.type).startswith("bool") and (f.default is not False or name in PRESET_OPTIONS)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """TrainOptions from parsed flags: a flag a preset sets counts as given unless it is None."""
    given = {name: getattr(args, name) for name in FLAT_FIELDS}
    return TrainOptions.from_preset(args.preset, **{k: v for k, v in given.items()
                                                    if not (k in PRESET_OPTIONS and v is None)})


def option_flags(options: dict) -> list[str]:
    """Options as flags: {"max_steps": 200, "drop_copies": True} -> ["--max-steps", "200",
    "--drop-copies"] (recipes keep their settings in YAML, and run the commands with them)."""
    negatable_names = {name for name, (_, f) in FLAT_FIELDS.items() if negatable(name, f)}
    out = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            out.append(flag)
        elif value is False and key in negatable_names:
            out.append(f"--no-{key.replace('_', '-')}")
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def check_resumable(checkpoint: Path, saved: dict, options: TrainOptions) -> None:
    """Refuse to resume a checkpoint under other settings (but RESUMABLE_CHANGES). An option the
    checkpoint lacks was added since it was written: it had that option's default."""
    current = options.flat()
    before = {name: saved.get(name, DEFAULTS[name]) for name in current}
    changed = [name for name in current
               if name not in TrainOptions.RESUMABLE_CHANGES and before[name] != current[name]]
    if not changed:
        return
    detail = ", ".join(f"{name}: {before[name]!r} -> {current[name]!r}" for name in changed)
    raise CheckpointError(f"{checkpoint}: cannot resume with other training settings ({detail})"
                          + preset_hint(before, changed))


def preset_hint(before: dict, changed: Sequence[str]) -> str:
    """For changed options that a preset sets: the preset whose values the run started with (the
    command line's default preset may not be the one it was started under)."""
    by_preset = [name for name in changed if name in PRESET_OPTIONS]
    if not by_preset:
        return ""
    flags = ", ".join(f"--{name.replace('_', '-')}" for name in by_preset)
    started = [r for r, values in PRESETS.items()
               if all(before[name] == values.get(name, DEFAULTS[name]) for name in PRESET_OPTIONS)]
    how = f"pass --preset {started[0]}, whose values it started with" if started else "give them the run's values"
    return f"; --preset sets {flags}: {how}"


def mix_shares(options: TrainOptions) -> dict[str, float]:
    """`--mix summarize=0.1,transcribe=0.1` (and `--mix-transcribe`) as {task: share}, checked."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in options.objective.mix.split(","))):
        task, eq, share = part.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not eq or not task.strip() or not 0 <= value <= 1:
            raise BlspError(f"--mix {options.objective.mix!r}: write task=share pairs, shares from 0 to 1 "
                            "(e.g. transcribe=0.1,summarize=0.2)")
        if task.strip() in shares:
            raise BlspError(f"--mix {options.objective.mix!r}: task {task.strip()!r} given twice")
        if task.strip() == "continuation":
            raise BlspError(f"--mix {options.objective.mix!r}: the continuation is what every utterance not drawn for "
                            "another task trains on; give only the other tasks' shares")
        shares[task.strip()] = value
    preset_note = ""
    if options.objective.mix_transcribe:
        if "transcribe" not in shares:
            shares["transcribe"] = options.objective.mix_transcribe
            preset_note = options.preset_note("mix_transcribe")  # '' where the user typed it
        elif not options.by_preset("mix_transcribe"):
            raise BlspError("give the transcribe share once: --mix-transcribe or --mix transcribe=...")
        # else a typed --mix transcribe=... wins over the preset's share
    if sum(shares.values()) > 1 + 1e-9:
        raise BlspError(f"the --mix shares add up to {sum(shares.values()):g}, more than 1" + preset_note)
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
    model, objective, warm, lora = options.model, options.objective, options.warm_start, options.lora
    encoder, run, optim = options.encoder_training, options.run, options.optim
    mix_shares(options)
    for name, value, known in (("--loss", objective.loss, LOSSES), ("--warm-start", warm.method, WARM_STARTS),
                               ("--compress-speech", objective.compress_speech, COMPRESSIONS),
                               ("--speech-states", model.speech_states, tuple(SPEECH_SOURCES))):
        if value not in known:
            raise BlspError(f"unknown {name} {value!r}; choose from {', '.join(known)}")
    if model.speech_language != "en":
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        if model.speech_states != "decoder":
            raise BlspError(f"--speech-language {model.speech_language}: only Whisper's decoder transcribes in a "
                            "language; add --speech-states decoder (the encoder's frames have none)")
        if model.speech_language not in (*LANGUAGES, "auto"):
            raise BlspError(f"--speech-language {model.speech_language!r}: auto, or one of Whisper's language codes "
                            f"({', '.join(list(LANGUAGES)[:8])}, ...)")
    if model.speech_states == "decoder":
        # the decoder's states come one per token: nothing for CTC to align, no frames to drop
        for name, value, off in (("warm_start", warm.method, "none"),
                                 ("compress_speech", objective.compress_speech, "none"),
                                 ("unfreeze_encoder_layers", encoder.layers, 0)):
            if value != off:
                raise BlspError(f"--{name.replace('_', '-')} {value}: not with --speech-states decoder (one state per "
                                f"token of Whisper's transcript); use --{name.replace('_', '-')} {off}"
                                + options.preset_note(name, "speech_states"))
    if reads_tokens(model.speech_vectors, model.speech_states):
        try:
            check_bridge_adapter(model.adapter, model.adapter_downsample)
        except BlspError as err:  # say so where the preset, not the user, asked for the bridge
            raise BlspError(str(err) + options.preset_note("speech_states", "speech_vectors")) from None
    if model.bridge_confidence is not None:
        if not reads_tokens(model.speech_vectors, model.speech_states):
            raise BlspError(f"--bridge-confidence {model.bridge_confidence}: only the token bridge reads sure tokens "
                            "as themselves (--speech-states decoder --speech-vectors tokens: --preset decoder)"
                            + options.preset_note("bridge_confidence", "speech_states", "speech_vectors"))
        check_bridge_confidence(model.bridge_confidence)
    if objective.correction_weight < 0:
        raise BlspError(f"--correction-weight {objective.correction_weight}: 0 (no penalty) or more"
                        + options.preset_note("correction_weight"))
    if objective.correction_weight > 0 and not reads_tokens(model.speech_vectors, model.speech_states):
        raise BlspError(f"--correction-weight {objective.correction_weight}: only the token bridge's adapter makes a "
                        "correction (of the tokens it reads); elsewhere its vectors are the speech itself "
                        "(--speech-states decoder --speech-vectors tokens: --preset decoder)"
                        + options.preset_note("correction_weight", "speech_states", "speech_vectors"))
    if model.bridge_transcript and not reads_tokens(model.speech_vectors, model.speech_states):
        raise BlspError("--bridge-transcript: only the token bridge reads Whisper's transcript (--speech-states "
                        "decoder --speech-vectors tokens: --preset decoder)"
                        + options.preset_note("bridge_transcript", "speech_states", "speech_vectors"))
    if model.voice_vectors < 0:
        raise BlspError(f"--voice-vectors {model.voice_vectors}: 0 (no voice channel) or more"
                        + options.preset_note("voice_vectors"))
    voice_attribute_names(model.voice_attributes)  # raises on an unknown name
    if model.voice_gate and not (model.voice_vectors or model.voice_attributes):
        raise BlspError("--voice-gate decides where the LLM reads the voice channel: give the model one "
                        "(--voice-vectors N or --voice-attributes NAMES)" + options.preset_note("voice_gate"))
    n = model.adapter_downsample
    if not (n >= 2 and n & (n - 1) == 0 if model.adapter == "conv" else n >= 1):
        raise BlspError(f"--adapter-downsample {model.adapter_downsample}: the conv adapter downsamples by a power "
                        "of 2 (2, 4, 8, ...), the stack adapter by any positive whole number"
                        + options.preset_note("adapter_downsample"))
    if model.speech_vectors not in SPEECH_VECTORS:
        raise BlspError(f"unknown --speech-vectors {model.speech_vectors!r}; choose from {', '.join(SPEECH_VECTORS)}")
    if tokens_unreadable(model.speech_vectors, objective.compress_speech, model.speech_states):
        raise BlspError("--speech-vectors tokens reads each CTC token run, or each of Whisper's decoder states, as "
                        "token "
                        "embeddings: add --compress-speech ctc or --speech-states decoder"
                        + options.preset_note("speech_vectors"))
    if objective.max_target_tokens is not None and objective.max_target_tokens < 1:
        raise BlspError(f"--max-target-tokens {objective.max_target_tokens}: keep at least 1 token")
    if optim.llm_dtype not in LLM_DTYPES:
        raise BlspError(f"unknown --llm-dtype {optim.llm_dtype!r}; choose from {', '.join(LLM_DTYPES)}")
    if run.feature_memory_mb is not None and run.feature_memory_mb < 0:
        raise BlspError(f"--feature-memory-mb {run.feature_memory_mb}: 0 (read from disk every time) or more")
    if warm.time_masks < 0 or warm.feature_masks < 0:
        raise BlspError("--warm-start-time-masks / --warm-start-feature-masks: 0 (off) or more masks per clip")
    if encoder.layers < 0:
        raise BlspError(f"--unfreeze-encoder-layers {encoder.layers}: 0 or more")
    if encoder.layers and run.fsdp:
        raise BlspError("--unfreeze-encoder-layers with --fsdp is not supported: the sharded model must stay frozen")
    if encoder.lr is not None and (not encoder.layers or encoder.lr <= 0):
        raise BlspError(f"--encoder-lr {encoder.lr}: needs --unfreeze-encoder-layers N (N > 0) and a rate "
                        "above 0")
    # (a preset's LoRA rate goes unused when a typed --lora-rank 0 turns LoRA off)
    if lora.lr is not None and (lora.lr <= 0 or not lora.rank and not options.by_preset("lora_lr")):
        raise BlspError(f"--lora-lr {lora.lr}: needs --lora-rank R (R > 0) and a rate above 0")
    if lora.rank:
        lora_settings(options)  # its own checks (where, rank, module names)
        if run.fsdp:
            raise BlspError("--lora-rank with --fsdp is not supported: the sharded LLM must stay frozen"
                            + options.preset_note("lora_rank"))
    no_warm_start = warm.method == "none" or warm.steps <= 0
    if objective.init_from:
        # The saved model had its warm start; a preset's (--preset fast) is skipped, a flag's refused.
        if (warm.method != "none" and not options.by_preset("warm_start")) or warm.data:
            raise BlspError(f"--init-from {objective.init_from} goes on from a trained model, without a warm start: "
                            "drop --warm-start and --warm-start-data")
        return
    if warm.data and no_warm_start:
        raise BlspError("--warm-start-data is heard by the warm start only: add --warm-start ctc|embed "
                        "--warm-start-steps N (N > 0), or leave it out")
    if objective.compress_speech == "ctc" and no_warm_start:
        raise BlspError("--compress-speech ctc needs a CTC-trained head: add --warm-start ctc|embed "
                        "--warm-start-steps N (N > 0)" + options.preset_note("compress_speech"))


def lora_settings(options: TrainOptions) -> LoraSettings:
    return LoraSettings(rank=options.lora.rank, alpha=options.lora.alpha, dropout=options.lora.dropout,
                        where=options.lora.where, target_modules=parse_modules(options.lora.modules))


def voice_attribute_names(value: str) -> tuple[str, ...]:
    """--voice-attributes as names: "all" is every attribute of blsp.voice, "" none."""
    from .voice import VOICE_ATTRIBUTES
    from .voice_channel import check_voice_attributes

    if value.strip() == "all":
        return tuple(VOICE_ATTRIBUTES)
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    check_voice_attributes(names, "--voice-attributes")  # its help names "all"
    return names
