"""blsp.metrics against values computed by hand (or printed in sacrebleu's own documentation)."""

from __future__ import annotations

import json

import pytest

from blsp.metrics import (
    canonical_label,
    classification_scores,
    continuation_agreement,
    description_scores,
    error_rates,
    map_label,
    map_voice_label,
    translation_scores,
    wilson_interval,
)


# ----------------------------------------------------------------------------------------------
# WER / CER
# ----------------------------------------------------------------------------------------------
def test_wer_is_exactly_a_quarter_and_cer_counts_characters():
    scores = error_rates(["The cat sat down."], ["the cat, sat TOWN"])
    assert scores["wer"] == 0.25 and scores["substitutions"] == 1 and scores["ref_words"] == 4
    assert scores["cer"] == 1 / len("the cat sat down")  # one substituted letter, spaces count
    assert "whisper-english" in scores["normaliser"]
    # one deletion ("d") and one insertion ("z") against eight reference words: 2/8
    two = error_rates(["a b c d e f g h"], ["a b c e f g h z"], normalise=False)
    assert two["wer"] == 2 / 8 and two["deletions"] == 1 and two["insertions"] == 1


def test_whisper_normaliser_makes_spelled_numbers_and_contractions_equal():
    assert error_rates(["it's twenty one"], ["it is 21"])["wer"] == 0.0


def test_other_languages_are_scored_after_whispers_basic_normaliser():
    german = error_rates(["Es gibt keinen Grund, Alkohol zu trinken."], ["es gibt keinen grund alkohol zu trinken"],
                         language="de")
    assert german["wer"] == 0.0 and "whisper-basic" in german["normaliser"]
    # accents are letters: "für" is not "fur" (the English normaliser would strip the accent)
    assert error_rates(["für meine Überzeugungen"], ["fur meine Überzeugungen"], language="de")["wer"] == 1 / 3
    assert error_rates(["für"], ["fur"])["wer"] == 0.0


# ----------------------------------------------------------------------------------------------
# BLEU / chrF
# ----------------------------------------------------------------------------------------------
# The example of sacrebleu's README: BLEU = 48.53, chrF2 = 59.73.
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [["The dog bit the man.", "The dog had bit the man."],
        ["It was not unexpected.", "No one was surprised."],
        ["The man bit him first.", "The man had bitten the dog."]]


def test_bleu_and_chrf_equal_sacrebleus_documented_example():
    scores = translation_scores(SYS, REFS)
    assert scores["bleu"] == pytest.approx(48.53, abs=0.005)
    assert scores["chrf"] == pytest.approx(59.73, abs=0.005)
    assert scores["bleu_signature"].startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert scores["chrf_signature"].startswith("nrefs:2|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert scores["per_utterance"][0]["bleu"] == pytest.approx(100.0)
    json.dumps(scores, allow_nan=False)


def test_bleu_follows_the_target_language_and_a_perfect_match_is_100():
    zh = translation_scores(["我喜欢猫。"], ["我喜欢猫。"], target_lang="zh")
    assert zh["bleu"] == pytest.approx(100.0) and "tok:zh" in zh["bleu_signature"]
    assert "tok:char" in translation_scores(["a b"], ["a b"], tokenize="char")["bleu_signature"]
    with pytest.raises(ValueError, match="same number of references"):
        translation_scores(["a", "b"], ["a", ["b", "c"]])
    assert translation_scores([], [])["bleu"] is None


def test_agreement_of_continuations():
    same = continuation_agreement(["the cat sat on the mat"] * 2, ["the cat sat on the mat", "the cat  sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["identical"] == 1.0
    half = continuation_agreement(["a b c d", "x y z w"], ["a b c d", "p q r s"])
    assert half["identical"] == 0.5 and 0 < half["bleu"] < 100


# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------
LABELS = ["positive", "negative", "neutral"]


@pytest.mark.parametrize("answer, label, rule", [
    ("Positive.", "positive", "exact"),                                # case and punctuation do not matter
    ("  NEGATIVE!!", "negative", "exact"),
    ("The sentiment of the speaker is neutral.", "neutral", "contains"),
    ("I would say: positive", "positive", "contains"),
    ("positively", None, "none"),                                      # whole words only
    ("It is hard to tell.", None, "none"),
    ("Positive or negative, hard to say.", None, "ambiguous"),          # two labels: listed, wrong
    ("", None, "none"),
])
def test_label_mapping_rule(answer, label, rule):
    match = map_label(answer, LABELS)
    assert (match.label, match.rule) == (label, rule)


def test_a_longer_label_wins_over_one_inside_it():
    labels = ["positive", "very positive", "negative"]
    assert map_label("Very positive!", labels).label == "very positive"   # exact
    assert map_label("I think very positive", labels).label == "very positive"  # contains both: the longer
    assert map_label("very positive, not negative", labels).rule == "ambiguous"
    assert map_label("ambiguous", ["positive", "negative"]).candidates == ()
    assert map_label("positive and negative", LABELS).candidates == ("positive", "negative")
    assert canonical_label("Positive", LABELS) == "positive" and canonical_label("mixed", LABELS) is None


def test_accuracy_and_macro_f1_of_a_small_table():
    # gold:  pos pos pos neg neg neu
    # pred:  pos pos neg neg  -  pos       ("-": unmapped)
    gold = ["pos", "pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "pos", "neg", "neg", None, "pos"]
    s = classification_scores(gold, pred, ["pos", "neg", "neu"])
    assert s["accuracy"] == 3 / 6 and s["unmapped"] == 1 and s["n"] == 6
    # pos: TP 2 FP 1 FN 1 -> F1 4/6; neg: TP 1 FP 1 FN 1 -> 2/4; neu: TP 0 FP 0 FN 1 -> 0
    assert s["per_label"]["pos"]["f1"] == pytest.approx(4 / 6)
    assert s["per_label"]["neg"]["f1"] == pytest.approx(2 / 4)
    assert s["per_label"]["neu"]["f1"] == 0.0 and s["per_label"]["neu"]["precision"] is None
    assert s["macro_f1"] == pytest.approx((4 / 6 + 2 / 4 + 0) / 3)
    assert s["confusion"]["neg"] == {"pos": 0, "neg": 1, "neu": 0, "unmapped": 1}
    # a label in the set but in neither gold nor predictions has no F1 and is left out of the mean
    s2 = classification_scores(["a", "b"], ["a", "a"], ["a", "b", "c"])
    assert s2["per_label"]["c"]["f1"] is None and s2["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    json.dumps(s, allow_nan=False)


def test_wilson_interval_by_hand():
    """Wilson: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.95996 for 95%."""
    z2 = 1.959963984540054 ** 2
    # 8 of 10: p .8, denominator 1.384146, centre .716741, half-width .226578
    assert wilson_interval(8, 10) == pytest.approx([0.490162, 0.943318], abs=1e-6)
    # 0 of 4: [0, z²/(n + z²)], not the normal approximation's [0, 0]
    lo, hi = wilson_interval(0, 4)
    assert lo == pytest.approx(0, abs=1e-12) and hi == pytest.approx(z2 / (4 + z2))
    assert wilson_interval(4, 4) == pytest.approx([4 / (4 + z2), 1.0])
    assert wilson_interval(0, 0) is None
    # 99%: wider
    lo99, hi99 = wilson_interval(8, 10, level=0.99)
    assert lo99 < 0.490162 and hi99 > 0.943318
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    # the small table above: 3 of 6 right, centred at .5, half-width .3123837
    s = classification_scores(["pos", "pos", "pos", "neg", "neg", "neu"], ["pos", "pos", "neg", "neg", None, "pos"],
                              ["pos", "neg", "neu"])
    assert s["accuracy_ci95"] == pytest.approx([0.5 - 0.3123837, 0.5 + 0.3123837], abs=1e-6)


def test_description_scores_on_handwritten_answers():
    truths = [{"gender": "female", "rate": "fast", "pitch": "high", "whispered": "no", "noisy": "yes"},
              {"gender": "male", "rate": "slow", "pitch": "normal"},
              {"gender": "male", "whispered": "yes"},
              {}]
    answers = ["A woman speaking quickly in a high voice over background noise.",  # all four scored right
               "She talks slowly.",  # gender wrong (she), rate right; a normal pitch has no keywords
               "A man, or maybe a woman, whispering.",  # both genders named: wrong; whisper right
               "Hello."]  # nothing stated, nothing scored
    s = description_scores(answers, truths)
    attrs = s["attributes"]
    assert (attrs["gender"]["right"], attrs["gender"]["scored"]) == (1, 3) and attrs["gender"]["share"] == 1 / 3
    assert attrs["rate"]["share"] == 1.0 and attrs["rate"]["scored"] == 2
    assert attrs["pitch"]["share"] == 1.0 and (attrs["pitch"]["scored"], attrs["pitch"]["not_scored"]) == (1, 1)
    assert attrs["whispered"]["share"] == 1.0 and attrs["whispered"]["not_scored"] == 1  # "no" has no keywords
    assert attrs["noisy"]["share"] == 1.0
    assert (s["right"], s["scored"], s["overall"]) == (6, 8, 0.75)  # pooled over (clip, attribute) pairs
    assert s["overall_ci95"] == wilson_interval(6, 8) and attrs["gender"]["ci95"] == wilson_interval(1, 3)
    assert s["all_right"] == 1 / 3  # of the three clips with a scored attribute, only the first
    assert s["per_utterance"][1] == {"gender": False, "rate": True, "pitch": None} and s["per_utterance"][3] == {}
    assert s["n"] == 4
    none = description_scores(["x"], [{"rate": "normal"}])
    assert none["overall"] is None and none["overall_ci95"] is None and none["attributes"]["rate"]["share"] is None
    with pytest.raises(ValueError):
        description_scores(["a"], [])
    json.dumps(s, allow_nan=False)


# ----------------------------------------------------------------------------------------------
# Runaway answers
# ----------------------------------------------------------------------------------------------
def test_compression_ratio_is_raw_over_gzipped_bytes():
    import zlib

    from blsp.metrics import compression_ratio

    text = "The quick brown fox jumps over the lazy dog."
    assert compression_ratio(text) == len(text.encode()) / len(zlib.compress(text.encode()))
    assert compression_ratio("") == 0.0
    assert compression_ratio(text) < 2.4 < compression_ratio("ha " * 30)  # Whisper's threshold


@pytest.mark.parametrize("text, loop", [
    ("5 5 5 5", True),                                     # one word four times running
    ("5 5 5", False),                                      # three times is not enough
    ("I am. I am. I am. I am.", True),                     # a bigram four times (punctuation aside)
    ("a b c d " * 4, True),                                # a 4-gram four times
    ("a b c d e " * 4, False),                             # a 5-gram: past n <= 4, and gzip shrinks it < 2.4x
    ("ha " * 30, True),                                    # gzip: ratio past 2.4
    ("five, 5 five 5 five 5 five", False),                 # alternating, never the same n-gram 4 times
    ("The cat sat on the mat and the dog ran away.", False),
    ("", False),
])
def test_is_loop(text, loop):
    from blsp.metrics import is_loop

    assert is_loop(text) is loop


@pytest.mark.parametrize("text, refusal", [
    ("I'm sorry for your loss.", False),                   # sorry, but not a refusal
    ("I'm sorry, but I am unable to transcribe audio files.", True),
    ("I am sorry but that is beyond me.", True),
    ("As an AI language model, I have no feelings.", True),
    ("I cannot help with that.", True),
    ("I can't listen to recordings.", True),
    ("I apologize for the confusion.", True),
    ("I don't have the ability to hear.", True),
    ("This sound recording is too short.", True),          # talks about the audio, not the text
    ("Audio quality matters to the speaker.", False),      # "audio" without "file"/"recording"
    ("Positive.", False),
    ("The speaker asks whether the train is late.", False),
])
def test_is_refusal(text, refusal):
    from blsp.metrics import is_refusal

    assert is_refusal(text) is refusal


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))  # n distinct words: no loop, no refusal


@pytest.mark.parametrize("answer, text_answer, kind", [
    ("5 5 5 5", "5", "loop"),
    ("5 5 5 5", "5 5 5 5", None),                          # the text path loops too: not the speech's doing
    ("I'm sorry, but I can't transcribe audio files.", "Positive.", "refusal"),
    ("I'm sorry, but no.", "I am unable to say.", None),    # the text path refuses too
    ("I'm sorry, but " * 4, "x", "loop"),                   # a refusal that loops counts once, as a loop
    ("The sentiment here is positive overall.", "Positive.", None),  # 6 > 3x1 words but within 10 words
    (words(11), "Positive.", None),                        # 11 = 1 + 10: not past the margin
    (words(12), "Positive.", "long"),                      # 12 > 3x1 and > 1 + 10
    (words(30), words(10), None),                          # exactly 3x: not past it
    (words(31), words(10), "long"),
    (words(12), "", "long"),                               # an empty text answer: 12 > 0 + 10
])
def test_runaway_kind(answer, text_answer, kind):
    from blsp.metrics import runaway_kind

    assert runaway_kind(answer, text_answer) == kind


def test_runaway_rate_counts_each_kind():
    from blsp.metrics import runaway_rate

    answers = ["5 5 5 5", "I am unable to hear audio files.", words(20), "Positive.", "5 5 5 5"]
    texts = ["five", "Positive.", "Negative.", "Positive.", "5 5 5 5"]
    r = runaway_rate(answers, texts)
    assert r["per_utterance"] == ["loop", "refusal", "long", None, None]
    assert (r["loop"], r["refusal"], r["long"], r["n"]) == (1, 1, 1, 5)
    assert r["rate"] == 3 / 5
    empty = runaway_rate([], [])
    assert empty["rate"] is None and empty["n"] == 0 and empty["per_utterance"] == []
    json.dumps(r, allow_nan=False)


def test_runaway_rule_states_the_thresholds():
    from blsp.metrics import RUNAWAY_RULE

    for part in ("2.4", "4 times", "3x", "10 words", "I'm sorry, but", "text path's answer"):
        assert part in RUNAWAY_RULE, part


def test_label_agreement_is_the_share_of_the_same_label():
    from blsp.metrics import label_agreement

    answers = ["Positive.", "It sounds negative to me.", "hard to say", "NEUTRAL", "positive or negative"]
    texts = ["positive", "Positive!", "I can't tell.", "The text is neutral.", "negative"]
    # same: yes, no (negative vs positive), yes (both unmapped), yes, no (ambiguous vs negative): 3 of 5
    a = label_agreement(answers, texts, LABELS)
    assert a["agreement"] == pytest.approx(60.0) and a["n"] == 5 and a["labels"] == LABELS
    assert [u["label"] for u in a["per_utterance"]] == ["positive", "negative", None, "neutral", None]
    assert [u["text_label"] for u in a["per_utterance"]] == ["positive", "positive", None, "neutral", "negative"]
    assert "unmapped" in a["label_rule"]
    assert label_agreement(["Neutral."], ["neutral"], LABELS)["agreement"] == 100.0
    assert label_agreement([], [], LABELS)["agreement"] is None
    json.dumps(a, allow_nan=False)


def test_wilson_ends_exactly_at_none_and_all_right_and_the_plot_takes_them():
    from blsp.metrics import wilson_interval
    from blsp.report import _error_bars

    assert wilson_interval(0, 40)[0] == 0.0 and wilson_interval(40, 40)[1] == 1.0
    table = {"blsp": {"accuracy": 0.0, "accuracy_ci": [6.9e-18, 0.09]}, "text": {"accuracy": 1.0,
                                                                                "accuracy_ci": [0.9, 1.0 - 1e-17]}}
    below, above = _error_bars({"table": table}, "accuracy", ["blsp", "text"])
    assert min(below + above) >= 0


@pytest.mark.parametrize("answer, attribute, label, rule", [
    ("female", "gender", "female", "exact"),
    ("The speaker is a woman.", "gender", "female", "keywords"),
    ("The speaker is a man, speaking in a quiet room.", "gender", "male", "keywords"),
    ("The speaker talks slowly.", "rate", "slow", "keywords"),
    ("The speaker talks at a normal pace.", "rate", "normal", "contains"),
    ("The speaker talks slowly, at a normal pace, or fast.", "rate", None, "ambiguous"),  # a hedge
    ("The speaker is whispering.", "whispered", "yes", "keywords"),
    ("The speaker is not whispering.", "whispered", "no", "keywords"),  # the keyword, negated
    ("No, the speaker is not whispering.", "whispered", "no", "contains"),
    ("There is loud background noise.", "noisy", "yes", "keywords"),
    ("The room is quiet.", "noisy", None, "none"),
    ("The speaker is a man, but they are actually a woman.", "gender", None, "none"),
])
def test_voice_answers_map_by_their_labels_then_by_the_words_that_name_a_class(answer, attribute, label, rule):
    match = map_voice_label(answer, attribute)
    assert (match.label, match.rule) == (label, rule)
