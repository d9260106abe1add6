"""`BlspConfig`: the encoder's and the LLM's configs nested, and which parts sit between them.

The parts are chosen once, from this config, when the model is built (blsp.modeling): the speech
source (`speech_states`, blsp.speech_sources), the adapter (`adapter_type`, blsp.adapters) and the
speech reader (`speech_compression`, `speech_vectors`: blsp.readers). A saved checkpoint's
config.json names (and fingerprints) the backbones it was trained against.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .adapters import check_adapter_type
from .errors import BlspError
from .readers.bridge import check_bridge_adapter
from .speech_sources import SPEECH_SOURCES, check_speech_states
from .voice_channel import check_voice_place, check_voice_settings, default_voice_layers, has_voice_channel

COMPRESSIONS = (None, "ctc")
SPEECH_VECTORS = ("adapter", "tokens")


def reads_tokens(speech_vectors: str, speech_states: str) -> bool:
    """Whether Whisper's decoder states are read through the token bridge (blsp.readers.bridge)."""
    return speech_states == "decoder" and speech_vectors == "tokens"


def tokens_unreadable(speech_vectors: str, speech_compression: str | None, speech_states: str) -> bool:
    """Token vectors come from a CTC head's token runs or from Whisper's decoder states: without
    either there is nothing to read as tokens."""
    return speech_vectors == "tokens" and speech_compression != "ctc" and speech_states != "decoder"


def check_speech_vectors(speech_vectors: str, speech_compression: str | None, speech_states: str = "encoder") -> None:
    if speech_vectors not in SPEECH_VECTORS:
        raise BlspError(f"unknown speech vectors {speech_vectors!r}; known: {', '.join(SPEECH_VECTORS)}")
    if tokens_unreadable(speech_vectors, speech_compression, speech_states):
        raise BlspError("speech vectors 'tokens' are read through the CTC head or Whisper's decoder: they need "
                        "speech compression 'ctc' or speech states 'decoder'")


def check_bridge_confidence(confidence: float | None) -> None:
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise BlspError(f"bridge confidence {confidence}: a posterior, between 0 and 1 (0: every token as itself)")


def initial_speech_vectors(speech_states: str, speech_vectors: str) -> str:
    """The speech vectors a new model is built with: over decoder states the token bridge needs no
    training; over encoder frames token-run vectors need the CTC head training enables later."""
    return speech_vectors if speech_states == "decoder" else "adapter"


def _as_config(value: Any) -> PretrainedConfig | None:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    value = dict(value)
    return AutoConfig.for_model(value.pop("model_type"), **value)


class BlspConfig(PretrainedConfig):
    """Nests the encoder's and the LLM's configs; names and fingerprints them."""

    model_type = "blsp"

    def __init__(
        self,
        encoder_config: Any = None,
        llm_config: Any = None,
        adapter_type: str = "conv",
        adapter_bottleneck: int = 512,
        adapter_downsample: int = 8,
        encoder_name: str | None = None,
        llm_name: str | None = None,
        encoder_fingerprint: str | None = None,
        llm_fingerprint: str | None = None,
        system_prompt: str | None = None,
        speech_compression: str | None = None,
        ctc_vocab: list[int] | None = None,
        speech_vectors: str = "adapter",
        lora: dict | None = None,
        encoder_trainable_layers: int = 0,
        speech_states: str = "encoder",
        decoder_ids: dict | None = None,
        decoder_fingerprint: str | None = None,
        speech_language: str | None = None,
        bridge_fingerprint: str | None = None,
        bridge_confidence: float | None = None,
        bridge_transcript: bool = False,
        voice_vectors: int = 0,
        voice_layers: list[int] | None = None,
        voice_attributes: list[str] | None = None,
        voice_place: str = "before",
        voice_gate: bool = False,
        **kwargs: Any,
    ):
        self.encoder_config = _as_config(encoder_config)
        self.llm_config = _as_config(llm_config)
        check_adapter_type(adapter_type)
        self.adapter_type = adapter_type
        self.adapter_bottleneck = adapter_bottleneck
        self.adapter_downsample = adapter_downsample  # speech states per speech vector (encoder frames: 50 Hz)
        self.encoder_name, self.llm_name = encoder_name, llm_name
        self.encoder_fingerprint, self.llm_fingerprint = encoder_fingerprint, llm_fingerprint
        self.system_prompt = system_prompt
        if speech_compression not in COMPRESSIONS:
            raise BlspError(f"unknown speech compression {speech_compression!r}; known: ctc")
        # "ctc": the CTC head over `ctc_vocab` (LLM token ids) decides which speech vectors the
        # LLM sees (blsp.readers.ctc); None: it sees all of them, as in the paper.
        self.speech_compression, self.ctc_vocab = speech_compression, ctc_vocab
        check_speech_vectors(speech_vectors, speech_compression, speech_states)
        # "adapter": the LLM reads the adapter's vectors (the paper); "tokens": each CTC token run
        # becomes the mix of the LLM's own token embeddings that the head's posterior gives it, or
        # with speech states "decoder" each decoder state the mix of the LLM embeddings of Whisper's
        # likeliest tokens (blsp.readers.bridge), plus the adapter's vector as a learned correction.
        self.speech_vectors = speech_vectors
        # LoRA on the LLM (blsp.lora.LoraSettings as a dict), or None: the LLM frozen, as in the paper.
        self.lora = dict(lora) if lora else None
        # The encoder's top N layers (and its final norm) train with the adapter; 0: all frozen (the paper).
        self.encoder_trainable_layers = encoder_trainable_layers
        check_speech_states(speech_states)
        if speech_states == "decoder" and not decoder_ids:
            raise BlspError("speech states 'decoder' need Whisper's decoding ids (blsp.whisper.decoding_ids)")
        if reads_tokens(speech_vectors, speech_states):
            check_bridge_adapter(adapter_type, adapter_downsample)
        self.speech_states = speech_states
        # "decoder": what Whisper's decoder is prompted and stopped with (its tokenizer's ids, kept
        # here so that a saved model decodes without it) and the fingerprint of its weights.
        self.decoder_ids = dict(decoder_ids) if decoder_ids else None
        self.decoder_fingerprint = decoder_fingerprint
        # "decoder": the language Whisper transcribes in ("en", ...), or "auto": its guess per clip
        self.speech_language = speech_language
        self.bridge_fingerprint = bridge_fingerprint  # which LLM tokens stand for each of Whisper's
        check_bridge_confidence(bridge_confidence)
        # the token bridge reads a state as its greedy token's own embedding where Whisper's posterior
        # of it is at least this (blsp.readers.bridge); None: the posterior mix everywhere
        self.bridge_confidence = bridge_confidence
        # the token bridge reads Whisper's greedy transcript as the LLM's tokenizer splits it (as the
        # cascade feeds it), each token plus the correction of the state that holds it
        # (blsp.readers.bridge.TranscriptTokens); False: one vector per Whisper token
        self.bridge_transcript = bool(bridge_transcript)
        # The voice channel (blsp.voice_channel): this many vectors of how the voice sounds, read
        # before the words, from statistics of the encoder's hidden states after `voice_layers`
        # (1-based), and one more per `voice_attributes` (blsp.voice: "gender", "rate", ...) that
        # names what its classifier heard; 0 and none: the LLM hears only the words (the paper's path).
        layers = self.encoder_config.encoder_layers if self.encoder_config is not None else None
        hears = bool(voice_vectors or voice_attributes)
        if hears and not voice_layers and layers is not None:
            voice_layers = list(default_voice_layers(layers))
        self.voice_vectors = int(voice_vectors)
        self.voice_layers = [int(k) for k in voice_layers] if hears and voice_layers else None
        self.voice_attributes = list(voice_attributes) if voice_attributes else None
        # "before" the words (the first voice models) or "after" them: then every word's state is
        # the words-only model's, and the voice vectors read the instruction and the words
        check_voice_place(voice_place)
        self.voice_place = voice_place
        # the LLM reads the voice vectors only where the request asks about the voice, a classifier
        # of the request deciding (blsp.voice_gate); False: always (the first voice models)
        self.voice_gate = bool(voice_gate)
        super().__init__(**kwargs)
        check_voice_settings(self.voice_vectors, self.voice_layers, layers,
                             self.first_trainable_encoder_layer if layers is not None else None,
                             self.voice_attributes)
        if self.voice_gate and not hears:
            raise BlspError("the voice gate decides where the LLM reads the voice channel: give the model one "
                            "(--voice-vectors N or --voice-attributes NAMES)")

    @property
    def first_trainable_encoder_layer(self) -> int | None:
        """The encoder layer from which on it trains, or None when it is frozen whole."""
        n = self.encoder_trainable_layers
        return self.encoder_config.encoder_layers - n if n else None

    @property
    def feature_key(self) -> str | None:
        """What cached features are keyed by: whatever decides the speech source's output (None: a
        model with no encoder fingerprint, whose features cannot be cached under a name)."""
        if self.encoder_fingerprint is None:
            return None
        key = SPEECH_SOURCES[self.speech_states].feature_key(self)
        # the voice statistics head every clip's features (blsp.voice_channel)
        return f"{key}-voice{'.'.join(map(str, self.voice_layers))}" if has_voice_channel(self) else key

    @property
    def reads_token_bridge(self) -> bool:
        """Whether the LLM reads decoder states through the token bridge (blsp.readers.bridge)."""
        return reads_tokens(self.speech_vectors, self.speech_states)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("encoder_config", "llm_config"):
            if isinstance(getattr(self, key), PretrainedConfig):
                out[key] = getattr(self, key).to_dict()
        return out
