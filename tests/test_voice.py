"""blsp.voice: a clip's voice attributes, their description, the questions about them, the scoring."""

from __future__ import annotations

import itertools
import random

import pytest

from blsp.voice import (
    DESCRIBE_QUESTION,
    KEYWORDS,
    NOISY_SNR_DB,
    PITCH_BANDS,
    RATE_BANDS,
    VOICE_ATTRIBUTES,
    described_transcript,
    describe_voice,
    describes,
    voice_attributes,
    voice_questions,
)


def test_bands_cover_their_classes_and_do_not_touch():
    for bands, name in ((RATE_BANDS, "rate"), (PITCH_BANDS, "pitch")):
        assert set(bands) == set(VOICE_ATTRIBUTES[name].labels)
        ordered = sorted(bands.values())
        assert all(0 < low < high for low, high in ordered)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ordered))  # a gap between classes
    assert RATE_BANDS["slow"][0] > 1 > RATE_BANDS["fast"][1]  # a stretch over 1 is slower
    assert PITCH_BANDS["high"][0] > 1 > PITCH_BANDS["low"][1]
    assert 0 <= NOISY_SNR_DB[0] < NOISY_SNR_DB[1]
    for attribute in VOICE_ATTRIBUTES.values():
        assert len(attribute.phrases) == len(attribute.labels) and attribute.question.endswith(".")
        assert set(KEYWORDS[attribute.field]) <= set(attribute.labels)


def test_voice_attributes_keep_only_stated_known_classes():
    record = {"id": "x", "text": "hello", "gender": "female", "rate": "fast", "pitch": "squeaky", "noisy": True,
              "whispered": "no", "snr_db": 3.0, "voice": "slt"}
    assert voice_attributes(record) == {"gender": "female", "rate": "fast", "whispered": "no"}
    assert voice_attributes({"audio": "a.wav", "text": "t"}) == {}


@pytest.mark.parametrize("attributes, sentence", [
    ({"gender": "female", "whispered": "yes", "rate": "fast", "noisy": "yes"},
     "The speaker is a woman, whispering fast over loud background noise."),
    ({"gender": "male", "whispered": "no", "rate": "slow", "pitch": "low", "noisy": "no"},
     "The speaker is a man, talking slowly in a low-pitched voice in a quiet room."),
    ({"whispered": "yes"}, "The speaker is someone, whispering."),
    ({"gender": "male", "whispered": "no"}, "The speaker is a man."),
    ({"rate": "normal", "pitch": "high"}, "The speaker is someone, talking at a normal pace in a high-pitched voice."),
    ({"whispered": "no"}, None),  # nothing a person would say
    ({}, None),
])
def test_describe_voice(attributes, sentence):
    assert describe_voice(attributes) == sentence


def test_described_transcript_quotes_the_words_after_the_description():
    assert described_transcript(" Hello there. ", None) == " Hello there. "
    assert described_transcript("Hello there.", "The speaker is a man.") == \
        'The speaker is a man. They say: "Hello there."'


def test_voice_questions_ask_what_a_line_states():
    assert voice_questions({}) == {}
    questions = voice_questions({"gender": "male", "noisy": "no"})
    assert questions == {"voice_gender": VOICE_ATTRIBUTES["gender"].question,
                         "voice_noisy": VOICE_ATTRIBUTES["noisy"].question, "voice_describe": DESCRIBE_QUESTION}


@pytest.mark.parametrize("answer, attribute, value, scored", [
    ("The speaker is a woman.", "gender", "male", False),  # "woman" is not "man"
    ("The speaker is a woman.", "gender", "female", True),
    ("It is a woman's voice.", "gender", "female", True),  # a possessive names its noun
    ("A man speaks; she sounds calm.", "gender", "male", False),  # both classes named: not an answer
    ("He talks quickly.", "rate", "fast", True),
    ("He talks quickly.", "rate", "slow", False),
    ("He talks at a normal pace.", "rate", "normal", None),  # no keywords: not scored
    ("Her voice is deep.", "pitch", "low", True),
    ("A high voice, then a low one.", "pitch", "high", False),
    ("The speaker is whispering.", "whispered", "yes", True),
    ("The speaker is whispering.", "whispered", "no", None),
    ("There is loud background chatter.", "noisy", "yes", True),
    ("A slow, hollow voice.", "pitch", "low", False),  # "hollow" and "slow" hold "low", not as words
])
def test_describes_by_whole_keywords(answer, attribute, value, scored):
    assert describes(answer, attribute, value) is scored


def test_every_description_describes_its_own_attributes():
    rng = random.Random(0)
    for _ in range(300):
        attributes = {name: rng.choice(a.labels) for name, a in VOICE_ATTRIBUTES.items() if rng.random() < 0.7}
        sentence = describe_voice(attributes)
        for name, value in attributes.items():
            assert describes(sentence or "", name, value) in (True, None), (sentence, name, value)
            for other in VOICE_ATTRIBUTES[name].labels:  # and never another class of the same attribute
                if other != value:
                    assert not describes(sentence or "", name, other), (sentence, name, other)


def test_a_negated_keyword_is_not_said():
    from blsp.voice import describes

    assert describes("There is no background noise.", "noisy", "yes") is False
    assert describes("A man whispering over loud background noise.", "noisy", "yes") is True
    assert describes("He is not whispering.", "whispered", "yes") is False
    assert describes("She speaks without a whisper, in a high voice.", "pitch", "high") is True


def test_pitch_classes_are_bands_of_measured_f0_with_gaps_between():
    from blsp.voice import PITCH_HZ, pitch_class

    assert [pitch_class(f) for f in (85.0, 100.0, 108.0, 115.0, 140.0, 165.0, 175.0, 240.0, None)] == [
        "low", "low", None, "normal", "normal", None, "high", "high", None]
    assert list(PITCH_HZ) == list(VOICE_ATTRIBUTES["pitch"].labels)
