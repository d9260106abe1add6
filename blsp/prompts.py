"""Prompts: the instruction table and the splicing of speech into an LLM's chat template.

A prompt is rendered into *pieces*: runs of token ids and audio slots. Each content part of a
message (a text part, a transcript, an audio clip) is tokenized on its own, so the tokens around
a slot are the same whether the slot holds speech vectors or the transcript's tokens. That is
what makes the text-conditioned teacher (step 1, KD) and the speech-conditioned student line up
token for token outside the slot.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Sequence, Union

# The exact instruction of the paper's step 1.
CONTINUATION_INSTRUCTION = (
    "Continue the following text in a coherent and engaging style with less than 40 words."
)

# One table for the CLI, evals and serving. `{language}` is filled by `task_instruction`.
TASK_INSTRUCTIONS: dict[str, str] = {
    "continue": CONTINUATION_INSTRUCTION,
    # Transcription is in the speech's own language: no {language}. The paper's "Please transcribe
    # the following audio into English text." had SmolLM2 answer the words, not write them down:
    # given the transcripts themselves as text, 165% WER on 10 sentences (see TASK_DEMONSTRATIONS).
    "transcribe": "Write down the following speech word for word, and nothing else.",
    "translate": "Please translate the following audio into {language} text.",
    "sentiment": "What is the sentiment of the speaker? Answer with one word: positive, negative or neutral.",
    "emotion": "What is the emotion of the speaker? Answer with one word: neutral, happy, sad, angry or surprised.",
    "chat": "",  # free conversation: the speech is the user's whole message
}


# Worked examples of a task, rendered as earlier turns of the conversation before the user's turn
# (the LLM's instruction, the example, and the example itself as the answer): a small LLM answers or
# continues what it is told to write down. SmolLM2-135M-Instruct given the transcripts of 30
# held-out demo sentences as text: 3.6% WER after one example, 0.8% after these two (one sentence
# off), 13% for "Transcribe ... word for word" with one, 37% with the paper's instruction alone.
# Each example is a string the LLM writes back as it is. They are the same for the speech and the
# text path (both render through `ChatPrompt.render`), so the teacher and student still line up.
TASK_DEMONSTRATIONS: dict[str, tuple[str, ...]] = {
    "transcribe": ("Good morning, everyone.", "Where did you put the keys?"),
}


@dataclass(frozen=True)
class PlainTextFormat:
    """How a prompt is written for an LLM that ships no chat template (a base model, such as
    Gemma 3 270M): the dialogue as plain text, the way base models met dialogues in pretraining.

        {system}\n\nUser: {instruction} {transcript or speech}\nAssistant: {reply}\n

    A reply is one paragraph: it ends at its first line break, the end of turn a base model writes
    by itself (it never writes an end-of-turn token, nor, mostly, its eos). Measured on Gemma 3
    270M, greedy, four instructions (continue, translate German, summarise, sentiment): with this
    format it translates and continues; with the BLSP repository's `###[Human]:...###[Assistant]:`
    it repeated the instruction or the text in all four.
    """

    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant:"
    reply_prefix: str = " "  # the reply's own first character: base models write ": The", not ":The"
    turn_end: str = "\n"


PLAIN_TEXT_FORMAT = PlainTextFormat()

# Marks a content part's boundary inside the rendered template; private-use code points so no
# real text contains them.
_SLOT = "\ue000{}\ue001"


def task_instruction(task: str, language: str = "English") -> str:
    if task not in TASK_INSTRUCTIONS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(sorted(TASK_INSTRUCTIONS))}")
    return TASK_INSTRUCTIONS[task].format(language=language)


def demonstration_turns(instruction: str) -> list[dict]:
    """The worked examples of the task whose instruction (in any language) this is, as a user turn
    and its answer each (TASK_DEMONSTRATIONS); none for any other instruction."""
    for task, examples in TASK_DEMONSTRATIONS.items():
        head, _, tail = TASK_INSTRUCTIONS[task].partition("{language}")
        if instruction.startswith(head) and instruction.endswith(tail) and len(instruction) >= len(head) + len(tail):
            return [turn for example in examples for turn in (
                {"role": "user", "content": f"{instruction} {example}"}, {"role": "assistant", "content": example})]
    return []


def label_instruction(field: str, labels: Sequence[str]) -> str:
    """The question of a classification task over a label set, in the form of the table's
    `sentiment` and `emotion` rows (which it reproduces for their fields and label sets)."""
    names = list(labels)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    answer = "one word" if all(len(n.split()) == 1 for n in names) else "one of"
    return f"What is the {field.replace('_', ' ')} of the speaker? Answer with {answer}: {listed}."


@dataclass(frozen=True)
class AudioSlot:
    """Where the k-th audio clip of a prompt goes."""

    index: int


Piece = Union[list[int], AudioSlot]


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def audio_part(index: int) -> dict:
    return {"type": "audio", "index": index}


def speech_message(instruction: str, audio_index: int = 0) -> list[dict]:
    """A user turn: the instruction, then the speech where the paper put the transcript."""
    parts = [text_part(instruction)] if instruction else []
    return [{"role": "user", "content": parts + [audio_part(audio_index)]}]


def transcript_message(instruction: str, transcript: str) -> list[dict]:
    """The same turn with the transcript in the speech's place (the text-side teacher / step 1).

    The space goes with the transcript, not the instruction: tokenizers merge a leading space
    into the next word, so the instruction's tokens stay identical to the speech prompt's.
    """
    parts = [text_part(instruction)] if instruction else []
    sep = " " if instruction else ""
    return [{"role": "user", "content": parts + [text_part(sep + transcript.strip())]}]


class ChatPrompt:
    """Renders messages with the LLM's chat template into token pieces and audio slots.

    `system_prompt`: None keeps the template's own default (SmolLM2 adds one); a string sets it.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.text_tokenizer = _text_only(tokenizer)
        self.system_prompt = system_prompt
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # no chat template: a base model, prompted in plain text
        self.plain = None if self.has_chat_template else PLAIN_TEXT_FORMAT
        self.end_of_turn_id = self._find_end_of_turn_id()
        self._longest_token: int | None = None
        self._stop_ids: list[int] | None = None

    # -- rendering -----------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[Piece]:
        slots: list[dict] = []
        flat = []
        for message in self._with_system(self._with_demonstrations(messages)):
            content = message["content"]
            if isinstance(content, str):
                content = [text_part(content)]
            marked = ""
            for part in content:
                marked += _SLOT.format(len(slots))
                slots.append(part)
            flat.append({"role": message["role"], "content": marked})
        rendered = self._apply_template(flat, add_generation_prompt)
        return self._tokenize_around_slots(rendered, slots)

    @staticmethod
    def _with_demonstrations(messages: Sequence[dict]) -> list[dict]:
        """A one-turn conversation that opens with a demonstrated task's instruction (a text part,
        then the speech or the transcript) gets the task's worked examples before it."""
        users = [k for k, m in enumerate(messages) if m["role"] == "user"]
        if len(users) != 1 or any(m["role"] == "assistant" for m in messages):
            return list(messages)
        k = users[0]
        content = messages[k]["content"]
        if isinstance(content, str) or len(content) < 2 or content[0].get("type") != "text":
            return list(messages)
        return [*messages[:k], *demonstration_turns(content[0]["text"].strip()), *messages[k:]]

    def _with_system(self, messages: Sequence[dict]) -> list[dict]:
        messages = list(messages)
        if self.system_prompt is not None and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _apply_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        plain, text = self.plain, ""
        for m in messages:
            if m["role"] == "user":
                text += plain.user.format(content=m["content"])
            elif m["role"] == "assistant":
                text += plain.assistant + plain.reply_prefix + m["content"] + plain.turn_end
            else:
                text += plain.system.format(content=m["content"])
        if add_generation_prompt:
            text += plain.assistant
        bos = self.tokenizer.bos_token or ""
        return bos + text

    def _tokenize_around_slots(self, rendered: str, slots: list[dict]) -> list[Piece]:
        pieces: list[Piece] = []
        rest = rendered
        for k, part in enumerate(slots):
            marker = _SLOT.format(k)
            before, found, rest = rest.partition(marker)
            if not found:
                raise ValueError("the chat template dropped a content part; cannot splice speech")
            self._append_ids(pieces, before)
            if part["type"] == "audio":
                pieces.append(AudioSlot(part["index"]))
            else:
                # What a message says is text: `<|im_start|>` typed by a user is not a turn.
                self._append_ids(pieces, part["text"], self.text_tokenizer)
        self._append_ids(pieces, rest)
        return pieces

    def _append_ids(self, pieces: list[Piece], text: str, tokenizer: Any = None) -> None:
        if not text:
            return
        ids = (tokenizer or self.tokenizer)(text, add_special_tokens=False)["input_ids"]
        if pieces and isinstance(pieces[-1], list):
            pieces[-1] = pieces[-1] + ids
        else:
            pieces.append(list(ids))

    @property
    def longest_token(self) -> int:
        """Characters of the vocabulary's longest token (as stored, which is never fewer than the
        text it stands for): text longer than N times this cannot fit in N tokens, whatever it says."""
        if self._longest_token is None:
            self._longest_token = max(map(len, self.tokenizer.get_vocab()), default=1)
        return self._longest_token

    # -- targets -------------------------------------------------------------------------------
    def _find_end_of_turn_id(self) -> int:
        """The token that closes an assistant turn: what the template writes after a reply."""
        if self.plain is not None:
            ids = self.tokenizer(self.plain.turn_end, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"the LLM's tokenizer writes a line break as {len(ids)} tokens; "
                                 "the plain-text prompt format needs it as one")
            return ids[0]
        if self.has_chat_template:
            probe = "\ue002"
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                tokenize=False,
            )
            after = text.split(probe, 1)[-1]
            ids = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
            special = set(self.tokenizer.all_special_ids)
            for i in ids:
                if i in special:
                    return i
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the LLM's tokenizer has neither a chat template end-of-turn nor an eos token")
        return self.tokenizer.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a reply when generated: the end of turn and the eos; in the plain-text
        format also every token that is only line breaks ("\n\n" is one token in most
        vocabularies, and a reply that ends a paragraph writes it)."""
        if self._stop_ids is None:
            ids = {self.end_of_turn_id} | ({self.tokenizer.eos_token_id} - {None})
            if self.plain is not None:
                vocab = self.tokenizer.get_vocab()
                strings = self.tokenizer.convert_ids_to_tokens(list(vocab.values()))
                # decoding all of a 262k vocabulary takes seconds: only tokens without a letter or digit
                candidates = [i for i, t in zip(vocab.values(), strings) if t and not any(c.isalnum() for c in t)]
                for i in candidates:
                    text = self.tokenizer.decode([i])
                    if text and set(text) == {"\n"}:
                        ids.add(i)
            self._stop_ids = sorted(ids)
        return self._stop_ids

    def target_ids(self, text: str, truncated: bool = False) -> list[int]:
        """Token ids of an assistant reply; the end-of-turn token is appended unless generation
        stopped at its length limit (the LLM never closed that turn)."""
        prefix = self.plain.reply_prefix if self.plain is not None else ""
        ids = list(self.tokenizer(prefix + text, add_special_tokens=False)["input_ids"])
        return ids if truncated else ids + [self.end_of_turn_id]


def _text_only(tokenizer: Any) -> Any:
    """A copy of `tokenizer` that reads special tokens' strings as plain text (`split_special_tokens`).

    A copy with the setting fixed, rather than the flag passed per call: a fast tokenizer passed
    `split_special_tokens` switches its Rust tokenizer's shared `encode_special_tokens` setting back
    and forth, which races with other threads tokenising at the same time (the server prepares
    requests on several), and the template's own control tokens must still be read as such.
    """
    copy = deepcopy(tokenizer)
    copy.split_special_tokens = True
    backend = getattr(copy, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_special_tokens"):
        backend.encode_special_tokens = True
    return copy


def pieces_to_ids(pieces: Sequence[Piece]) -> list[int]:
    """Flatten a prompt that has no audio slots."""
    out: list[int] = []
    for p in pieces:
        if isinstance(p, AudioSlot):
            raise ValueError("prompt has an audio slot; it cannot be flattened to token ids")
        out.extend(p)
    return out
