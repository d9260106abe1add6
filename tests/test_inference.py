"""Inference on tiny models: batching never changes an answer, speech slots line up with the
adapter, chat history is trimmed to the context window and encoded once, long audio is split."""

from __future__ import annotations

import pytest
import torch

import blsp.inference as inference
from blsp.audio import ENCODER_FRAMES_PER_SECOND, N_SAMPLES, SAMPLE_RATE
from blsp.features import encode_waveforms
from blsp.inference import ChatSession, conversation_examples
from blsp.processing import SPEECH_TOKEN_ID
from blsp.whisper import encoder_output_lengths
from blsp.prompts import AudioSlot

from conftest import tone

INSTRUCTION = "please transcribe the following audio"


@pytest.fixture
def model(tiny_model):
    # A bigger adapter gain than the init's tiny one, so speech actually moves the answers.
    with torch.no_grad():
        tiny_model.adapter.norm.weight.fill_(1.0)
    return tiny_model


def clips():
    return [tone(0.7, 300), tone(2.3, 520), tone(1.31, 810, amp=0.5)]


def adapter_lengths(model, feats) -> list[int]:
    return [int(model.adapter.output_lengths(torch.tensor(f.shape[0]))) for f in feats]


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------
def test_batched_generation_equals_one_clip_at_a_time(model):
    audio = clips()
    batched = model.generate(audio=audio, instruction=INSTRUCTION, max_new_tokens=12)
    single = [model.generate(audio=a, instruction=INSTRUCTION, max_new_tokens=12)[0] for a in audio]
    assert batched == single
    assert len(batched) == 3 and all(isinstance(s, str) for s in batched)
    # the speech matters: different clips give different answers from the same instruction
    assert len(set(batched)) > 1


def test_batched_generation_with_ctc_compressed_speech_equals_one_clip_at_a_time(model):
    """Dropped speech frames sit mid-sequence in a left-padded batch: generation must give them
    neither attention nor positions, in the prompt and in every decoding step after it."""
    model.enable_ctc_compression(list(range(5, 25)))
    with torch.no_grad():
        model.ctc_head.blank.copy_(torch.randn(model.ctc_head.blank.shape, generator=torch.Generator().manual_seed(0)))
        model.ctc_head.scale.fill_(4.0)
    audio = clips()
    batched = model.generate(audio=audio, instruction=INSTRUCTION, max_new_tokens=12)
    single = [model.generate(audio=a, instruction=INSTRUCTION, max_new_tokens=12)[0] for a in audio]
    assert batched == single


def test_speech_only_lora_changes_answers_on_speech_batched_as_one_at_a_time(model):
    """Left padding shifts where the speech sits in each row: the LoRA's speech positions must
    follow it, in the prompt and in every decoding step after it."""
    from blsp.lora import LoraSettings

    audio = clips()
    before = model.generate(audio=audio, instruction=INSTRUCTION, max_new_tokens=12)
    model.enable_lora(LoraSettings(rank=4, where="speech"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    batched = model.generate(audio=audio, instruction=INSTRUCTION, max_new_tokens=12)
    single = [model.generate(audio=a, instruction=INSTRUCTION, max_new_tokens=12)[0] for a in audio]
    assert batched == single
    assert batched != before


def test_left_padding_leaves_each_rows_embeddings_unchanged(model):
    examples = conversation_examples(model, [
        [{"role": "user", "content": [{"type": "text", "text": INSTRUCTION}, {"type": "audio", "audio": a}]}]
        for a in clips()
    ])
    proc = model.processor
    batch = proc.collate(examples, padding_side="left")
    embeds = model.embed_inputs(batch["input_ids"], batch["encoder_features"], batch["encoder_lengths"])
    for row, ex in enumerate(examples):
        one = proc.collate([ex], padding_side="left")
        alone = model.embed_inputs(one["input_ids"], one["encoder_features"], one["encoder_lengths"])[0]
        n = alone.shape[0]
        assert int(batch["attention_mask"][row].sum()) == n
        torch.testing.assert_close(embeds[row, -n:], alone, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Conversations with several audio parts
# ----------------------------------------------------------------------------------------------
def test_two_audio_parts_in_one_message_fill_exactly_the_adapters_slots(model):
    a, b = tone(1.0, 300), tone(2.3, 700)
    conversation = [{"role": "user", "content": [
        {"type": "text", "text": "compare"}, {"type": "audio", "audio": a},
        {"type": "text", "text": "with"}, {"type": "audio", "audio": b},
        {"type": "text", "text": "please"},
    ]}]
    (example,) = conversation_examples(model, [conversation])
    assert [p.index for p in example.pieces if isinstance(p, AudioSlot)] == [0, 1]
    # 1.0 s -> 100 mel -> 50 encoder frames -> 25 -> 13 -> 7 speech vectors; 2.3 s -> 115 -> 15
    assert [f.shape[0] for f in example.features] == [50, 115]
    assert adapter_lengths(model, example.features) == [7, 15]

    ids, labels, feats = model.processor.sequence(example)
    slots = [i for i, t in enumerate(ids) if t == SPEECH_TOKEN_ID]
    assert len(slots) == 7 + 15
    # two runs of slots with text between them
    assert slots[6] + 1 < slots[7] and slots == list(range(slots[0], slots[0] + 7)) + list(range(slots[7], slots[7] + 15))

    # the speech vectors land in the slots, in order, and text embeddings stay where they were
    batch = model.processor.collate([example], padding_side="left")
    embeds = model.embed_inputs(batch["input_ids"], batch["encoder_features"], batch["encoder_lengths"])[0]
    speech, lengths = model.speech_embeddings(batch["encoder_features"], batch["encoder_lengths"])
    torch.testing.assert_close(embeds[slots[:7]], speech[0, :7])
    torch.testing.assert_close(embeds[slots[7:]], speech[1, :15])
    text_pos = [i for i, t in enumerate(ids) if t != SPEECH_TOKEN_ID]
    token_embeds = model.language_model.get_input_embeddings()(torch.tensor([ids[i] for i in text_pos]))
    torch.testing.assert_close(embeds[text_pos], token_embeds)

    out = model.generate(messages=[conversation], max_new_tokens=6)
    assert len(out) == 1 and isinstance(out[0], str)


def test_conversations_and_single_clips_agree(model):
    a = tone(1.5, 400)
    via_audio = model.generate(audio=a, instruction=INSTRUCTION, max_new_tokens=8)
    via_messages = model.generate(messages=[[{"role": "user", "content": [
        {"type": "text", "text": INSTRUCTION}, {"type": "audio", "audio": a}]}]], max_new_tokens=8)
    assert via_audio == via_messages


# ----------------------------------------------------------------------------------------------
# Chat
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def counted(monkeypatch):
    """Count the waveforms `blsp.inference` sends to the encoder."""
    seen: list[int] = []
    real = inference.encode_waveforms

    def counting(model, waveforms, *args, **kwargs):
        seen.extend(len(w) for w in waveforms)
        return real(model, waveforms, *args, **kwargs)

    monkeypatch.setattr(inference, "encode_waveforms", counting)
    return seen


def test_chat_keeps_history_and_encodes_each_clip_once(model, counted, monkeypatch):
    session = ChatSession(model, max_new_tokens=6)
    lengths_seen = []
    real_gen = inference.generate_from_examples

    def spy(m, examples, **kw):
        lengths_seen.append(session._length(examples[0]))
        return real_gen(m, examples, **kw)

    monkeypatch.setattr(inference, "generate_from_examples", spy)
    a = tone(1.2, 350)
    r1 = session.send([{"type": "audio", "audio": a}, {"type": "text", "text": "what is this"}])
    assert counted == [len(a)]
    r2 = session.send([{"type": "text", "text": "hello world"}])
    r3 = session.send([{"type": "text", "text": "the quick brown fox"}])
    assert counted == [len(a)]  # the clip in the history is not encoded again
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 3
    assert [m["content"] for m in session.history[1::2]] == [r1, r2, r3]
    assert "features" in session.history[0]["content"][0]
    # each turn's prompt holds the whole history: it only grows
    assert lengths_seen[0] < lengths_seen[1] < lengths_seen[2]

    # the reply equals a one-shot generation over the same conversation
    convo = session.history + [{"role": "user", "content": [{"type": "text", "text": "again"}]}]
    expected = model.generate(messages=[convo], max_new_tokens=6)[0]
    assert session.send([{"type": "text", "text": "again"}]) == expected


def test_chat_drops_oldest_turns_beyond_the_context_window(model, counted, monkeypatch):
    session = ChatSession(model, max_new_tokens=4)
    assert session.context_window == 512  # the tiny Llama's max_position_embeddings
    session.context_window = 120
    prompts = []
    real_gen = inference.generate_from_examples

    def spy(m, examples, **kw):
        prompts.append(session._length(examples[0]))
        return real_gen(m, examples, **kw)

    monkeypatch.setattr(inference, "generate_from_examples", spy)
    sentence = "the quick brown fox jumps over the lazy dog"
    sent = []
    for k in range(8):
        text = f"{k} {sentence}"
        sent.append(text)
        session.send([{"type": "text", "text": text}])
    # every prompt left room for the reply; the history did outgrow the window
    assert all(n + 4 <= 120 for n in prompts)
    assert max(prompts) > 60
    users = [m["content"][0]["text"] for m in session.history if m["role"] == "user"]
    assert 1 <= len(users) < 8
    assert users == sent[-len(users):]  # the newest turns, in order, the oldest dropped
    assert session.history[0]["role"] == "user" and session.history[-1]["role"] == "assistant"

    # with audio in the history: still trimmed, still encoded once
    session = ChatSession(model, max_new_tokens=4)
    session.context_window = 140
    a = tone(3.0, 300)  # 150 frames -> 19 speech slots
    session.send([{"type": "audio", "audio": a}, {"type": "text", "text": "what is this"}])
    for k in range(6):
        session.send([{"type": "text", "text": f"{k} {sentence}"}])
    assert counted == [len(a)]
    assert session.history[-2]["content"] == [{"type": "text", "text": f"5 {sentence}"}]
    assert not any(isinstance(m["content"], list) and m["content"][0]["type"] == "audio" for m in session.history)


def test_chat_refuses_a_message_too_long_alone(model):
    session = ChatSession(model, max_new_tokens=4)
    session.context_window = 60
    session.send([{"type": "text", "text": "hello"}])
    before = list(session.history)
    with pytest.raises(ValueError, match="context window"):
        session.send([{"type": "text", "text": " ".join(["the quick brown fox"] * 30)}])
    assert session.history == before  # a refused message leaves the conversation as it was
    # a clip too long alone: 20 s -> 1000 frames -> 125 slots
    with pytest.raises(ValueError, match="context window"):
        session.send([{"type": "audio", "audio": tone(20.0)}])
    assert session.history == before


# ----------------------------------------------------------------------------------------------
# Long audio
# ----------------------------------------------------------------------------------------------
def test_audio_over_30_s_is_encoded_in_pieces(model):
    long = tone(65.0, 300)
    (feats,) = encode_waveforms(model, [long])
    pieces = [30.0, 30.0, 5.0]
    expected = sum(int(encoder_output_lengths(torch.tensor(int(s * SAMPLE_RATE) // 160))) for s in pieces)
    assert expected == 1500 + 1500 + 250
    assert feats.shape == (expected, model.config.encoder_config.d_model)
    # each piece is encoded on its own: the first 1500 frames are those of the first 30 s
    (first,) = encode_waveforms(model, [long[:N_SAMPLES]])
    torch.testing.assert_close(feats[:1500], first)
    (last,) = encode_waveforms(model, [long[2 * N_SAMPLES:]])
    torch.testing.assert_close(feats[3000:], last)
    assert 5 * ENCODER_FRAMES_PER_SECOND == last.shape[0]

    # batched with a short clip, the long clip's features do not change
    feats2, short = encode_waveforms(model, [long, tone(1.0)], batch_size=2)
    torch.testing.assert_close(feats2, feats, rtol=1e-5, atol=1e-5)
    assert short.shape[0] == 50

    (example,) = conversation_examples(model, [[{"role": "user", "content": [{"type": "audio", "audio": long}]}]])
    ids, _, _ = model.processor.sequence(example)
    assert ids.count(SPEECH_TOKEN_ID) == adapter_lengths(model, [feats])[0] == 407
    out = model.generate(audio=[long, tone(1.0)], instruction=INSTRUCTION, max_new_tokens=4)
    assert len(out) == 2


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def test_sampling_with_a_seed_is_reproducible(model):
    audio = clips()

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(audio=audio, instruction=INSTRUCTION, max_new_tokens=10, do_sample=True,
                              temperature=1.5)

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first  # sampling does sample


# ----------------------------------------------------------------------------------------------
# Loop guards
# ----------------------------------------------------------------------------------------------
def test_no_repeat_ngram_guard_leaves_no_token_twice(model, monkeypatch):
    """A tiny random LLM loops under greedy decoding; with `no_repeat_ngram_size` 1 no answer holds
    a token twice, and with no guard set the answers are greedy's own."""
    audio = clips()
    tok = model.processor.tokenizer
    generated = []  # the answers' token ids, as decoding returned them (text re-tokenises otherwise)
    decode = tok.batch_decode
    # a tensor from `generate` (the guards), lists from our greedy loop (no guard)
    monkeypatch.setattr(tok, "batch_decode", lambda ids, **kw: generated.append(
        ids.tolist() if hasattr(ids, "tolist") else [list(row) for row in ids]) or decode(ids, **kw))

    def answers(**guard):
        generated.clear()
        texts = model.generate(audio=audio, instruction=INSTRUCTION, max_new_tokens=24, **guard)
        ids = [[t for t in row if t != model.processor.pad_id] for row in generated[0]]
        return texts, ids

    greedy, greedy_ids = answers()
    assert answers(**inference.repetition_guard())[0] == greedy
    assert any(len(set(ids)) < len(ids) for ids in greedy_ids)  # it does loop
    guarded, guarded_ids = answers(**inference.repetition_guard(no_repeat_ngram_size=1))
    assert guarded != greedy
    assert all(len(set(ids)) == len(ids) for ids in guarded_ids)


def test_repetition_guard_sets_only_what_is_given_and_refuses_nonsense():
    assert inference.repetition_guard() == {}
    assert inference.repetition_guard(3, 1.2) == {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}
    with pytest.raises(inference.BlspError, match="--no-repeat-ngram-size"):
        inference.repetition_guard(no_repeat_ngram_size=-1)
    with pytest.raises(inference.BlspError, match="--repetition-penalty"):
        inference.repetition_guard(repetition_penalty=0.0)


@pytest.mark.parametrize("lora", [None, "speech"])
def test_greedy_answers_drop_finished_rows_yet_match_hf_generate(model, lora, monkeypatch):
    """generate_from_examples decodes greedily with its own loop, which drops each answer once it
    ends (an evaluation batch's answers run 2 to 200 tokens): the same answers as transformers'
    `generate`, which the loop guards (generate kwargs) still use. Speech-only LoRA reads the
    prompt's speech positions and none of the generated ones, in a batch that shrinks."""
    from blsp.lora import LoraSettings
    from test_lora import _randomise_lora

    if lora:
        model.enable_lora(LoraSettings(rank=4, where=lora))
        _randomise_lora(model)
    instructions = ["please transcribe the following audio", "what is said", "continue the text please now"]
    examples = conversation_examples(model, [[{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "audio", "audio": clip}]}] for text, clip in zip(instructions, clips())])
    stop = model.processor.stop_ids()
    seen: list[int] = []
    real_forward = model.language_model.forward

    def batch_rows(*args, **kwargs):
        seen.append(kwargs.get("inputs_embeds", kwargs.get("input_ids")).shape[0])
        return real_forward(*args, **kwargs)

    # A random model seldom ends a turn: stop also at some tokens the first answer writes, so that
    # rows end at different steps.
    first = inference.generate_from_examples(model, examples[:1], max_new_tokens=24)[0]
    ids = model.processor.tokenizer(first, add_special_tokens=False).input_ids
    monkeypatch.setattr(model.processor, "stop_ids", lambda: [*stop, *ids[len(ids) // 3:len(ids) // 2 + 1]])
    hf = inference.generate_from_examples(model, examples, max_new_tokens=24, repetition_penalty=1.0)
    model.language_model.forward = batch_rows
    ours = inference.generate_from_examples(model, examples, max_new_tokens=24)
    assert ours == hf
    assert seen[0] == 3 and min(seen) < 3  # the batch shrank as answers ended
