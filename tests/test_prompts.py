"""blsp.prompts: the chat-template path and the plain-text format of LLMs without a template."""

from __future__ import annotations

import pytest

from blsp.prompts import PLAIN_TEXT_FORMAT, AudioSlot, ChatPrompt, pieces_to_ids, speech_message, transcript_message

from conftest import build_tokenizer


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory):
    """conftest's tokenizer with its chat template taken away: what a base model ships."""
    tok = build_tokenizer(tmp_path_factory.mktemp("base"))
    tok.chat_template = None
    return tok


def test_plain_text_format_renders_the_dialogue_as_text(base_tokenizer):
    prompt = ChatPrompt(base_tokenizer)
    assert prompt.plain is PLAIN_TEXT_FORMAT and not prompt.has_chat_template
    ids = pieces_to_ids(prompt.render(transcript_message("continue the text", "hello world")))
    assert base_tokenizer.decode(ids) == "<|im_start|>User: continue the text hello world\nAssistant:"
    with_system = ChatPrompt(base_tokenizer, system_prompt="be brief")
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
               {"role": "user", "content": "the fox"}]
    text = base_tokenizer.decode(pieces_to_ids(with_system.render(history)))
    assert text == "<|im_start|>be brief\n\nUser: hello\nAssistant: world\nUser: the fox\nAssistant:"


def test_plain_text_format_splices_speech_where_the_transcript_would_be(base_tokenizer):
    prompt = ChatPrompt(base_tokenizer)
    speech = prompt.render(speech_message("continue the text"))
    text = prompt.render(transcript_message("continue the text", "hello world"))
    before, slot, after = speech
    assert isinstance(slot, AudioSlot)
    # the tokens around the slot are the transcript prompt's own: teacher and student line up
    ids = pieces_to_ids(text)
    assert ids[:len(before)] == before and ids[-len(after):] == after
    assert base_tokenizer.decode(after) == "\nAssistant:"


def test_plain_text_reply_ends_at_a_line_break(base_tokenizer):
    prompt = ChatPrompt(base_tokenizer)
    newline = base_tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert [prompt.end_of_turn_id] == newline
    assert prompt.end_of_turn_id in prompt.stop_ids and base_tokenizer.eos_token_id in prompt.stop_ids
    # every stop token is only line breaks (or the eos): none cuts a reply inside a word
    assert all(set(base_tokenizer.decode([i])) == {"\n"} for i in prompt.stop_ids if i != base_tokenizer.eos_token_id)
    target = prompt.target_ids("the lazy dog")
    assert base_tokenizer.decode(target) == " the lazy dog\n"  # as the model writes it after "Assistant:"
    assert base_tokenizer.decode(prompt.target_ids("the lazy dog", truncated=True)) == " the lazy dog"


def test_chat_template_path_is_unchanged(tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    prompt = ChatPrompt(tok)
    assert prompt.plain is None and prompt.stop_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.decode(prompt.target_ids("the lazy dog")) == "the lazy dog<|im_end|>"


def test_the_transcribe_task_comes_with_its_worked_examples_on_both_paths(base_tokenizer):
    from blsp.prompts import TASK_DEMONSTRATIONS, task_instruction

    prompt = ChatPrompt(base_tokenizer)
    instruction = task_instruction("transcribe")
    text = base_tokenizer.decode(pieces_to_ids(prompt.render(transcript_message(instruction, "hello world"))))
    shots = "".join(f"User: {instruction} {e}\nAssistant: {e}\n" for e in TASK_DEMONSTRATIONS["transcribe"])
    assert text == f"<|im_start|>{shots}User: {instruction} hello world\nAssistant:"
    # the speech path gets the same turns: teacher and student line up around the slot
    before, slot, after = prompt.render(speech_message(instruction))
    ids = pieces_to_ids(prompt.render(transcript_message(instruction, "hello world")))
    assert isinstance(slot, AudioSlot) and ids[:len(before)] == before and ids[-len(after):] == after
    # in another language too (transcription is in the speech's own); never for other instructions
    assert task_instruction("transcribe", "German") == instruction
    plain = base_tokenizer.decode(pieces_to_ids(prompt.render(transcript_message("continue the text", "hi"))))
    assert "Good morning" not in plain
    # nor once a conversation has turns of its own, nor for the instruction typed alone
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
               *transcript_message(instruction, "hi")]
    assert "Good morning" not in base_tokenizer.decode(pieces_to_ids(prompt.render(history)))
    alone = [{"role": "user", "content": instruction}]
    assert "Good morning" not in base_tokenizer.decode(pieces_to_ids(prompt.render(alone)))
