"""Speech sources: what the adapter reads, made from a clip's log-mel by frozen Whisper parts.

A source turns padded log-mel [B, n_mels, T] into states [B, S, d] and their lengths, once per
clip (`encode`, cached on disk as the clip's features under `feature_key`), and, in every step,
runs whatever part of it trains over those cached states (`finish`). Two are registered:

- `EncoderFrames` ("encoder", the paper): the Whisper encoder's frames at 50 Hz on the clip's
  actual length; optionally its top layers train with the adapter.
- `DecoderStates` ("decoder"): the hidden states of Whisper's own decoder along its greedy
  transcript, one per text token (as DeSTA2 reads Whisper's decoder): the words as Whisper
  recognised them, where an adapter trained on a few thousand clips recognises them poorly
  (docs/warm_start_probe.md).

A new source is a subclass here or in its own module, and one entry in `SPEECH_SOURCES`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

from .errors import BlspError, SpeechStatesError
from .voice_channel import has_voice_channel, prepend_voice_rows, voice_statistics
from .metrics import LOOP_COMPRESSION_RATIO, compression_ratio
from .whisper import encoder_output_lengths, greedy_decode, run_whisper_encoder, run_whisper_top

MEL_FRAMES_PER_SECOND = 100

# Whisper was trained on 30 s windows, speech then silence; given the speech alone it loops. The
# decoder reads the clip followed by as much silence again, in a window of at least 5 s (at most the
# 30 s one): on the demo's first 40 held-out clips 17% WER against 18% for the full window, at a
# quarter of its cost (673% unpadded); with twice the clip and no 5 s floor, 5 of the 16 shortest
# training clips (1.3-1.6 s) looped.
DECODER_CONTEXT = 2
DECODER_MIN_FRAMES = 500  # log-mel frames (100 a second)
WHISPER_WINDOW_FRAMES = 3000  # log-mel frames in Whisper's 30 s window
# Tokens decoded at most: as openai/whisper's sample_len (half the decoder's 448 positions), and
# 10 a second of speech (English runs at ~4), so that a clip Whisper loops on stops early.
DECODER_MAX_TOKENS = 224
DECODER_TOKENS_PER_SECOND = 10
# A clip Whisper decodes badly in its short window (the transcript repeats itself, or Whisper is
# unsure of it) is decoded again in the full 30 s window, as the cascade reads it: openai/whisper's
# fallback tests (transcribe's compression ratio and mean log-probability), with the window widened
# instead of the temperature raised. Real voices need it, TTS rarely: on 81 real human clips (`blsp
# data real`) the short window gave 32.2% WER (loops), the full one 10.6%, this 11.5% (15 clips
# decoded again); on the demo's 32 held-out TTS clips it decoded one again, at the short window's
# 4.7-9.3% WER. openai/whisper's own -1.0 decoded 7 of the 81 again, for 12.8%.
UNSURE_LOGPROB = -0.5


class SpeechSource(nn.Module):
    """Frozen parts from log-mel to the states the adapter reads. `audio_tower` is the Whisper
    encoder every source has (its config gives the mel bins and widths)."""

    name: ClassVar[str]
    needs_decoder: ClassVar[bool] = False  # whether loading must bring Whisper's decoder and tokenizer

    def __init__(self, config, audio_tower: WhisperEncoder, decoder: WhisperDecoder | None = None):
        super().__init__()
        self.config = config  # the BlspConfig (shared with the model: settings changed there show here)
        self.audio_tower = audio_tower

    @staticmethod
    def feature_key(config) -> str | None:
        """What this source's cached features are keyed by (`config` names a fingerprinted encoder)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached features of padded log-mel [B, n_mels, T]: ([B, S, d], lengths); with a voice
        channel, the clip's voice statistics head them (blsp.voice_channel)."""
        features, lengths, voice = self.encode_words(mel, mel_lengths)
        return (features, lengths) if voice is None else prepend_voice_rows(voice, features, lengths)

    def encode_words(self, mel: torch.Tensor, mel_lengths: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features [B, S, d], lengths, voice statistics [B, R, d] or None without a voice channel)."""
        raise NotImplementedError

    def voice_taps(self) -> dict[int, torch.Tensor] | None:
        """What `run_whisper_encoder` fills with the voice channel's layers (None: no channel)."""
        return dict.fromkeys(self.config.voice_layers) if has_voice_channel(self.config) else None

    def voice_statistics(self, taps: dict[int, torch.Tensor] | None, mel_lengths: torch.Tensor,
                         tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """The voice rows of clips whose encoder ran with `taps`, over the clips' own frames (not the
        silence a window adds); `tokens`: how many the source read, where it knows (speaking rate)."""
        if taps is None:
            return None
        frames = encoder_output_lengths(mel_lengths)
        return voice_statistics([taps[k] for k in sorted(taps)], frames, mel_lengths / MEL_FRAMES_PER_SECOND, tokens)

    def finish(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """What the adapter reads, from cached features: the parts that train run here."""
        return features

    def frozen_parts(self) -> dict[str, nn.Module]:
        return {"audio_tower": self.audio_tower}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint must hold for this source (those that train)."""
        return {}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise BlspError("this speech source trains no weights")


class EncoderFrames(SpeechSource):
    """The Whisper encoder's frames (50 Hz); its top `config.encoder_trainable_layers` may train."""

    name = "encoder"

    @staticmethod
    def feature_key(config) -> str | None:
        """The frozen encoder's fingerprint, and with trained top layers the layer whose input the
        features hold (the frozen part's output)."""
        first = config.first_trainable_encoder_layer
        return config.encoder_fingerprint if first is None else f"{config.encoder_fingerprint}-below-layer{first}"

    @torch.no_grad()
    def encode_words(self, mel: torch.Tensor, mel_lengths: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # With trained top layers, what is cached is the frozen part's output (`finish` runs the rest).
        taps = self.voice_taps()
        features, lengths = run_whisper_encoder(self.audio_tower, mel, mel_lengths,
                                                self.config.first_trainable_encoder_layer, taps)
        return features, lengths, self.voice_statistics(taps, mel_lengths)

    def finish(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        first = self.config.first_trainable_encoder_layer
        return features if first is None else run_whisper_top(self.audio_tower, features, lengths, first)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The encoder's top layers and final norm, when they train."""
        first = self.config.first_trainable_encoder_layer
        if first is None:
            return []
        return [p for part in (*self.audio_tower.layers[first:], self.audio_tower.layer_norm) for p in part.parameters()]

    def trained_state(self) -> dict[str, torch.Tensor]:
        first = self.config.first_trainable_encoder_layer
        if first is None:
            return {}
        return {k: v for k, v in self.audio_tower.state_dict().items()
                if k.startswith("layer_norm.") or (k.startswith("layers.") and int(k.split(".")[1]) >= first)}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.audio_tower.load_state_dict(state, strict=False)


class DecoderStates(SpeechSource):
    """Whisper's decoder's final hidden states along its greedy transcript: the state that chose
    each of its text tokens (a clip heard as silence: the one state that chose to end)."""

    name = "decoder"
    needs_decoder = True

    def __init__(self, config, audio_tower: WhisperEncoder, decoder: WhisperDecoder | None = None):
        super().__init__(config, audio_tower)
        if not config.decoder_ids:
            raise BlspError("speech states 'decoder' need Whisper's decoding ids (blsp.whisper.decoding_ids)")
        self.decoder = decoder if decoder is not None else WhisperDecoder(config.encoder_config)

    @property
    def output_weight(self) -> torch.Tensor:
        """Whisper's output projection (tied to its token embeddings): scores its tokens."""
        return self.decoder.embed_tokens.weight

    @staticmethod
    def feature_key(config) -> str | None:
        """The encoder's and decoder's fingerprints and how it decodes (prompt, window rule)."""
        how = [config.decoder_ids, "window per clip, text-token states", DECODER_CONTEXT, DECODER_MIN_FRAMES,
               DECODER_MAX_TOKENS, DECODER_TOKENS_PER_SECOND, "full window when unsure", LOOP_COMPRESSION_RATIO,
               UNSURE_LOGPROB]
        decoding = hashlib.sha1(json.dumps(how, sort_keys=True).encode()).hexdigest()[:8]
        return f"{config.encoder_fingerprint}-decoder-{config.decoder_fingerprint}-{decoding}"

    def frozen_parts(self) -> dict[str, nn.Module]:
        return {"audio_tower": self.audio_tower, "speech_decoder": self.decoder}

    @torch.no_grad()
    def encode_words(self, mel: torch.Tensor, mel_lengths: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lengths = [int(n) for n in mel_lengths.tolist()]
        widths = [decoder_window(n) for n in lengths]
        # Clips of one window width go together (the decoder attends to the whole window, so a
        # clip's states must not depend on what it was batched with).
        decoded: dict[int, _Decoded] = {}
        for width in sorted(set(widths)):
            decoded.update(self._decode(mel, mel_lengths, [i for i, w in enumerate(widths) if w == width], width))
        again = [i for i, d in decoded.items() if d.unsure and widths[i] < WHISPER_WINDOW_FRAMES]
        if again:
            decoded.update(self._decode(mel, mel_lengths, again, WHISPER_WINDOW_FRAMES))
        steps = torch.tensor([decoded[i].states.shape[0] for i in range(len(lengths))], device=mel.device)
        out = mel.new_zeros(len(lengths), int(steps.max()), self.output_weight.shape[1])
        for i, d in decoded.items():
            out[i, : d.states.shape[0]] = d.states
        voice = [decoded[i].voice for i in range(len(lengths))]
        return out, steps, (torch.stack(voice) if voice[0] is not None else None)

    def _decode(self, mel: torch.Tensor, mel_lengths: torch.Tensor, rows: list[int], width: int
                ) -> dict[int, _Decoded]:
        """Greedy decoding of the clips `rows` of the batch, each in a window of `width` frames."""
        weight, ids = self.output_weight, self.config.decoder_ids
        index = torch.tensor(rows, device=mel.device)
        windows = with_silence(mel[index], mel_lengths[index], width)
        taps = self.voice_taps()
        encoded, _ = run_whisper_encoder(self.audio_tower, windows, torch.full_like(index, width), taps=taps)
        limits = torch.tensor([decoder_token_limit(int(mel_lengths[i])) for i in rows], device=mel.device)
        tokens, states, _, sure = greedy_decode(self.decoder, weight, encoded, ids, limits)
        said = torch.tensor([len(t) for t in tokens], device=mel.device)
        stats = self.voice_statistics(taps, mel_lengths[index], said)
        # the states that chose the text's tokens; a clip heard as silence: the one that chose to end
        return {i: _Decoded(states[k, : max(len(tokens[k]), 1)], None if stats is None else stats[k],
                            repeats_itself(tokens[k]) or float(sure[k]) < UNSURE_LOGPROB)
                for k, i in enumerate(rows)}


def repeats_itself(tokens: list[int]) -> bool:
    """openai/whisper's loop test (gzip compression ratio above 2.4) on a transcript's token ids
    written out in decimal: the ids keep the text's repetitions (on 97 clips of real and TTS speech
    it flagged the same clips as the test on the text), and need no tokenizer here."""
    return compression_ratio(" ".join(map(str, tokens))) > LOOP_COMPRESSION_RATIO


class _Decoded(NamedTuple):
    """One clip's decoding: its states, its voice statistics (or None), and whether Whisper looped
    or was unsure of it (then it is decoded again in the full window)."""

    states: torch.Tensor
    voice: torch.Tensor | None
    unsure: bool


SPEECH_SOURCES: dict[str, type[SpeechSource]] = {"encoder": EncoderFrames, "decoder": DecoderStates}


def check_speech_states(speech_states: str) -> None:
    if speech_states not in SPEECH_SOURCES:
        raise BlspError(f"unknown speech states {speech_states!r}; known: {', '.join(SPEECH_SOURCES)}")


def build_speech_source(config, audio_tower: WhisperEncoder | None = None,
                        decoder: WhisperDecoder | None = None) -> SpeechSource:
    """The source `config.speech_states` names, around the given (or freshly built) Whisper parts."""
    audio_tower = audio_tower if audio_tower is not None else WhisperEncoder(config.encoder_config)
    return SPEECH_SOURCES[config.speech_states](config, audio_tower, decoder)


def decoder_tokenizer(name: str) -> Any:
    """Whisper's tokenizer, which the decoder-states source needs (its decoding ids, the token bridge)."""
    from .whisper import load_whisper_tokenizer

    return load_whisper_tokenizer(name, "speech states 'decoder' need", SpeechStatesError)


# ----------------------------------------------------------------------------------------------
# The decoding window
# ----------------------------------------------------------------------------------------------
def decoder_window(mel_length: int) -> int:
    """Log-mel frames of the window Whisper's decoder reads a clip of `mel_length` frames in: twice
    the clip, rounded up to whole seconds (so clips of similar length share a batch), 5-30 s."""
    frames = -(-mel_length * DECODER_CONTEXT // 100) * 100
    return min(max(frames, DECODER_MIN_FRAMES), WHISPER_WINDOW_FRAMES)


def decoder_token_limit(mel_length: int) -> int:
    """The most steps Whisper's decoder takes on a clip of `mel_length` frames."""
    return min(DECODER_MAX_TOKENS, DECODER_TOKENS_PER_SECOND * (mel_length // 100 + 1))


def with_silence(mel: torch.Tensor, mel_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Each clip's log-mel [B, n_mels, T] followed by the log-mel of digital silence, `width` frames
    in all. Whisper's log-mel floors every value at the clip's maximum less 8 (log10), and scales
    by (x + 4) / 4: silence is the clip's maximum less 2 (blsp.audio.log_mel_spectrogram)."""
    valid = torch.arange(mel.shape[-1], device=mel.device)[None, :] < mel_lengths[:, None]
    peak = mel.masked_fill(~valid[:, None, :], -torch.inf).amax(dim=(1, 2))
    out = (peak - 2.0)[:, None, None].expand(mel.shape[0], mel.shape[1], width).clone()
    keep = min(width, mel.shape[-1])
    out[..., :keep] = torch.where(valid[:, None, :keep], mel[..., :keep], out[..., :keep])
    return out
