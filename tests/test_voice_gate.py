"""The voice gate: the voice channel's vectors read only where the request asks about the voice
(blsp.voice_gate, BlspModel.voice_heard)."""

import json

import pytest
import torch
import yaml

from blsp.errors import BlspError
from blsp.modeling import BlspModel
from blsp.processing import SPEECH_TOKEN_ID, Example
from blsp.prompts import CONTINUATION_INSTRUCTION
from blsp.voice_gate import (VOICE_REQUESTS, WORD_REQUESTS, VoiceGate, fit_voice_gate, prompt_prefix,
                             request_prefixes, request_states)
from test_speech_sources import mels

VOICE_Q = "Describe the speaker's voice in one sentence."


def test_the_gate_fits_two_kinds_of_request_and_generalises_along_them():
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=gen)
    states = torch.randn(40, 16, generator=gen)
    about_voice = [bool(i % 4 == 0) for i in range(40)]  # 10 of 40: the fit balances the two kinds
    states[torch.tensor(about_voice)] += 3 * direction
    gate = VoiceGate(16)
    log = fit_voice_gate(gate, states, about_voice)
    assert log == {"requests": 40, "about_voice": 10, "train_accuracy": 1.0} and bool(gate.fitted)
    new = torch.randn(20, 16, generator=gen)
    with torch.no_grad():
        assert (gate(new + 3 * direction) > 0.5).float().mean() >= 0.9
        assert (gate(new) < 0.5).float().mean() >= 0.9
    with pytest.raises(ValueError, match="both kinds"):
        fit_voice_gate(VoiceGate(16), states, [False] * 40)


def test_request_prefixes_are_the_attended_tokens_before_the_first_speech_slot():
    s = SPEECH_TOKEN_ID
    ids = torch.tensor([[0, 0, 5, 6, s, s, 7], [5, 6, 8, s, 7, 0, 0], [5, 6, 7, 8, 9, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0]])
    assert request_prefixes(ids, mask, s) == [(5, 6), (5, 6, 8), None]


def test_request_states_do_not_depend_on_the_batch(tiny_model):
    lm = tiny_model.language_model.eval()
    prefixes = [(1, 2, 3, 4, 5), (6, 7), (8, 9, 10)]
    together = request_states(lm, prefixes)
    alone = torch.cat([request_states(lm, [p]) for p in prefixes])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def _gated(tiny_whisper_dir, tiny_dirs, place="before"):
    model = BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                      speech_states="decoder", seed=0, voice_vectors=3, voice_place=place,
                                      voice_gate=True).eval()
    proc = model.processor
    model.fit_voice_gate({prompt_prefix(proc.speech_prompt(VOICE_Q)): True,
                          prompt_prefix(proc.speech_prompt(CONTINUATION_INSTRUCTION)): False})
    return model


def _batch(model, instructions):
    mel, lengths = mels([0.9] * len(instructions))
    states, steps = model.encode_mel(mel, lengths)
    proc = model.processor
    return proc.collate([Example(pieces=proc.speech_prompt(text), features=[states[row, : steps[row]]],
                                 target=proc.prompt.target_ids("a b")) for row, text in enumerate(instructions)])


@pytest.mark.parametrize("place", ["before", "after"])
def test_a_closed_gate_hides_the_voice_and_an_open_one_reads_it(tiny_whisper_dir, tiny_dirs, tmp_path, place):
    """Under a request about the voice the LLM reads the voice vectors; under another, they are
    masked out and take no position: what it writes does not depend on them at all."""
    model = _gated(tiny_whisper_dir, tiny_dirs, place)
    batch = _batch(model, [VOICE_Q, CONTINUATION_INSTRUCTION])
    assert model.voice_gate_cache == {prompt_prefix(model.processor.speech_prompt(VOICE_Q)): True,
                                      prompt_prefix(model.processor.speech_prompt(CONTINUATION_INSTRUCTION)): False}
    assert model.voice_heard(batch["input_ids"], batch["attention_mask"]).tolist() == [True, False]
    assert model.voice_gate_opens(VOICE_Q) is True and model.voice_gate_opens(CONTINUATION_INSTRUCTION) is False
    _, mask = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["encoder_features"],
                                   batch["encoder_lengths"])
    speech = batch["input_ids"] == SPEECH_TOKEN_ID
    for row, heard in enumerate([True, False]):
        slots = speech[row].nonzero()[:, 0]
        voice = slots[:3] if place == "before" else slots[-3:]
        words = slots[3:] if place == "before" else slots[:-3]
        assert mask[row, voice].tolist() == [int(heard)] * 3 and mask[row, words].all()
    with torch.no_grad():
        logits = model(**batch, return_logits=True).logits
        model.voice_channel.norm.weight.mul_(3.0)  # other voice vectors
        moved = model(**batch, return_logits=True).logits
    last = batch["attention_mask"].sum(1) - 1
    assert (logits[0, last[0]] - moved[0, last[0]]).abs().max() > 1e-4  # open: the voice is read
    torch.testing.assert_close(logits[1, last[1]], moved[1, last[1]])  # closed: it is not
    # the decision and the gate round-trip
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.voice_gate and bool(loaded.voice_channel.gate.fitted)
    assert loaded.voice_heard(batch["input_ids"], batch["attention_mask"]).tolist() == [True, False]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, return_logits=True).logits, moved)


def test_a_gate_needs_a_voice_channel(tiny_whisper_dir, tiny_dirs, tiny_model):
    assert tiny_model.voice_gate_opens(VOICE_Q) is None  # no gate: nothing to decide
    with pytest.raises(BlspError, match="voice gate"):
        BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                  speech_states="decoder", voice_gate=True)


def test_the_gates_own_requests_leave_the_behaviour_suite_unseen():
    """None of the gate's phrasings is an instruction the behaviour suite measures on (its measure
    of requests step 2 never saw stays zero-shot); the two lists do not overlap."""
    from pathlib import Path

    suite = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "behaviour.yaml").read_text())
    measured = {v if isinstance(v, str) else v["instruction"] for v in suite.values()}
    assert not measured & (set(VOICE_REQUESTS) | set(WORD_REQUESTS))
    assert not set(VOICE_REQUESTS) & set(WORD_REQUESTS)


def test_step_2_fits_the_gate_on_its_requests_and_keeps_it(tiny_dirs, tmp_path):
    from conftest import write_corpus
    from test_training import options

    from blsp.training import run_train

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, voice_vectors=2, voice_gate=True, max_steps=1))
    log = json.loads((tmp_path / "run" / "voice_gate.json").read_text())
    # the run's continuation instruction, transcription, the voice questions and both lists
    assert log["about_voice"] >= len(VOICE_REQUESTS) and log["requests"] - log["about_voice"] >= len(WORD_REQUESTS)
    assert log["train_accuracy"] >= 0.9
    model = BlspModel.from_pretrained(tmp_path / "run")
    assert model.config.voice_gate and bool(model.voice_channel.gate.fitted)
    with pytest.raises(BlspError, match="--voice-gate"):
        run_train([data], tmp_path / "x", options(tiny_dirs, tmp_path, voice_gate=True, max_steps=1))
    with pytest.raises(BlspError, match="--voice-gate True"):  # trained on without the gate it was saved with
        run_train([data], tmp_path / "y", options(tiny_dirs, tmp_path, voice_vectors=2, max_steps=1,
                                                  init_from=str(tmp_path / "run")))


# Other wordings than the gate's own: requests about the voice, and requests about the words
# (the behaviour suite's five first) that name the speaker or not.
HELD_OUT_VOICE = ["How does the speaker sound?", "Is this a man or a woman speaking?", "Is the voice male or female?",
                  "How fast is the speaker talking?", "Is the speaker talking quickly?", "Is the speaker's voice deep or high?",
                  "Is the person whispering or speaking normally?", "Is the recording noisy?",
                  "Can you hear background noise?", "What can you tell about the speaker's voice?",
                  "Describe how the person speaks.", "Is the speaker a woman?", "What is the gender of the speaker?",
                  "Is the speaking rate slow or fast?", "Is it a male voice?", "Is the audio clean or noisy?"]
HELD_OUT_WORDS = ["Summarize the following text in one short sentence.", "What is the speaker talking about?",
                  "Who is mentioned in the following?", "Translate the following into Italian.",
                  "What does the speaker want?", "Tell me what was said."]


@pytest.mark.real
def test_the_gate_on_smollm2_tells_other_wordings_apart():
    """Fitted as step 2 fits it (without a run's own requests), the gate on the real SmolLM2 opens
    for other wordings of a question about the voice and stays shut for the behaviour suite's
    instructions and other requests about the words (measured 16 of 16 and 11 of 11, 2026-12-08)."""
    from pathlib import Path

    from blsp.llm import load_language_model
    from blsp.packaged import resolve
    from blsp.prompts import ChatPrompt, speech_message, task_instruction
    from blsp.voice_gate import labelled_requests

    lm, tokenizer = load_language_model(resolve("smollm2-135m-instruct"))
    prompt = ChatPrompt(tokenizer)
    suite = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "behaviour.yaml").read_text())
    measured = [v if isinstance(v, str) else v["instruction"] for v in suite.values()]
    fitted = labelled_requests(CONTINUATION_INSTRUCTION)
    texts = [t for t, _ in fitted] + HELD_OUT_VOICE + measured + HELD_OUT_WORDS + [task_instruction("translate")]
    states = request_states(lm.eval(), [prompt_prefix(prompt.render(speech_message(t))) for t in texts])
    gate = VoiceGate(states.shape[1])
    assert fit_voice_gate(gate, states[: len(fitted)], [v for _, v in fitted])["train_accuracy"] == 1.0
    with torch.no_grad():
        opens = (gate(states[len(fitted):]) > 0.5).tolist()
    assert all(opens[: len(HELD_OUT_VOICE)]), [t for t, o in zip(HELD_OUT_VOICE, opens) if not o]
    assert not any(opens[len(HELD_OUT_VOICE):]), [t for t, o in zip(texts[len(fitted) + len(HELD_OUT_VOICE):],
                                                                      opens[len(HELD_OUT_VOICE):]) if o]
