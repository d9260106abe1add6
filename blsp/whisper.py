"""Greedy Whisper transcription, written out by hand.

Why: it is the ASR half of the cascade baseline and the check that a converted Whisper really
works. A short explicit loop (forced prefix, token suppression, KV cache, stop at
<|endoftext|>) is easier to trust than `generate`'s many Whisper-specific options.
"""

from __future__ import annotations

import numpy as np
import torch

from .convert import MULTILINGUAL_VOCAB_SIZE, special_token_id

SAMPLE_RATE = 16000
EOT, SOT, TRANSCRIBE, NO_TIMESTAMPS = "<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>"


def prompt_ids(model, tokenizer, language: str) -> list[int]:
    """The forced prefix. English-only models were trained without language and task tokens
    (as in openai/whisper); given <|transcribe|> anyway, tiny.en drops case and punctuation."""
    multilingual = model.config.vocab_size >= MULTILINGUAL_VOCAB_SIZE
    task = [f"<|{language}|>", TRANSCRIBE] if multilingual else []
    return [special_token_id(tokenizer, t) for t in [SOT, *task, NO_TIMESTAMPS]]


def suppressed(model, tokenizer) -> tuple[torch.Tensor, list[int]]:
    """(mask of tokens never emitted, tokens not emitted first).

    Every id from <|startoftranscript|> up (languages, tasks, timestamps) is text-free, so only
    text and <|endoftext|> remain; plus Whisper's own lists of non-speech symbols and, at the
    first step, blank and end-of-text.
    """
    mask = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    mask[special_token_id(tokenizer, SOT):] = True
    mask[list(model.generation_config.suppress_tokens or [])] = True
    return mask, list(model.generation_config.begin_suppress_tokens or [])


@torch.inference_mode()
def _transcribe_batch(model, tokenizer, features, audio: list[np.ndarray], language: str,
                      max_new_tokens: int) -> list[str]:
    # Whisper was trained on 30 s windows: unpadded input makes it loop, so pad to the window.
    mel = features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    encoded = model.get_encoder()(mel.to(model.device, model.dtype))
    eot = special_token_id(tokenizer, EOT)
    never, not_first = suppressed(model, tokenizer)
    prefix = prompt_ids(model, tokenizer, language)
    max_new_tokens = min(max_new_tokens, model.config.max_target_positions - len(prefix))

    inputs = torch.tensor([prefix] * len(audio), device=model.device)
    done = torch.zeros(len(audio), dtype=torch.bool, device=model.device)
    cache, generated = None, []
    for step in range(max_new_tokens):
        out = model(encoder_outputs=encoded, decoder_input_ids=inputs, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        logits[:, never.to(logits.device)] = -torch.inf
        if step == 0:
            logits[:, not_first] = -torch.inf
        token = logits.argmax(-1).masked_fill(done, eot)
        generated.append(token)
        done |= token == eot
        if done.all():
            break
        inputs = token[:, None]

    texts = []
    for row in torch.stack(generated, dim=1).tolist() if generated else [[] for _ in audio]:
        row = row[: row.index(eot)] if eot in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


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
