"""Inference: any instruction over speech, batched; and multi-turn chat.

Conversations use OpenAI-like content parts: `{"type": "text", "text": ...}` and
`{"type": "audio", "audio": <path | 16 kHz waveform>}`.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch

from .audio import AudioRef, load_audio
from .errors import BlspError
from .features import encode_waveforms
from .prompts import audio_part, text_part
from .processing import Example

# `generate` warns that with `inputs_embeds` the n-gram guard covers the answer only, not the
# prompt: that is what the loop guard is for, so the warning says nothing a user must act on.
warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")


def repetition_guard(no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0) -> dict[str, Any]:
    """Hugging Face `generate`'s guards against a small LLM's loops ("... in the public I'm going
    to have to get a to hold in the public I'm going to ..."), as keyword arguments: only those set,
    so that with neither greedy answers stay what they were. `no_repeat_ngram_size` N: no N-gram
    twice in an answer; `repetition_penalty` P > 1: tokens already in the prompt or the answer made
    less likely (P = 1: none). On the encoder path's larger demo model, zero-shot transcription WER 59.9% ->
    49.8% (N = 3) and 54.6% (P = 1.2) on 100 held-out clips (docs/warm_start_probe.md)."""
    if no_repeat_ngram_size < 0:
        raise BlspError(f"--no-repeat-ngram-size must be 0 (off) or more, not {no_repeat_ngram_size}")
    if not repetition_penalty > 0:
        raise BlspError(f"--repetition-penalty must be above 0 (1 is off), not {repetition_penalty}")
    guard: dict[str, Any] = {}
    if no_repeat_ngram_size:
        guard["no_repeat_ngram_size"] = no_repeat_ngram_size
    if repetition_penalty != 1.0:
        guard["repetition_penalty"] = repetition_penalty
    return guard


def decoding_record(guard: dict[str, Any]) -> dict[str, Any]:
    """How answers were decoded, for a report: greedy, with `repetition_guard`'s options if any."""
    return {"greedy": True, **guard}


def _as_waveform(audio: Any) -> np.ndarray:
    if isinstance(audio, (str, AudioRef)) or hasattr(audio, "__fspath__"):
        return load_audio(audio if isinstance(audio, AudioRef) else str(audio))
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    return np.asarray(audio, dtype=np.float32)


def split_conversation(conversation: Sequence[dict]) -> tuple[list[dict], list[Any]]:
    """Replace each audio part with a numbered slot; return the messages and the audio in order."""
    messages, audios = [], []
    for message in conversation:
        content = message["content"]
        if isinstance(content, str):
            messages.append(dict(message))
            continue
        parts = []
        for part in content:
            if part["type"] == "audio":
                parts.append(audio_part(len(audios)))
                audios.append(part)
            elif part["type"] == "text":
                parts.append(text_part(part["text"]))
            else:
                raise ValueError(f"unknown content part type {part['type']!r}")
        messages.append({"role": message["role"], "content": parts})
    return messages, audios


def conversation_examples(model, conversations: Sequence[Sequence[dict]]) -> list[Example]:
    """Render conversations and encode all their audio in one batched encoder pass.

    Parts that already carry `"features"` (encoder output, as a chat keeps for its history)
    are not encoded again.
    """
    rendered, parts = [], []
    for conv in conversations:
        messages, audios = split_conversation(conv)
        rendered.append(model.processor.prompt.render(messages))
        parts.append(audios)
    todo = [p for audios in parts for p in audios if "features" not in p]
    for part, feats in zip(todo, encode_waveforms(model, [_as_waveform(p["audio"]) for p in todo])):
        part["features"] = feats
    return [Example(pieces=pieces, features=[p["features"] for p in audios]) for pieces, audios in zip(rendered, parts)]


@torch.no_grad()
def generate_from_examples(model, examples: Sequence[Example], max_new_tokens: int = 64,
                           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                           **generate_kwargs: Any) -> list[str]:
    proc = model.processor
    batch = proc.collate(examples, padding_side="left")
    device = model.language_model.device
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    embeds, attention_mask = model.prepare_inputs(batch["input_ids"], batch["attention_mask"],
                                                  batch.get("encoder_features"), batch.get("encoder_lengths"))
    if not do_sample and not generate_kwargs:
        # Our greedy loop drops each answer from the batch once it ends: an evaluation batch whose
        # answers run 2 to 200 tokens no longer computes all of them for the longest one's steps.
        from .continuation import greedy_generate

        new = greedy_generate(model.language_model, batch["input_ids"], attention_mask, max_new_tokens,
                              proc.stop_ids(), inputs_embeds=embeds, prompt_scope=model.reading(batch["input_ids"]),
                              step_scope=lambda rows: model.answering(batch["input_ids"], rows))
        return [t.strip() for t in proc.tokenizer.batch_decode(new, skip_special_tokens=True)]
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    with model.reading(batch["input_ids"]):
        out = model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=proc.stop_ids(),
            pad_token_id=proc.pad_id,
            **sampling,
            **generate_kwargs,
        )
    return [t.strip() for t in proc.tokenizer.batch_decode(out, skip_special_tokens=True)]


def generate_batch(model, audio: Any = None, instruction: str | None = None,
                   messages: Sequence[Sequence[dict]] | None = None, **kwargs: Any) -> list[str]:
    """`model.generate`: an instruction over one clip or a list of clips, or whole conversations."""
    if messages is None:
        if audio is None:
            raise ValueError("give `audio` (with an `instruction`) or `messages`")
        clips = audio if isinstance(audio, (list, tuple)) else [audio]
        lead = [text_part(instruction)] if instruction else []
        messages = [[{"role": "user", "content": lead + [{"type": "audio", "audio": clip}]}] for clip in clips]
    return generate_from_examples(model, conversation_examples(model, messages), **kwargs)


def context_window(model) -> int:
    """Positions the LLM can attend over (prompt and answer together)."""
    return getattr(model.language_model.config, "max_position_embeddings", None) or 2048


def prompt_length(model, example: Example) -> int:
    """Tokens the prompt occupies in the LLM, each speech vector counting as one."""
    ids, _, _ = model.processor.sequence(example)
    return len(ids)


class ChatSession:
    """A multi-turn conversation whose history is trimmed to the LLM's context window.

    Whole oldest turns (a user message and its reply) are dropped first; the newest user turn is
    always kept, and if it alone does not fit, `send` refuses it.
    """

    def __init__(self, model, max_new_tokens: int = 128, system_prompt: str | None = None, **gen: Any):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.gen = gen
        self.history: list[dict] = []
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.context_window = context_window(model)

    def _length(self, example: Example) -> int:
        return prompt_length(self.model, example)

    def send(self, parts: list[dict]) -> str:
        # Copies, so the features the first encoding stores in each audio part stay with the
        # history and later turns do not encode that audio again.
        turn = {"role": "user", "content": [dict(p) for p in parts]}
        history = self.history + [turn]
        while True:
            example = conversation_examples(self.model, [self.system + history])[0]
            if self._length(example) + self.max_new_tokens <= self.context_window:
                break
            if len(history) <= 1:
                raise ValueError(
                    f"this message alone needs more than the LLM's context window "
                    f"({self.context_window} tokens with {self.max_new_tokens} for the answer)"
                )
            history = history[2:]  # drop the oldest user turn and its answer
        reply = generate_from_examples(self.model, [example], max_new_tokens=self.max_new_tokens, **self.gen)[0]
        self.history = history + [{"role": "assistant", "content": reply}]
        return reply
