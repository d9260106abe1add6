"""Step 2, `blsp train`: train the adapter so that speech in place of the transcript yields the same continuation.

Reads the behaviour data (JSONL lines from step 1, or a directory of tar shards streamed by each
rank), builds the model (a fresh adapter between the named backbones, or a saved one to go on
training), places it (whole, or with `--fsdp` its LLM sharded) and runs the trainer
(blsp.trainer; blsp.streaming for shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .behavior import check_behavior_data, read_behavior_data
from .config import initial_speech_vectors
from .distributed import DistInfo, default_device, init_distributed
from .errors import BlspError, SpeechStatesError
from .fsdp import shard_model
from .modeling import BlspModel
from .options import TrainOptions, lora_settings, voice_attribute_names
from .trainer import Trainer
from .voice_channel import has_voice_channel, voice_gated, voice_place

def init_model(options: TrainOptions) -> BlspModel:
    """--init-from DIR: the saved model (adapter, CTC head, LoRA) on the run's backbones, which must
    be the ones it was trained against; its shape and prompt must be what the run asks for."""
    model = BlspModel.from_pretrained(options.objective.init_from, encoder=options.model.encoder, llm=options.model.llm)
    c = model.config
    saved_lora = c.lora or {}
    asked_lora = lora_settings(options).to_dict() if options.lora.rank else {}
    pairs = [("speech_states", c.speech_states, options.model.speech_states),
             ("speech_language", c.speech_language or "en", options.model.speech_language),
             ("adapter", c.adapter_type, options.model.adapter),
             ("adapter_downsample", c.adapter_downsample, options.model.adapter_downsample),
             ("compress_speech", c.speech_compression or "none", options.objective.compress_speech),
             ("lora_rank", saved_lora.get("rank", 0), options.lora.rank),
             ("voice_vectors", getattr(c, "voice_vectors", 0), options.model.voice_vectors),
             ("voice_attributes", ",".join(getattr(c, "voice_attributes", None) or ()),
              ",".join(voice_attribute_names(options.model.voice_attributes))),
             ("system_prompt", c.system_prompt, options.model.system_prompt)]
    if has_voice_channel(c):
        pairs.append(("voice_place", voice_place(c), options.model.voice_place))
        pairs.append(("voice_gate", voice_gated(c), options.model.voice_gate))
    if c.speech_compression or c.speech_states == "decoder":
        pairs.append(("speech_vectors", c.speech_vectors, options.model.speech_vectors))
    if saved_lora and asked_lora:
        pairs += [("lora_alpha", saved_lora["alpha"], asked_lora["alpha"]),
                  ("lora_where", saved_lora["where"], asked_lora["where"]),
                  ("lora_modules", ",".join(saved_lora["target_modules"]), ",".join(asked_lora["target_modules"]))]
    differ = [(name, saved, asked) for name, saved, asked in pairs if saved != asked]
    if differ:
        flags = lambda i: " ".join(f"--{d[0].replace('_', '-')} {d[i]!r}" for d in differ)
        raise BlspError(f"--init-from {options.objective.init_from}: the saved model was trained with {flags(1)}, "
                        f"this run asks for {flags(2)}; give the saved values"
                        + options.preset_note(*(d[0] for d in differ)))
    return model


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
            m = options.model
            model = init_model(options) if options.objective.init_from else BlspModel.from_components(
                m.encoder, m.llm, adapter_type=m.adapter, adapter_downsample=m.adapter_downsample,
                system_prompt=m.system_prompt, seed=options.optim.seed, speech_states=m.speech_states,
                speech_vectors=initial_speech_vectors(m.speech_states, m.speech_vectors),
                speech_language=m.speech_language, bridge_confidence=m.bridge_confidence, bridge_transcript=m.bridge_transcript,
                voice_vectors=m.voice_vectors, voice_attributes=voice_attribute_names(m.voice_attributes),
                voice_place=m.voice_place, voice_gate=m.voice_gate)
        except SpeechStatesError as err:  # e.g. an encoder saved without Whisper's tokenizer
            raise SpeechStatesError(str(err) + options.preset_note("speech_states")) from None
    place_model(model, options, info)
    if streamed:
        trainer = StreamingTrainer(model, data[0], options, output_dir, info, skip_bad=skip_bad)
        skipped = []
    else:
        trainer = Trainer(model, utterances, options, output_dir, info, skip_bad=skip_bad)
    result = trainer.train(resume=resume)
    result["skipped_bad"] = [str(e) for e in skipped + trainer.skipped]
    return result


def place_model(model: BlspModel, options: TrainOptions, info: DistInfo) -> None:
    """The model on this rank's device: whole, or with `--fsdp` its LLM sharded across ranks."""
    device = default_device(info)
    if options.run.fsdp:
        shard_model(model, device)
    else:
        model.to(device)
