"""blsp.parity: the behaviour instructions file, the bars, and the headline table on hand-made results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from blsp.errors import InputError
from blsp.parity import (
    BARS,
    BEHAVIOUR_INSTRUCTIONS,
    Bar,
    BehaviourInstruction,
    agreement_scores,
    answer_budget,
    format_parity,
    load_behaviour_instructions,
    parity_summary,
)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# The instructions file
# ----------------------------------------------------------------------------------------------
def test_the_shipped_instructions_load():
    items = load_behaviour_instructions()
    assert BEHAVIOUR_INSTRUCTIONS == ROOT / "recipes" / "behaviour.yaml"
    assert [i.name for i in items] == ["continue", "summarise", "keywords", "speaker", "sentiment"]
    by_name = {i.name: i for i in items}
    assert by_name["sentiment"].labels == ("positive", "negative", "neutral")
    assert by_name["sentiment"].instruction.startswith("Is the sentiment of the following text")
    assert all(i.labels == () for i in items if i.name != "sentiment")
    assert all(i.instruction == i.instruction.strip() and i.instruction for i in items)


def _training_instructions() -> dict[str, str]:
    from blsp.prompts import CONTINUATION_INSTRUCTION

    out = {"blsp.prompts.CONTINUATION_INSTRUCTION": CONTINUATION_INSTRUCTION}
    files = sorted((ROOT / "recipes").glob("instructions*.yaml"))
    assert files, "no recipes/instructions*.yaml found"
    for path in files:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and data, path
        out.update({f"{path.name}:{name}": text for name, text in data.items()})
    return out


def test_no_behaviour_instruction_is_a_training_instruction():
    """The behaviour measures are zero-shot: none of their instructions was trained on."""

    def norm(s: str) -> str:
        return " ".join(s.split()).casefold()

    trained = {norm(text): where for where, text in _training_instructions().items()}
    assert len(trained) >= 4
    for path in (ROOT / "recipes" / "behaviour.yaml", ROOT / "recipes" / "behaviour-crosslingual.yaml"):
        for item in load_behaviour_instructions(path):
            assert norm(item.instruction) not in trained, (path.name, item.name, trained.get(norm(item.instruction)))


def test_both_forms_of_an_entry(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("gist: '  Say it shortly.  '\n"
                    "mood:\n  instruction: Happy or sad?\n  labels: [happy, sad]\n"
                    "plain:\n  instruction: Repeat it.\n  labels: []\n")
    assert load_behaviour_instructions(path) == (
        BehaviourInstruction("gist", "Say it shortly."),
        BehaviourInstruction("mood", "Happy or sad?", ("happy", "sad")),
        BehaviourInstruction("plain", "Repeat it."),
    )
    assert load_behaviour_instructions(str(path)) == load_behaviour_instructions(path)


@pytest.mark.parametrize("text, line, message", [
    ("", 1, "expected a mapping of name: instruction"),
    ("- a\n- b\n", 1, "expected a mapping of name: instruction"),
    ("a: fine\nb: 3\n", 2, "b: give an instruction string"),
    ("a: fine\nb: [x, y]\n", 2, "b: give an instruction string"),
    ("a: fine\nb:\n  instruction: x\n  label: [p, q]\n", 2, "b: give an instruction string"),  # a misspelt key
    ("a: '   '\n", 1, "a: the instruction must be a non-empty string"),
    ("a: fine\n\nb:\n  labels: [p, q]\n", 3, "b: the instruction must be a non-empty string"),
    ("a:\n  instruction: 7\n", 1, "a: the instruction must be a non-empty string"),
    ("s:\n  instruction: x\n  labels: [only]\n", 1, "s: labels must be a list of two or more strings"),
    ("s:\n  instruction: x\n  labels: p, q\n", 1, "s: labels must be a list of two or more strings"),
    ("s:\n  instruction: x\n  labels: [p, 3]\n", 1, "s: labels must be a list of two or more strings"),
    ("s:\n  instruction: x\n  labels: [p, '']\n", 1, "s: labels must be a list of two or more strings"),
    ("a: one\na: two\n", 2, "duplicate key 'a'"),
    ("a: ok\nb: x\n  c: y\n", 3, "not valid YAML: mapping values are not allowed"),
])
def test_a_mistake_names_its_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "behaviour.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_behaviour_instructions(path)
    assert (err.value.path, err.value.line) == (str(path), line)
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InputError, match="behaviour instructions file not found") as err:
        load_behaviour_instructions(missing)
    assert err.value.path == str(missing) and str(err.value).startswith(str(missing))
    with pytest.raises(InputError, match="not found"):
        load_behaviour_instructions(tmp_path)  # a directory is not a file


# ----------------------------------------------------------------------------------------------
# Bars
# ----------------------------------------------------------------------------------------------
def test_the_bars():
    assert BARS["kl"] == Bar("kl", 1.5, "cascade")
    assert BARS["agreement"] == Bar("agreement", 0.9, "cascade", higher=True)
    assert BARS["wer"] == Bar("wer", 1.5, "whisper")
    assert BARS["runaway"].absolute == 0.01


@pytest.mark.parametrize("metric, value, baseline, met", [
    ("kl", 0.15, 0.1, True),          # at the bar: 1.5 x 0.1
    ("kl", 0.45, 0.3, True),          # 1.5 x 0.3 is 0.44999999999999996 in floats: still met
    ("kl", 0.1501, 0.1, False),
    ("kl", 0.0, 0.0, True),
    ("kl", 0.01, 0.0, False),         # a perfect cascade leaves no room
    ("kl", None, 0.1, None),          # nothing measured
    ("kl", 0.1, None, None),          # no baseline to compare with
    ("wer", 0.3, 0.2, True),
    ("wer", 0.31, 0.2, False),
    ("agreement", 45.0, 50.0, True),  # higher is better: >= 0.9 x 50
    ("agreement", 44.9, 50.0, False),
    ("agreement", 100.0, None, None),
    ("runaway", 0.01, None, True),    # an absolute bar: no baseline needed
    ("runaway", 0.011, 0.5, False),   # ... nor used
    ("runaway", 0.0, None, True),
    ("runaway", None, None, None),
])
def test_bar_check(metric, value, baseline, met):
    assert BARS[metric].check(value, baseline) is met


# ----------------------------------------------------------------------------------------------
# One instruction's answers
# ----------------------------------------------------------------------------------------------
class WordTokenizer:
    """One token a word, plus a start token unless add_special_tokens=False."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([0] if add_special_tokens else []) + list(range(len(text.split())))}


def test_answer_budget_is_three_times_the_longest_text_answer_plus_16():
    tok = WordTokenizer()
    assert answer_budget(tok, ["a b", "a b c d e", "a"]) == 3 * 5 + 16
    assert answer_budget(tok, ["one"]) == 3 + 16
    assert answer_budget(tok, []) == 16


def test_agreement_scores_of_closed_answers():
    item = BehaviourInstruction("mood", "Happy or sad?", ("happy", "sad"))
    answers = ["Happy.", "sad", "I'm sorry, but I cannot hear audio files.", "happy"]
    texts = ["happy", "Happy!", "sad", "It is happy."]
    s = agreement_scores(answers, texts, item)
    # same label: yes, no, no (unmapped vs sad), yes -> 50%; one refusal
    assert s["agreement"] == pytest.approx(50.0) and s["measure"] == "same label (%)"
    assert s["labels"] == ["happy", "sad"]
    assert s["runaway"] == {"rate": 0.25, "n": 4, "loop": 0, "refusal": 1, "long": 0}
    assert s["runaway_per_utterance"] == [None, None, "refusal", None]
    json.dumps(s, allow_nan=False)


def test_agreement_scores_of_free_answers():
    item = BehaviourInstruction("gist", "Say it shortly.")
    same = agreement_scores(["the cat sat on the mat", "a dog ran"], ["the cat sat on the mat", "a  dog ran"], item)
    assert same["agreement"] == pytest.approx(100.0) and same["identical"] == 1.0 and same["measure"] == "BLEU"
    assert same["bleu_signature"].startswith("nrefs:1|") and same["runaway"]["rate"] == 0.0
    loop = agreement_scores(["go go go go", "a dog ran"], ["the cat sat on the mat", "a dog ran"], item)
    assert loop["identical"] == 0.5 and 0 < loop["agreement"] < 100
    assert loop["runaway"]["loop"] == 1 and loop["runaway_per_utterance"] == ["loop", None]


# ----------------------------------------------------------------------------------------------
# The headline table
# ----------------------------------------------------------------------------------------------
def behaviour_result(blsp_kl=0.5, cascade_kl=0.3, runaway=(0.0, 0.25), gist=(40.0, 50.0), mood=(95.0, 100.0)):
    """A behaviour task's result as blsp/tasks.py writes it (the parts the summary reads, and some it does not)."""
    rows = ("blsp", "cascade")
    return {
        "type": "behaviour", "set": "", "rows": list(rows),
        "table": {row: {"kl": kl, "runaway": r, "agree:gist": g, "agree:mood": m}
                  for row, kl, r, g, m in zip(rows, (blsp_kl, cascade_kl), runaway, gist, mood)},
        "instructions": {
            "gist": {"instruction": "Say it shortly.", "labels": [],
                     "rows": {row: {"agreement": g, "measure": "BLEU", "kl": 0.4} for row, g in zip(rows, gist)}},
            "mood": {"instruction": "Happy or sad?", "labels": ["happy", "sad"],
                     "rows": {row: {"agreement": m, "measure": "same label (%)"} for row, m in zip(rows, mood)}},
        },
    }


def continuation_result(gap=1.08):
    return {"type": "continuation", "set": "", "rows": ["blsp", "cascade", "text", "floor"],
            "table": {"blsp": {"loss": 2.1, "kl": 0.12, "gap_closed": gap, "agreement": 30.0},
                      "cascade": {"loss": 2.2, "kl": 0.1, "gap_closed": 0.95, "agreement": 60.0},
                      "text": {"loss": 2.0, "gap_closed": 1.0, "agreement": None},
                      "floor": {"loss": 3.0, "gap_closed": 0.0}}}


def transcription_result(asr_wer=0.1):
    table = {"blsp": {"wer": 0.2, "cer": 0.1}, "cascade": {"wer": 0.1, "cer": 0.05}, "text": {"wer": 0.0, "cer": 0.0}}
    if asr_wer is not None:
        table["asr"] = {"wer": asr_wer, "cer": 0.05}
    return {"type": "transcription", "set": "", "rows": list(table), "table": table}


def full_suite():
    return {"transcription": transcription_result(),
            "translation": {"type": "translation", "table": {"blsp": {"bleu": 10.0}, "cascade": {"bleu": 20.0}}},
            "alignment": continuation_result(), "behaviour": behaviour_result()}


def test_the_summary_of_a_full_suite():
    s = parity_summary(full_suite())
    b, c = s["rows"]["blsp"], s["rows"]["cascade"]
    assert b == {"kl": 0.12, "gap_closed": 1.08, "kl_answers": 0.5, "runaway": 0.0,
                 "agreement": {"gist": 40.0, "mood": 95.0}, "wer": 0.2}
    assert c["kl"] == 0.1 and c["kl_answers"] == 0.3 and c["runaway"] == 0.25 and c["wer"] == 0.1
    assert s["whisper_wer"] == 0.1 and s["kl_measured_on"] == "kl"  # the continuations' KL when there is one
    bars = s["bars"]
    assert set(bars) == {"kl", "wer", "runaway", "agreement:gist", "agreement:mood"}
    assert bars["kl"]["value"] == 0.12 and bars["kl"]["baseline"] == 0.1
    assert bars["kl"]["limit"] == pytest.approx(0.15) and bars["kl"]["met"] is True
    assert bars["kl"]["rule"] == "<= 1.5x cascade" and bars["kl"]["higher_is_better"] is False
    assert bars["wer"]["limit"] == pytest.approx(0.15) and bars["wer"]["met"] is False  # 0.2 > 1.5 x Whisper's 0.1
    assert bars["runaway"]["limit"] == 0.01 and bars["runaway"]["met"] is True and bars["runaway"]["baseline"] is None
    assert bars["agreement:gist"]["limit"] == pytest.approx(45.0) and bars["agreement:gist"]["met"] is False
    assert bars["agreement:mood"]["limit"] == pytest.approx(90.0) and bars["agreement:mood"]["met"] is True
    assert bars["agreement:mood"]["rule"] == ">= 0.9x cascade" and bars["agreement:mood"]["higher_is_better"]
    assert s["drift"] is True and "drift" in s["note"]  # gap closed 108%
    json.dumps(s, allow_nan=False)


def test_without_continuations_the_kl_is_the_answers_and_there_is_no_drift():
    s = parity_summary({"behaviour": behaviour_result(blsp_kl=0.5, cascade_kl=0.3)})
    assert s["kl_measured_on"] == "kl_answers"
    assert s["bars"]["kl"]["value"] == 0.5 and s["bars"]["kl"]["limit"] == pytest.approx(0.45)
    assert s["bars"]["kl"]["met"] is False
    assert s["drift"] is False and s["whisper_wer"] is None
    assert s["bars"]["wer"] == {"value": None, "baseline": None, "limit": None, "higher_is_better": False,
                                "met": None, "rule": "<= 1.5x whisper"}
    met = parity_summary({"behaviour": behaviour_result(blsp_kl=0.45, cascade_kl=0.3)})
    assert met["bars"]["kl"]["met"] is True


@pytest.mark.parametrize("gap, drift", [(1.08, True), (1.0, False), (0.7, False), (None, False)])
def test_drift_is_a_gap_closed_past_100_percent(gap, drift):
    assert parity_summary({"alignment": continuation_result(gap)})["drift"] is drift


def test_a_runaway_rate_past_one_percent_fails_and_the_wer_needs_whispers_own():
    s = parity_summary({"behaviour": behaviour_result(runaway=(0.02, 0.0)),
                        "transcription": transcription_result(asr_wer=None)})
    assert s["bars"]["runaway"]["met"] is False
    assert s["rows"]["blsp"]["wer"] == 0.2 and s["bars"]["wer"]["met"] is None
    generous = parity_summary({"transcription": transcription_result(asr_wer=0.14)})
    assert generous["bars"]["wer"]["met"] is True and generous["bars"]["wer"]["limit"] == pytest.approx(0.21)


def test_no_speech_row_no_summary():
    assert parity_summary({}) is None
    cascade_only = {"type": "transcription", "table": {"cascade": {"wer": 0.1}, "asr": {"wer": 0.1}}}
    assert parity_summary({"transcription": cascade_only}) is None
    assert parity_summary({"translation": {"type": "translation", "table": {"blsp": {"bleu": 3.0}}}}) is None


# ----------------------------------------------------------------------------------------------
# The printed table
# ----------------------------------------------------------------------------------------------
def _line(lines: list[str], start: str) -> list[str]:
    found = [line for line in lines if line.strip().startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0].split()


def test_format_parity_prints_blsp_beside_the_cascade():
    lines = format_parity(parity_summary(full_suite()))
    assert lines[0].startswith("behaviour (what the LLM writes with the speech vs with the transcript")
    assert lines[1].split() == ["measure", "BLSP", "cascade", "bar", "met"]
    assert _line(lines, "KL(text||row) on continuations")[-5:] == ["0.120", "0.100", "<=", "0.150", "yes"]
    assert _line(lines, "KL(text||row) on answers")[-2:] == ["0.500", "0.300"]  # beside it, no bar
    assert _line(lines, "agreement: gist")[-5:] == ["40.0", "50.0", ">=", "45.0", "NO"]
    assert _line(lines, "agreement: mood")[-5:] == ["95.0", "100.0", ">=", "90.0", "yes"]
    assert _line(lines, "runaway answers")[-5:] == ["0.0%", "25.0%", "<=", "1.0%", "yes"]
    assert _line(lines, "transcription WER (vs Whisper's)")[-5:] == ["20.0%", "10.0%", "<=", "15.0%", "NO"]
    gap = _line(lines, "loss gap closed (secondary)")
    assert gap[4:6] == ["108.0%", "95.0%"] and "DRIFT:" in gap
    assert len(lines) == 2 + 6 + 1


def test_format_parity_without_continuations_or_whisper():
    s = parity_summary({"behaviour": behaviour_result(), "transcription": transcription_result(asr_wer=None)})
    lines = format_parity(s)
    assert _line(lines, "KL(text||row) on answers")[-5:] == ["0.500", "0.300", "<=", "0.450", "NO"]
    assert not any("on continuations" in line or "loss gap" in line for line in lines)
    assert _line(lines, "transcription WER")[-6:] == ["20.0%", "n/a", "<=", "1.5x", "whisper", "n/a"]
    no_drift = format_parity(parity_summary({"alignment": continuation_result(0.8)}))
    assert _line(no_drift, "loss gap closed")[-2:] == ["80.0%", "95.0%"] and "DRIFT" not in "\n".join(no_drift)


def test_a_perfect_speech_row_keeps_its_headline():
    summary = parity_summary({"t": {"type": "transcription", "table": {"blsp": {"wer": 0.0}, "asr": {"wer": 0.1}}}})
    assert summary["bars"]["wer"]["met"] is True
