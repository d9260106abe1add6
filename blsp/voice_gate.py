"""The voice gate: the voice channel's vectors only where the request asks about the voice.

Why: the frozen LLM reads whatever sits in its context. With the voice vectors beside the words,
SmolLM2-135M answered "What is the speaker saying?" with "The speaker is a man, talking at a normal
pace in a quiet room.", or answered in another style; six step-2 variants (LoRA at the voice vectors
only, the voice after the words, distillation under thirty other instructions) kept the voice and
lost the words-only model's answers (docs/voice.md, 2026-12-07 late). A small LLM does not learn to
ignore vectors it does not need; so the model decides for it, per request, before the LLM reads the
speech.

How: a logistic regression on the frozen LLM's last hidden state at the request's last token
before the speech (it has read the system prompt, any worked examples and the instruction; the
speech comes after the instruction in every prompt, blsp.prompts.speech_message). It is fitted at
step 2's start (`fit_voice_gate`) on the requests the run trains under, a question about the voice
or not, and on the phrasings below, so that other wordings of either kind land on the right side.
A closed gate hides the voice vectors from attention, and they take no position either
(BlspModel._hide_dropped_speech): the LLM reads exactly what a words-only model gives it. An open
gate reads the voice vectors as the voice channel places them.

Measured on the frozen SmolLM2 (2026-12-08, tests/test_voice_gate.py): fitted on
`labelled_requests`, it opened for 16 of 16 other wordings of a voice question and stayed closed
for the behaviour suite's five instructions and six other requests about the words; "What is the
sentiment (emotion) of the speaker?" opens it (the voice carries emotion; the channel names none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .prompts import task_instruction
from .voice import DESCRIBE_QUESTION, VOICE_ATTRIBUTES

# Requests about the voice beyond the questions step 1 asks (blsp.voice): other wordings, so that the
# gate learns the kind of request, not six sentences.
VOICE_REQUESTS: tuple[str, ...] = (
    "Describe the speaker's voice.",
    "What does the speaker's voice sound like?",
    "Is the speaker a man or a woman?",
    "Is the speaker speaking quickly or slowly?",
    "How high or low is the speaker's voice?",
    "Is the speaker whispering or talking out loud?",
    "Is there noise behind the speaker?",
    "Tell me about the voice, not the words.",
    "What kind of voice is this?",
    "Does the speaker have a deep voice?",
    "Is the recording quiet or noisy?",
    "Guess the speaker's gender from the voice.",
    "How loud is the background?",
    "Is the speaker's pace slow, normal or fast?",
)
# Requests about the words, several of them naming "the speaker", so that the gate does not open on
# that word alone. None is one of the behaviour suite's instructions (recipes/behaviour.yaml) nor a
# close paraphrase of one: tests/test_voice_gate.py checks the first.
WORD_REQUESTS: tuple[str, ...] = (
    "Answer the speaker's question in one sentence.",
    "Reply to the speaker.",
    "Does the speaker mention a number? Answer yes or no.",
    "Which places does the speaker name?",
    "Who does the speaker talk about?",
    "Does the speaker ask a question? Answer yes or no.",
    "Repeat the speaker's last word.",
    "Is the speaker giving advice? Answer yes or no.",
    "Explain what the speaker means.",
    "Correct any grammar mistakes in the following.",
    "Write a headline for the following.",
    "Paraphrase the following.",
)


def labelled_requests(instruction: str) -> list[tuple[str, bool]]:
    """The requests every gate is fitted on, (text, about the voice): the questions step 1 asks
    about the voice and VOICE_REQUESTS; WORD_REQUESTS, step 2's `instruction` (the continuation's)
    and transcription's. Step 2 adds the requests it trains under (blsp.trainer)."""
    return ([(a.question, True) for a in VOICE_ATTRIBUTES.values()] + [(DESCRIBE_QUESTION, True)]
            + [(text, True) for text in VOICE_REQUESTS] + [(text, False) for text in WORD_REQUESTS]
            + [(instruction, False), (task_instruction("transcribe"), False)])


GATE_L2 = 1e-2  # weight decay of the logistic regression, on standardised states
GATE_STEPS = 200  # L-BFGS iterations; a few dozen requests x the LLM's width converge in well under a second


class VoiceGate(nn.Module):
    """P(the request asks about the voice) from the LLM's state at the request's end [.., d_llm]."""

    def __init__(self, d_llm: int):
        super().__init__()
        self.register_buffer("state_mean", torch.zeros(d_llm))
        self.register_buffer("state_std", torch.ones(d_llm))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.linear = nn.Linear(d_llm, 1)
        self.linear.requires_grad_(False)  # fitted on labelled requests, not moved by the LM loss

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        z = (states.float() - self.state_mean) / self.state_std
        return torch.sigmoid(self.linear(z.to(self.linear.weight.dtype)).float().squeeze(-1))


def request_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor, speech_token_id: int
                     ) -> list[tuple[int, ...] | None]:
    """Per row, the attended token ids before its first speech slot (None: a row without speech)."""
    out: list[tuple[int, ...] | None] = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        if speech_token_id not in ids:
            out.append(None)
            continue
        first = ids.index(speech_token_id)
        out.append(tuple(t for t, m in zip(ids[:first], mask[:first]) if m))
    return out


def prompt_prefix(pieces: Sequence) -> tuple[int, ...]:
    """A rendered speech prompt's token ids before its first audio slot (blsp.prompts pieces):
    what `request_prefixes` finds in the batch that the prompt becomes."""
    out: list[int] = []
    for piece in pieces:
        if not isinstance(piece, list):  # an AudioSlot
            break
        out.extend(piece)
    return tuple(out)


@torch.no_grad()
def request_states(language_model: nn.Module, prefixes: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
    """The LLM's last-layer hidden state at each prefix's last token [N, d_llm] (float32)."""
    device = next(language_model.parameters()).device
    out = []
    for start in range(0, len(prefixes), batch_size):
        chunk = prefixes[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, p in enumerate(chunk):  # right-padded: each row's positions start at 0
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        hidden = language_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                output_hidden_states=True).hidden_states[-1]
        last = mask.sum(1).to(device) - 1
        out.append(hidden[torch.arange(len(chunk), device=device), last].float().cpu())
    return torch.cat(out)


def fit_voice_gate(gate: VoiceGate, states: torch.Tensor, about_voice: Sequence[bool]) -> dict:
    """Fit the gate by L2-regularised logistic regression on request states [N, d] and whether each
    request asks about the voice, the two kinds weighted equally. Returns the fit's log."""
    y = torch.tensor([float(v) for v in about_voice])
    n_voice = int(y.sum())
    if not 0 < n_voice < len(y):
        raise ValueError(f"the voice gate needs requests of both kinds; got {n_voice} about the voice of {len(y)}")
    x = states.float()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-3)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    balance = torch.tensor((len(y) - n_voice) / n_voice)
    opt = torch.optim.LBFGS([weight, bias], max_iter=GATE_STEPS, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        loss = (nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y, pos_weight=balance)
                + GATE_L2 / 2 * weight.pow(2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    with torch.no_grad():
        gate.state_mean.copy_(mean)
        gate.state_std.copy_(std)
        gate.linear.weight.copy_(weight.detach()[None, :])
        gate.linear.bias.copy_(bias.detach()[None])
        gate.fitted.fill_(True)
        accuracy = float(((gate(x) > 0.5).float() == y).float().mean())
    return {"requests": len(y), "about_voice": n_voice, "train_accuracy": round(accuracy, 4)}
