"""The BLSP model: frozen Whisper parts, a small trainable adapter, a frozen causal LLM.

Named parts as in transformers' audio-LLMs (qwen2_audio, voxtral), each chosen once from the
config when the model is built:
  `speech_source` (blsp.speech_sources: the Whisper encoder's frames, or its decoder's states;
  `audio_tower` is its Whisper encoder) -> `adapter` (blsp.adapters) -> `speech_reader`
  (blsp.readers: plain, CTC-compressed, token bridge) -> `language_model`; beside them, when the
  config asks for it, `voice_channel` (blsp.voice_channel): a few vectors of how the voice sounds,
  read just before the words.

Speech enters the LLM by `masked_scatter` into the embedded prompt at positions whose input id is
`SPEECH_TOKEN_ID`, a negative sentinel no vocabulary uses (as LLaVA's IMAGE_TOKEN_INDEX).
A checkpoint holds only what trains (the adapter, and the reader's, LoRA's and the encoder's
trained weights, when any), plus the names and weight fingerprints of the backbones.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

from .adapters import build_adapter, init_adapter
from .config import BlspConfig, check_speech_vectors, tokens_unreadable
from .errors import BlspError, CheckpointError
from .fingerprint import weights_fingerprint
from .fsdp import is_sharded
from .llm import (PrefixCache, attention_kernels, lm_logits, load_language_model, run_decoder,
                  set_layer_checkpointing, target_logits, token_embeddings)
from .lora import (LoraGate, LoraSettings, add_lora, load_lora_state_dict, lora_parameters, lora_state_dict,
                   set_lora_dropout, voice_positions)
from .processing import SPEECH_TOKEN_ID
from .readers import READERS, CTCReader, SpeechReader, TokenBridgeReader, build_reader
from .speech_sources import SPEECH_SOURCES, SpeechSource, build_speech_source, check_speech_states, decoder_tokenizer
from .voice import VOICE_ATTRIBUTES
from .voice_channel import (
    VoiceChannel,
    check_voice_settings,
    has_voice_channel,
    init_class_vectors,
    init_voice_channel,
    split_voice_rows,
    voice_gated,
    voice_rows,
    voice_place,
    voice_slots,
)
from .voice_gate import fit_voice_gate, prompt_prefix, request_prefixes, request_states
from .whisper import decoding_ids, load_whisper

ADAPTER_WEIGHTS = "adapter.safetensors"
LORA_PREFIX = "lora."
ENCODER_PREFIX = "audio_tower."  # the encoder's trained top layers, when there are any
VOICE_PREFIX = "voice_channel."  # the voice channel, when there is one
READER_PREFIXES = tuple(sorted({r.checkpoint_prefix for r in READERS.values() if r.checkpoint_prefix}))


@dataclass
class BlspOutput:
    loss: torch.Tensor | None = None  # mean over target tokens
    loss_sum: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, T, V] only when asked for
    target_logits: torch.Tensor | None = None  # [N, V] at the N scored positions, when asked for
    speech: tuple[torch.Tensor, torch.Tensor] | None = None  # the reader's vectors (bridge mix + correction) and lengths
    # the adapter's own vectors and lengths: with the token bridge, its correction of the tokens
    adapted: tuple[torch.Tensor, torch.Tensor] | None = None


def _hide_dropped_speech(attention_mask: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mask the speech slots whose vectors the reader dropped (`keep` flags, in slot order)."""
    if keep is None:
        return attention_mask
    attention_mask = attention_mask.clone()
    attention_mask[input_ids == SPEECH_TOKEN_ID] = keep.to(attention_mask.dtype)
    return attention_mask


class BlspModel(PreTrainedModel):
    config_class = BlspConfig
    base_model_prefix = "blsp"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(
        self,
        config: BlspConfig,
        audio_tower: WhisperEncoder | None = None,
        language_model: PreTrainedModel | None = None,
        speech_decoder: WhisperDecoder | None = None,
    ):
        super().__init__(config)
        self.speech_source: SpeechSource = build_speech_source(config, audio_tower, speech_decoder)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.llm_config)
        )
        embeddings = token_embeddings(self.language_model)
        self.adapter = build_adapter(config, embeddings.shape[1])
        self.speech_reader: SpeechReader = build_reader(config, embeddings)
        self.voice_channel: VoiceChannel | None = None
        if has_voice_channel(config):
            self.voice_channel = VoiceChannel(config.encoder_config.d_model, len(config.voice_layers),
                                              embeddings.shape[1], config.voice_vectors,
                                              tuple(config.voice_attributes or ()), gate=voice_gated(config))
        # the voice gate's decision per request prefix (token ids): the frozen LLM reads each once
        self.voice_gate_cache: dict[tuple[int, ...], bool] = {}
        self.lora_gate: LoraGate | None = None
        if config.lora:
            self.lora_gate = add_lora(self.language_model, LoraSettings(**config.lora))
        self.processor = None  # a BlspProcessor, attached by the loaders
        self.prefix_cache = PrefixCache()  # see llm_hidden_states(shared_prefix=...)
        self.freeze_backbones()

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models come pretrained; the adapter keeps torch's default init (see init_adapter).
        pass

    # -- the parts by name ---------------------------------------------------------------------
    @property
    def audio_tower(self) -> WhisperEncoder:
        return self.speech_source.audio_tower

    @property
    def speech_decoder(self) -> WhisperDecoder | None:
        """Whisper's decoder, when the speech source reads its states."""
        return getattr(self.speech_source, "decoder", None)

    @property
    def ctc_head(self):
        """The CTC head, when the reader compresses speech with one (blsp.readers.ctc)."""
        return self.speech_reader.ctc_head if isinstance(self.speech_reader, CTCReader) else None

    @property
    def token_bridge(self):
        """The token bridge, when the reader reads decoder states through one (blsp.readers.bridge)."""
        return self.speech_reader.bridge if isinstance(self.speech_reader, TokenBridgeReader) else None

    @property
    def reads_token_bridge(self) -> bool:
        return self.config.reads_token_bridge

    def frozen_parts(self) -> dict[str, nn.Module]:
        """The pretrained parts, by name: frozen but for what training unfreezes in them."""
        return {**self.speech_source.frozen_parts(), "language_model": self.language_model}

    # -- construction --------------------------------------------------------------------------
    def freeze_backbones(self) -> None:
        for part in self.frozen_parts().values():
            part.requires_grad_(False)
            part.eval()
        for p in lora_parameters(self.language_model):  # the LLM's only trainable weights
            p.requires_grad_(True)
        set_lora_dropout(self.language_model, self.training)
        for p in self.trainable_encoder_parameters():
            p.requires_grad_(True)

    def trainable_encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's top layers and final norm, when they train (`unfreeze_encoder_layers`)."""
        return self.speech_source.trainable_parameters()

    def unfreeze_encoder_layers(self, n: int) -> None:
        """Train the encoder's top `n` layers with the adapter; features are then cached below them."""
        layers = self.config.encoder_config.encoder_layers
        if n and self.config.speech_states != "encoder":
            raise BlspError(f"--unfreeze-encoder-layers: not with --speech-states {self.config.speech_states} (the "
                            "adapter reads the decoder's states of a greedy transcript, which no gradient reaches)")
        if not 0 <= n <= layers:
            raise BlspError(f"--unfreeze-encoder-layers {n}: the encoder has {layers} layers")
        check_voice_settings(self.config.voice_vectors, self.config.voice_layers, layers, (layers - n) if n else None,
                             self.config.voice_attributes)
        self.config.encoder_trainable_layers = n
        self.freeze_backbones()

    def train(self, mode: bool = True) -> "BlspModel":
        # Frozen parts stay in eval mode (no dropout) whatever the trainer asks.
        super().train(mode)
        self.freeze_backbones()
        return self

    def init_adapter(self, seed: int = 0) -> None:
        """Seeded adapter init whose output starts at the scale of the LLM's token embeddings;
        beside the token bridge the adapter is a correction: it starts at nothing."""
        emb_std = token_embeddings(self.language_model).float().std().item()
        init_adapter(self.adapter, seed, 0.0 if self.reads_token_bridge else emb_std)
        if self.voice_channel is not None:
            init_voice_channel(self.voice_channel, seed, emb_std)

    def speech_slots(self, feature_rows: int) -> int:
        """How many speech vectors the LLM reads for a clip whose cached features have this many
        rows: the voice channel's vectors, then the adapter's over the words' rows."""
        words = feature_rows - voice_rows(self.config)
        return voice_slots(self.config) + int(self.adapter.output_lengths(words)) * self.speech_reader.slots_per_vector

    def enable_ctc_compression(self, vocab: list[int], speech_vectors: str = "adapter") -> None:
        """Give the model a CTC head over `vocab` that compresses its speech (blsp.readers.ctc);
        `speech_vectors` "tokens": the LLM reads the head's token-embedding mixes instead."""
        check_speech_vectors(speech_vectors, "ctc")
        self.config.speech_compression, self.config.ctc_vocab = "ctc", [int(t) for t in vocab]
        self.config.speech_vectors = speech_vectors
        self.speech_reader = build_reader(self.config, token_embeddings(self.language_model))

    def build_token_bridge(self, whisper_tokenizer: Any, strict: bool = True) -> None:
        """The bridge from Whisper's decoder states to the LLM's token embeddings, from Whisper's
        tokenizer and the LLM's (attach_processor first)."""
        self.speech_reader.build(whisper_tokenizer, self.processor.tokenizer,
                                 token_embeddings(self.language_model), strict)

    def enable_lora(self, settings: LoraSettings) -> None:
        """LoRA on the LLM (blsp.lora): trainable beside the adapter, saved in its checkpoint."""
        if self.lora_gate is not None:
            raise BlspError("this model already has LoRA on its LLM")
        if settings.where == "voice" and not voice_slots(self.config):
            raise BlspError("--lora-where voice acts at the voice channel's vectors: give the model a voice channel "
                            "(--voice-vectors N or --voice-attributes), or choose speech, request or all")
        self.config.lora = settings.to_dict()
        self.lora_gate = add_lora(self.language_model, settings)
        self.freeze_backbones()

    def lora_off(self) -> contextlib.AbstractContextManager:
        """The frozen LLM itself for the duration (the KD teacher, text-only baselines)."""
        return self.lora_gate.disabled() if self.lora_gate is not None else contextlib.nullcontext()

    def reading(self, input_ids: torch.Tensor) -> contextlib.AbstractContextManager:
        """For the LLM calls inside: which positions of `input_ids` are speech (speech-only LoRA)."""
        if self.lora_gate is None:
            return contextlib.nullcontext()
        speech = input_ids == SPEECH_TOKEN_ID
        if self.config.lora.get("where") == "voice":  # the voice channel's vectors alone
            speech = voice_positions(speech, voice_slots(self.config), voice_place(self.config))
        return self.lora_gate.positions(speech)

    def answering(self, input_ids: torch.Tensor, rows: Sequence[int] | None = None) -> contextlib.AbstractContextManager:
        """For the LLM calls that generate after a prompt `input_ids` (`rows`: those of its rows still
        generating): LoRA `--lora-where request` keeps acting on the rows whose prompt holds speech;
        placed at speech positions, or everywhere, it needs nothing here (no generated token is
        speech; `all` acts regardless)."""
        if self.lora_gate is None or not self.lora_gate.whole_rows:
            return contextlib.nullcontext()
        held = (input_ids == SPEECH_TOKEN_ID).any(dim=1)
        if rows is not None:
            held = held[torch.as_tensor(list(rows), device=held.device)]
        return self.lora_gate.positions(held[:, None])

    # -- what a checkpoint holds ---------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter, and the reader's, the LLM's LoRA and the encoder's trained weights (prefixed)
        when there are any."""
        state = dict(self.adapter.state_dict())
        state.update(self.speech_reader.state_dict())
        if self.voice_channel is not None:
            state.update({f"{VOICE_PREFIX}{k}": v for k, v in self.voice_channel.state_dict().items()})
        if self.lora_gate is not None:
            state.update({f"{LORA_PREFIX}{k}": v for k, v in lora_state_dict(self.language_model).items()})
        state.update({f"{ENCODER_PREFIX}{k}": v for k, v in self.trained_encoder_state().items()})
        return state

    def trained_encoder_state(self) -> dict[str, torch.Tensor]:
        return self.speech_source.trained_state()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: Path) -> None:
        reader = {k: v for k, v in state.items() if k.startswith(READER_PREFIXES)}
        lora = {k[len(LORA_PREFIX):]: v for k, v in state.items() if k.startswith(LORA_PREFIX)}
        encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        voice = {k[len(VOICE_PREFIX):]: v for k, v in state.items() if k.startswith(VOICE_PREFIX)}
        adapter = {k: v for k, v in state.items()
                   if not k.startswith((*READER_PREFIXES, LORA_PREFIX, ENCODER_PREFIX, VOICE_PREFIX))}
        problems = []
        if self.voice_channel is None and voice:
            problems.append("voice channel weights but no voice channel in config.json")
        expected = self.trained_encoder_state()
        if set(encoder) != set(expected):
            problems.append(f"trained encoder layers: {sorted(set(encoder) ^ set(expected))[:4]} do not match "
                            f"config.json (encoder_trainable_layers {self.config.encoder_trainable_layers})")
        else:
            self.speech_source.load_trained_state(encoder)
        if self.lora_gate is None and lora:
            problems.append("LoRA weights but no LoRA in config.json")
        elif self.lora_gate is not None:
            missing = load_lora_state_dict(self.language_model, lora)
            if missing:
                problems.append(f"LoRA: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        parts = [("adapter", self.adapter, adapter), (f"{self.speech_reader.name} reader", self.speech_reader, reader)]
        if self.voice_channel is not None:
            parts.append(("voice channel", self.voice_channel, voice))
        for name, module, part in parts:
            missing, unexpected = module.load_state_dict(part, strict=False)
            if missing or unexpected:
                problems.append(f"{name}: missing {missing}, unexpected {unexpected}")
        if problems:
            raise CheckpointError(f"{source}: weights do not fit the model ({'; '.join(problems)})")

    def trainable_parameters(self) -> list[nn.Parameter]:
        # the voice channel's heads are fitted on labels before step 2, not trained (blsp.voice_channel)
        voice = [p for p in self.voice_channel.parameters() if p.requires_grad] if self.voice_channel is not None else []
        return (list(self.adapter.parameters()) + self.speech_reader.trainable_parameters() + voice
                + lora_parameters(self.language_model) + self.trainable_encoder_parameters())

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_components(
        cls,
        encoder: str = "whisper-base",
        llm: str = "smollm2-135m-instruct",
        adapter_type: str = "conv",
        adapter_bottleneck: int = 512,
        adapter_downsample: int = 8,
        system_prompt: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        speech_states: str = "encoder",
        speech_vectors: str = "adapter",
        speech_language: str = "en",
        bridge_confidence: float | None = None,
        bridge_transcript: bool = False,
        voice_vectors: int = 0,
        voice_attributes: Sequence[str] = (),
        voice_place: str = "before",
        voice_gate: bool = False,
    ) -> "BlspModel":
        """A new model with a fresh adapter between a pretrained encoder and LLM (names or dirs);
        `speech_states` names the speech source (SPEECH_SOURCES; "decoder": Whisper's decoder
        states as it transcribes `speech_language`, "auto": the language it hears), and with
        `speech_vectors` "tokens" the adapter corrects the token bridge's vectors; `voice_vectors`
        > 0: a voice channel of that many free vectors, and one per `voice_attributes`
        (blsp.voice_channel), `voice_place` "before" or "after" the words, with `voice_gate` read only
        where the request asks about the voice (blsp.voice_gate)."""
        if tokens_unreadable(speech_vectors, None, speech_states):  # a new model has no CTC head yet
            raise BlspError("speech vectors 'tokens' of a new model: with speech states 'decoder' (with CTC "
                            "compression they come with the CTC head: enable_ctc_compression)")
        check_speech_states(speech_states)  # before minutes go into loading
        decoding = SPEECH_SOURCES[speech_states].needs_decoder
        whisper = load_whisper(encoder, torch_dtype)
        whisper_tokenizer = decoder_tokenizer(encoder) if decoding else None
        language_model, tokenizer = load_language_model(llm, torch_dtype)
        config = BlspConfig(
            encoder_config=whisper.config,
            llm_config=language_model.config,
            adapter_type=adapter_type,
            adapter_bottleneck=adapter_bottleneck,
            adapter_downsample=adapter_downsample,
            encoder_name=encoder,
            llm_name=llm,
            encoder_fingerprint=weights_fingerprint(whisper.get_encoder()),
            llm_fingerprint=weights_fingerprint(language_model),
            system_prompt=system_prompt,
            speech_states=speech_states,
            speech_vectors=speech_vectors,
            decoder_ids=decoding_ids(whisper, whisper_tokenizer, speech_language) if decoding else None,
            speech_language=speech_language if decoding else None,
            decoder_fingerprint=weights_fingerprint(whisper.get_decoder()) if decoding else None,
            bridge_confidence=bridge_confidence,
            bridge_transcript=bridge_transcript,
            voice_vectors=voice_vectors,
            voice_attributes=list(voice_attributes) or None,
            voice_place=voice_place,
            voice_gate=voice_gate,
        )
        model = cls(config, audio_tower=whisper.get_encoder(), language_model=language_model,
                    speech_decoder=whisper.get_decoder() if decoding else None)
        model.init_adapter(seed)
        model.attach_processor(tokenizer)
        if model.voice_channel is not None and model.voice_channel.attributes:
            init_class_vectors(model.voice_channel, tokenizer, token_embeddings(model.language_model))
        if model.reads_token_bridge:
            model.build_token_bridge(whisper_tokenizer)
        return model

    def attach_processor(self, tokenizer: Any) -> None:
        from .processing import BlspProcessor

        self.processor = BlspProcessor(
            tokenizer,
            n_mels=self.config.encoder_config.num_mel_bins,
            system_prompt=self.config.system_prompt,
            # plain int arithmetic (output_lengths takes ints as well as tensors): batching calls it
            # once per clip, and a tensor op per call was a good part of a GPU step's CPU time
            speech_lengths=self.speech_slots,
        )

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:  # type: ignore[override]
        """Write config.json and the trained weights only (the backbones are named, not copied)."""
        from safetensors.torch import save_file

        from .io import replace_dir

        final = Path(save_directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.config.save_pretrained(tmp)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        written = {f.name for f in tmp.iterdir()}
        if final.exists() and any(f.name not in written for f in final.iterdir()):
            # A directory holding other things (a training run's checkpoints and logs, even when an
            # earlier save put weights there): replace only our files, each in one atomic rename.
            for f in tmp.iterdir():
                f.replace(final / f.name)
            tmp.rmdir()
        else:
            replace_dir(tmp, final)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path: str | Path,
        encoder: str | None = None,
        llm: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        strict: bool = True,
        **_: Any,
    ) -> "BlspModel":
        """Load a saved adapter onto the encoder and LLM it names (or the ones given).

        With `strict`, a backbone whose weights differ from the ones the adapter was trained
        against is refused: an adapter is meaningless on another LLM.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / ADAPTER_WEIGHTS).exists():
            raise CheckpointError(f"{path}: not a blsp checkpoint (no {ADAPTER_WEIGHTS})")
        config = BlspConfig.from_pretrained(path)
        encoder = encoder or config.encoder_name
        llm = llm or config.llm_name
        decoding = SPEECH_SOURCES[config.speech_states].needs_decoder
        whisper = load_whisper(encoder, torch_dtype)
        # the decoding ids come from config.json: the tokenizer is needed only by the token bridge
        whisper_tokenizer = decoder_tokenizer(encoder) if config.reads_token_bridge else None
        language_model, tokenizer = load_language_model(llm, torch_dtype)
        for what, name, module, expected in (
            ("encoder", config.encoder_name, whisper.get_encoder(), config.encoder_fingerprint),
            ("speech decoder", config.encoder_name, whisper.get_decoder() if decoding else None,
             config.decoder_fingerprint),
            ("LLM", config.llm_name, language_model, config.llm_fingerprint),
        ):
            if module is None:
                continue
            found = weights_fingerprint(module)
            if strict and expected and found != expected:
                raise CheckpointError(
                    f"{path}: this adapter was trained against the {what} {name!r} "
                    f"(fingerprint {expected}), but the {what} loaded has fingerprint {found}. "
                    "Load it with the same model, or pass strict=False (--no-strict) to force."
                )
        model = cls(config, audio_tower=whisper.get_encoder(), language_model=language_model,
                    speech_decoder=whisper.get_decoder() if decoding else None)
        model.load_trainable_state_dict(load_file(str(path / ADAPTER_WEIGHTS)), path / ADAPTER_WEIGHTS)
        model.attach_processor(tokenizer)
        if model.reads_token_bridge:
            model.build_token_bridge(whisper_tokenizer, strict)
        return model

    # -- forward -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.language_model.dtype

    @torch.no_grad()
    def encode_mel(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The speech source's features of padded log-mel [B, n_mels, T]: ([B, S, d], lengths),
        what the feature cache holds."""
        weight = self.audio_tower.conv1.weight
        mel = mel.to(weight.device, weight.dtype)
        return self.speech_source.encode(mel, mel_lengths.to(mel.device))

    def speech_embeddings(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The speech vectors [B, S, d_llm] and their lengths, before the reader selects any."""
        x, vectors, lengths = self._adapted(features, lengths)
        return self.speech_reader.correct(x, vectors, self.speech_source), lengths

    def _adapted(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the states the adapter read, its vectors, their lengths) of cached features."""
        param = next(self.adapter.parameters())
        x, lengths = features.to(param.device, param.dtype), lengths.to(param.device)
        _, x, lengths = split_voice_rows(x, lengths, voice_rows(self.config))
        x = self.speech_source.finish(x, lengths)
        vectors, lengths = self.adapter(x, lengths)
        return x, vectors, lengths

    def embed_inputs(self, input_ids: torch.Tensor, encoder_features: torch.Tensor | None = None,
                     encoder_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the speech vectors scattered into the speech slots."""
        return self._splice(input_ids, encoder_features, encoder_lengths, torch.ones_like(input_ids))[0]

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       encoder_features: torch.Tensor | None = None,
                       encoder_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask) for the LLM: speech spliced in, and the speech vectors
        the reader dropped masked out (they then take no position either)."""
        embeds, keep, _, _ = self._splice(input_ids, encoder_features, encoder_lengths, attention_mask)
        return embeds, _hide_dropped_speech(attention_mask, input_ids, keep)

    def _splice(self, input_ids, encoder_features, encoder_lengths, attention_mask):
        """(embeds, keep flags of the speech slots or None, (speech, lengths) or None, (the adapter's
        vectors, lengths) or None)."""
        embed = self.language_model.get_input_embeddings()
        speech_mask = input_ids == SPEECH_TOKEN_ID
        embeds = embed(input_ids.masked_fill(speech_mask, 0))
        n_slots = int(speech_mask.sum())
        if encoder_features is None:
            if n_slots:
                raise ValueError("input_ids hold speech slots but no speech features were given")
            return embeds, None, None, None
        states, adapted, lengths = self._adapted(encoder_features, encoder_lengths)
        speech, vectors, keep, slots = self.speech_reader.read(states, adapted, lengths, self.speech_source)
        if self.voice_channel is not None:
            heard = self.voice_heard(input_ids, attention_mask)
            vectors, keep, slots = self._with_voice(encoder_features, encoder_lengths, vectors, keep, slots, heard)
        valid = torch.arange(vectors.shape[1], device=vectors.device)[None, :] < slots[:, None]
        flat = vectors[valid]
        if flat.shape[0] != n_slots:
            raise ValueError(f"{n_slots} speech slots in input_ids but the adapter made {flat.shape[0]} vectors")
        embeds = embeds.masked_scatter(speech_mask[..., None], flat.to(embeds.dtype))
        return embeds, (keep[valid] if keep is not None else None), (speech, lengths), (adapted, lengths)

    def voice_rows_of(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The voice statistics rows [B, R, d] at the head of cached features, on the channel's device."""
        param = next(self.voice_channel.parameters())
        rows, _, _ = split_voice_rows(features.to(param.device), lengths.to(param.device), voice_rows(self.config))
        return rows

    def voice_vectors(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The voice channel's vectors [B, voice slots, d_llm] of cached features."""
        return self.voice_channel(self.voice_rows_of(features, lengths))

    def heard_voice(self, features: torch.Tensor, lengths: torch.Tensor) -> list[dict[str, dict[str, float]]]:
        """Per clip, what the voice channel's heads heard: attribute -> class -> probability
        (empty without named attributes)."""
        if self.voice_channel is None or not self.voice_channel.attributes:
            return [{} for _ in range(features.shape[0])]
        with torch.no_grad():
            post = self.voice_channel.posteriors(self.voice_rows_of(features, lengths))
        return [{a: {c: round(float(p[i, k]), 4) for k, c in enumerate(VOICE_ATTRIBUTES[a].labels)}
                 for a, p in post.items()} for i in range(features.shape[0])]

    def voice_heard(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Per row, whether the LLM reads the voice vectors: the voice gate's decision on the request
        before the speech (blsp.voice_gate); None: no gate, always."""
        if self.voice_channel is None or self.voice_channel.gate is None:
            return None
        prefixes = request_prefixes(input_ids, attention_mask, SPEECH_TOKEN_ID)
        opens = self._gate_decisions([p for p in prefixes if p is not None])
        return torch.tensor([p is not None and opens[p] for p in prefixes], device=input_ids.device)

    def voice_gate_opens(self, instruction: str) -> bool | None:
        """Whether the LLM reads the voice under `instruction` (a speech prompt's): the voice gate's
        decision; None: a model without a gate (it reads the voice wherever it has a channel)."""
        if self.voice_channel is None or self.voice_channel.gate is None:
            return None
        prefix = prompt_prefix(self.processor.speech_prompt(instruction))
        return self._gate_decisions([prefix])[prefix]

    def fit_voice_gate(self, requests: dict[tuple[int, ...], bool]) -> dict:
        """Fit the voice gate on request prefixes and whether each asks about the voice
        (blsp.voice_gate.fit_voice_gate; its log returned). Their decisions fill the cache: the
        requests fitted on (a run's own) are not judged again."""
        prefixes = list(requests)
        states = self._request_states(prefixes)
        gate = self.voice_channel.gate
        log = fit_voice_gate(gate, states, [requests[p] for p in prefixes])
        with torch.no_grad():
            self.voice_gate_cache = dict(zip(prefixes, (gate(states) > 0.5).tolist()))
        return log

    def _request_states(self, prefixes: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """The frozen LLM's states at the prefixes' ends (blsp.voice_gate.request_states), on the gate's device."""
        with self.lora_off():
            return request_states(self.language_model, prefixes).to(self.voice_channel.gate.state_mean.device)

    def _gate_decisions(self, prefixes: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], bool]:
        """The gate's decision on each request prefix, each distinct one judged once by the frozen LLM."""
        new = sorted({p for p in prefixes if p not in self.voice_gate_cache})
        if new:
            if is_sharded(self):  # one rank's extra forward would stall the others' all-gathers
                raise BlspError("the voice gate met a request it has not judged, with the LLM sharded (--fsdp); "
                                "train the gated voice channel without --fsdp")
            with torch.no_grad():
                opens = self.voice_channel.gate(self._request_states(new)) > 0.5
            self.voice_gate_cache.update(zip(new, opens.tolist()))
        return {p: self.voice_gate_cache[p] for p in prefixes}

    def _with_voice(self, features, feature_lengths, vectors, keep, lengths, heard=None):
        """The voice vectors beside each clip's word vectors (the reader's choice of those kept),
        before or after them (config.voice_place); `feature_lengths`: the cached features' rows,
        `lengths`: the word vectors'; `heard` (per row): where False the voice vectors are there but
        hidden (the voice gate closed)."""
        voice = self.voice_vectors(features, feature_lengths).to(vectors.dtype)
        n = voice.shape[1]
        if heard is not None and keep is None:
            keep = torch.ones(vectors.shape[:2], dtype=torch.bool, device=vectors.device)
        voice_keep = None if keep is None else (
            heard.to(keep.device)[:, None].expand(-1, n).to(keep.dtype) if heard is not None
            else keep.new_ones(keep.shape[0], n))
        if voice_place(self.config) == "before":
            if keep is not None:
                keep = torch.cat([voice_keep, keep], dim=1)
            return torch.cat([voice, vectors], dim=1), keep, lengths + n
        # after each row's own words, over its padding
        at = (lengths[:, None] + torch.arange(n, device=lengths.device)).long()
        out = torch.cat([vectors, vectors.new_zeros(vectors.shape[0], n, vectors.shape[2])], dim=1)
        out = out.scatter(1, at[..., None].expand(-1, -1, out.shape[2]), voice)
        if keep is not None:
            keep = torch.cat([keep, keep.new_ones(keep.shape[0], n)], dim=1).scatter(1, at, voice_keep)
        return out, keep, lengths + n

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_features: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
        return_target_logits: bool = False,
        shared_prefix: Sequence[int] = (),
        **_: Any,
    ) -> BlspOutput:
        if return_logits and shared_prefix:
            raise ValueError("return_logits needs every position's hidden state; do not pass shared_prefix")
        embeds, keep, speech, adapted = self._splice(input_ids, encoder_features, encoder_lengths, attention_mask)
        attention_mask = _hide_dropped_speech(attention_mask, input_ids, keep)
        with self.reading(input_ids):
            hidden = self.llm_hidden_states(embeds, attention_mask, shared_prefix)
        out = BlspOutput(speech=speech, adapted=adapted)
        if return_logits:
            out.logits = self.lm_logits(hidden)
        if labels is not None:
            logits, targets = self.target_logits(hidden, labels)
            out.loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
            out.n_tokens = torch.tensor(targets.numel(), device=hidden.device)
            out.loss = out.loss_sum / out.n_tokens.clamp(min=1)
            if return_target_logits:
                out.target_logits = logits
        return out

    def llm_hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                          shared_prefix: Sequence[int] = ()) -> torch.Tensor:
        """The LLM's last hidden states; positions come from the mask so padding takes none.

        `shared_prefix`: token ids that open every row (blsp.llm.run_decoder); their keys and
        values are computed once and reused. With LoRA acting on text the prefix's keys and
        values change as it trains, so they are computed every time; with the LLM sharded
        (`--fsdp`) every forward all-gathers on all ranks together, and the prefix cache would run
        one extra forward on whichever rank misses it, so it is off there too.
        """
        if (self.lora_gate is not None and self.lora_gate.acts_on_text) or is_sharded(self):
            shared_prefix = ()
        with attention_kernels():
            return run_decoder(self.language_model, embeds, attention_mask, self.prefix_cache, shared_prefix,
                               self.lora_off)

    def set_llm_checkpointing(self, enabled: bool) -> None:
        """Recompute each frozen LLM layer in the backward pass (blsp.llm.set_layer_checkpointing)."""
        set_layer_checkpointing(self.language_model, enabled, self._recompute_context)

    def _recompute_context(self):
        """The context an LLM layer's recomputation needs: the forward's attention kernels and the
        LoRA positions it was given (captured now, in the forward)."""
        gate = self.lora_gate
        state = gate.state() if gate is not None else None

        @contextlib.contextmanager
        def context():
            with attention_kernels(), gate.restored(state) if gate is not None else contextlib.nullcontext():
                yield

        return context

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.language_model, hidden)

    def target_logits(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return target_logits(self.language_model, hidden, labels)

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        audio: Any = None,
        instruction: str | None = None,
        messages: Sequence[Sequence[dict]] | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Follow an instruction on speech.

        `audio`: a path, a 16 kHz waveform, or a list of them (batched). Or `messages`: a list
        of conversations whose content parts may be `{"type": "audio", "audio": path|array}`.
        """
        from .inference import generate_batch

        return generate_batch(
            self, audio=audio, instruction=instruction, messages=messages, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, **generate_kwargs,
        )
