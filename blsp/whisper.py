"""Whisper: loading it, its encoder on a clip's actual length, and greedy transcription.

The encoder runs without the 30 s padding HF insists on (most of the original's training time
went into encoding padding). Greedy decoding is written out by hand: it is the ASR half of the
cascade baseline, the check that a converted Whisper really works, and what the decoder-states
speech source reads; a short explicit loop (forced prefix, token suppression, KV cache, stop at
<|endoftext|>) is easier to trust than `generate`'s many Whisper-specific options.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .convert import MULTILINGUAL_VOCAB_SIZE, special_token_id
from .errors import BlspError
from .llm import cache_argument, cache_of

SAMPLE_RATE = 16000
EOT, SOT, TRANSCRIBE, NO_TIMESTAMPS = "<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>"


AUTO = "auto"  # the language: Whisper's own guess, clip by clip


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_whisper(name: str, torch_dtype: torch.dtype = torch.float32):
    """A frozen WhisperForConditionalGeneration (packaged name, local dir or hub id), in eval mode."""
    from transformers import WhisperForConditionalGeneration

    from .packaged import resolve

    path = resolve(name)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
    except OSError as err:
        raise BlspError(f"cannot load the speech encoder {name!r}: {err}") from None
    return model.requires_grad_(False).eval()


def load_whisper_tokenizer(name: str, purpose: str = "cannot load", error: type[BlspError] = BlspError) -> Any:
    """The tokenizer beside a Whisper checkpoint, checked to be a Whisper tokenizer; else `error`
    saying "{purpose} Whisper's tokenizer beside NAME (PATH): why"."""
    from transformers import AutoTokenizer

    from .packaged import resolve

    path = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        special_token_id(tokenizer, SOT)  # a Whisper tokenizer at all
    except (OSError, ValueError, KeyError, BlspError) as err:
        raise error(f"{purpose} Whisper's tokenizer beside {name!r} ({path}): {err}") from None
    return tokenizer


# ----------------------------------------------------------------------------------------------
# The encoder on the clip's actual length
# ----------------------------------------------------------------------------------------------
def mask_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero frames past each length ([B, T, C]) so convolutions see exactly what an unbatched,
    zero-padded clip would: batching then never changes a clip's output."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x * keep[..., None].to(x.dtype)


def encoder_output_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
    """Whisper's conv2 has stride 2: 100 mel frames a second become 50 encoder frames."""
    return (mel_lengths - 1) // 2 + 1


def run_whisper_encoder(
    encoder: WhisperEncoder, mel: torch.Tensor, mel_lengths: torch.Tensor, stop: int | None = None,
    taps: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper's encoder without the 30 s padding.

    Slices the positional embedding to the actual length. Padded frames are zeroed before each
    conv and masked as keys in attention, so a clip's frames do not depend on what it was batched
    with. `mel`: [B, n_mels, T] (T <= 3000), `mel_lengths`: [B]. Returns ([B, T', d], lengths).
    `stop`: run only the layers before it and return their hidden state (no final norm): the
    frozen part of an encoder whose top layers train (`run_whisper_top` runs the rest).
    `taps`: a dict whose keys name layers (1-based: the output of the k-th layer); it is filled with
    their hidden states [B, T', d] (the voice channel's input: blsp.voice_channel).
    """
    if mel.shape[-1] > encoder.config.max_source_positions * 2:
        raise ValueError("mel input longer than 30 s: split it first (blsp.audio.split_for_encoder)")
    x = mask_padding(mel.transpose(1, 2), mel_lengths).transpose(1, 2)
    x = F.gelu(encoder.conv1(x))
    x = mask_padding(x.transpose(1, 2), mel_lengths).transpose(1, 2)
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)
    lengths = encoder_output_lengths(mel_lengths)
    x = x + encoder.embed_positions.weight[: x.shape[1]].to(x.dtype)
    x = run_whisper_layers(encoder, x, lengths, 0, stop, taps)
    return (x if stop is not None else encoder.layer_norm(x)), lengths


def run_whisper_top(encoder: WhisperEncoder, hidden: torch.Tensor, lengths: torch.Tensor,
                    start: int) -> torch.Tensor:
    """The encoder's layers from `start` on and its final norm, over the hidden state before them."""
    return encoder.layer_norm(run_whisper_layers(encoder, hidden, lengths, start, None))


def run_whisper_layers(encoder: WhisperEncoder, x: torch.Tensor, lengths: torch.Tensor, start: int,
                       stop: int | None, taps: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
    mask = mask.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
    for number, layer in enumerate(encoder.layers[start:stop], start=start + 1):
        x = layer(x, mask)
        x = x[0] if isinstance(x, tuple) else x
        if taps is not None and number in taps:
            taps[number] = x
    return x


# ----------------------------------------------------------------------------------------------
# Greedy decoding
# ----------------------------------------------------------------------------------------------


def is_multilingual(model) -> bool:
    return model.config.vocab_size >= MULTILINGUAL_VOCAB_SIZE


def prompt_ids(model, tokenizer, language: str) -> list[int]:
    """The forced prefix. English-only models were trained without language and task tokens
    (as in openai/whisper); given <|transcribe|> anyway, tiny.en drops case and punctuation.
    `language` "auto": the prefix without its language token (`decoding_ids` says where it goes)."""
    if not is_multilingual(model):
        return [special_token_id(tokenizer, t) for t in [SOT, NO_TIMESTAMPS]]
    chosen = [] if language == AUTO else [f"<|{language}|>"]
    return [special_token_id(tokenizer, t) for t in [SOT, *chosen, TRANSCRIBE, NO_TIMESTAMPS]]


def language_token_ids(tokenizer) -> list[int]:
    """The ids of the language tokens (<|en|>, <|zh|>, ...) the tokenizer has."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = (tokenizer.convert_tokens_to_ids(f"<|{code}|>") for code in LANGUAGES)
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def decoding_ids(model, tokenizer, language: str = "en") -> dict:
    """What greedy decoding needs of the tokenizer and generation config, as plain ids (a BlspModel
    that reads Whisper's decoder states keeps this dict in its config, with no tokenizer at hand):
    the forced prefix, end-of-text, the first text-free id (<|startoftranscript|>: every id from it
    up, languages, tasks and timestamps, is never emitted), Whisper's lists of non-speech symbols
    never emitted, and those not emitted first (blank, end-of-text). With `language` "auto" on a
    multilingual Whisper, `languages`: the language tokens, one of which Whisper picks for each
    clip after <|startoftranscript|> (as openai/whisper's detect_language)."""
    if not is_multilingual(model) and language not in ("en", AUTO):
        raise BlspError(f"language {language!r}: this Whisper is English-only (no language tokens); use a "
                        "multilingual one (whisper-base) or 'en'")
    detect = language == AUTO and is_multilingual(model)
    return {"prompt": prompt_ids(model, tokenizer, language),
            "languages": language_token_ids(tokenizer) if detect else [],
            "eot": special_token_id(tokenizer, EOT),
            "first_special": special_token_id(tokenizer, SOT),
            "suppress": [int(t) for t in model.generation_config.suppress_tokens or []],
            "begin_suppress": [int(t) for t in model.generation_config.begin_suppress_tokens or []]}


def never_emitted(output_weight: torch.Tensor, ids: dict) -> torch.Tensor:
    """[vocab] bool: the tokens greedy decoding never emits (special tokens, Whisper's suppressed symbols)."""
    never = torch.zeros(output_weight.shape[0], dtype=torch.bool, device=output_weight.device)
    never[ids["first_special"]:] = True
    never[ids["suppress"]] = True
    return never


class GreedyDecoding(NamedTuple):
    """What `greedy_decode` gives for a batch."""

    tokens: list[list[int]]  # each row's text tokens, end-of-text excluded
    states: torch.Tensor  # [B, S, d]: the decoder's final hidden state at every step
    steps: torch.Tensor  # [B]: each row's steps, the one that chose end-of-text included
    # [B]: each row's mean log-probability of what it chose over its steps (end-of-text included):
    # openai/whisper's avg_logprob, how sure Whisper is of its transcript
    mean_logprob: torch.Tensor


@torch.inference_mode()
def greedy_decode(decoder, output_weight: torch.Tensor, encoded: torch.Tensor, ids: dict,
                  max_new_tokens: int | torch.Tensor) -> GreedyDecoding:
    """Greedy decoding of a batch of encoder outputs `encoded` [B, T, d] by Whisper's `decoder`
    (a WhisperDecoder; `output_weight` its tied output projection, [vocab, d]); `max_new_tokens`
    one limit for all rows or each row's own ([B]), so that a row's result never depends on its batch.

    Returns a `GreedyDecoding`. Step k's state is the one that chose token k (the first from the forced prefix's last token).
    With `ids["languages"]`, each row's language token is Whisper's likeliest of them after the
    prefix's first token, and goes in right after it.
    """
    eot = ids["eot"]
    never = never_emitted(output_weight, ids)
    batch = encoded.shape[0]
    languages = ids.get("languages") or []
    room = decoder.config.max_target_positions - len(ids["prompt"]) - bool(languages)
    limits = torch.as_tensor(max_new_tokens, device=encoded.device).clamp(max=room).expand(batch)

    inputs = torch.tensor([ids["prompt"]] * batch, device=encoded.device)
    cache = None
    if languages:  # <|startoftranscript|> alone first: its state scores the languages
        first = decoder(input_ids=inputs[:, :1], encoder_hidden_states=encoded, use_cache=True)
        cache = cache_of(first)
        candidates = torch.tensor(languages, device=encoded.device)
        scores = first.last_hidden_state[:, -1] @ output_weight[candidates].T
        inputs = torch.cat([candidates[scores.argmax(-1)][:, None], inputs[:, 1:]], dim=1)
    done = torch.zeros(batch, dtype=torch.bool, device=encoded.device)
    steps = torch.zeros(batch, dtype=torch.long, device=encoded.device)
    sum_logprob = torch.zeros(batch, device=encoded.device)
    generated, states = [], []
    for step in range(int(limits.max())):
        out = decoder(input_ids=inputs, encoder_hidden_states=encoded, use_cache=True,
                      **cache_argument(decoder, cache))
        cache = cache_of(out)
        hidden = out.last_hidden_state[:, -1]
        logits = (hidden @ output_weight.T).float()
        logits[:, never] = -torch.inf
        if step == 0:
            logits[:, ids["begin_suppress"]] = -torch.inf
        token = logits.argmax(-1).masked_fill(done, eot)
        chosen = logits.log_softmax(-1).gather(1, token[:, None])[:, 0]
        sum_logprob += chosen.masked_fill(done, 0.0)
        steps += ~done
        generated.append(token)
        states.append(hidden)
        done |= (token == eot) | (steps >= limits)
        if done.all():
            break
        inputs = token[:, None]

    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(batch)]
    tokens = [row[: row.index(eot)] if eot in row else row for row in rows]
    hidden = torch.stack(states, dim=1) if states else encoded.new_zeros(batch, 0, encoded.shape[-1])
    return GreedyDecoding(tokens, hidden, steps, sum_logprob / steps.clamp(min=1))


def _transcribe_batch(model, tokenizer, features, audio: list[np.ndarray], language: str,
                      max_new_tokens: int) -> list[str]:
    # Whisper was trained on 30 s windows: unpadded input makes it loop, so pad to the window.
    mel = features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.inference_mode():
        encoded = model.get_encoder()(mel.to(model.device, model.dtype)).last_hidden_state
    tokens = greedy_decode(model.get_decoder(), model.proj_out.weight, encoded,
                           decoding_ids(model, tokenizer, language), max_new_tokens).tokens
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]


def transcribe(model, tokenizer, audio_list: list[np.ndarray], language: str = "en", batch_size: int = 8,
               max_new_tokens: int = 128) -> list[str]:
    """Greedy transcripts of 16 kHz float32 mono clips (each at most 30 s), in input order."""
    from transformers import WhisperFeatureExtractor

    features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    texts: list[str] = []
    for start in range(0, len(audio_list), batch_size):
        batch = [np.asarray(a, dtype=np.float32) for a in audio_list[start:start + batch_size]]
        texts += _transcribe_batch(model, tokenizer, features, batch, language, max_new_tokens)
    return texts
