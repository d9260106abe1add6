"""Suite files: every mistake is reported with the suite's (or the manifest's) file and line,
before any model is loaded; good suites parse into frozen specs with defaults filled in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_corpus

from blsp.cli import main
from blsp.errors import InputError
from blsp.prompts import TASK_INSTRUCTIONS, task_instruction
from blsp.suites import (
    ClassificationOptions,
    TranslationOptions,
    default_instruction,
    load_suite,
    load_task_data,
)


@pytest.fixture
def manifest(tmp_path) -> Path:
    """Four utterances with translations, sentiment labels and continuations."""
    path = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["translation"] = f"Satz {i}"
        r["sentiment"] = ["Positive", "negative", "Neutral", "positive"][i]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_suite(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


GOOD = """\
name: tiny
batch_size: 2
tasks:
  - type: transcription
    manifest: data/manifest.jsonl
  - name: to-german
    type: translation
    manifest: data/manifest.jsonl
    language: German
    target_lang: de
    metrics: [bleu]
    rows: [blsp, text]
  - type: classification
    manifest: data/manifest.jsonl
    label_field: sentiment
    labels: [positive, negative, neutral]
  - type: continuation
    manifest: data/manifest.jsonl
    limit: 2
  - type: representation
    manifest: data/manifest.jsonl
"""


def test_a_good_suite_parses_with_defaults(tmp_path, manifest):
    suite = load_suite(write_suite(tmp_path, GOOD))
    assert suite.name == "tiny" and suite.batch_size == 2 and len(suite.sha256) == 64
    names = [t.name for t in suite.tasks]
    assert names == ["transcription", "to-german", "classification", "continuation", "representation"]
    tr, mt, cl, co, rep = suite.tasks
    assert tr.metrics == ("wer", "cer") and tr.rows == ("blsp", "cascade", "text") and tr.line == 4
    assert tr.manifest == manifest  # relative to the suite file
    assert mt.options == TranslationOptions(language="German", target_lang="de") and mt.rows == ("blsp", "text")
    assert mt.metrics == ("bleu",)
    assert cl.options == ClassificationOptions(label_field="sentiment", labels=("positive", "negative", "neutral"))
    assert co.limit == 2 and rep.rows == ()
    assert default_instruction(tr) == task_instruction("transcribe") == \
        "Write down the following speech word for word, and nothing else."  # in the speech's own language
    assert default_instruction(mt) == "Please translate the following audio into German text."
    assert default_instruction(cl, cl.options.labels) == TASK_INSTRUCTIONS["sentiment"]
    # the data: labels as the suite spells them, gold canonicalised, limits applied
    data = load_task_data(cl)
    assert data.labels == ("positive", "negative", "neutral")
    assert data.gold == ("positive", "negative", "neutral", "positive")
    assert len(load_task_data(co).utterances) == 2 and load_task_data(co, limit=1).n_total == 4
    assert load_task_data(mt).gold[0] == "Satz 0" and load_task_data(tr).asr is None


def test_labels_default_to_the_values_found(tmp_path, manifest):
    suite = load_suite(write_suite(tmp_path, "tasks:\n  - {type: classification, manifest: data/manifest.jsonl, "
                                             "label_field: sentiment}\n"))
    data = load_task_data(suite.tasks[0])
    assert data.labels == ("negative", "Neutral", "Positive")  # one spelling each (the first seen), sorted
    assert data.gold == ("Positive", "negative", "Neutral", "Positive")


BAD_SUITES = [
    # (suite text, line, words in the message)
    ("tasks:\n  - type: transcription\n    manifest: data/nope.jsonl\n", 3, "manifest not found"),
    ("tasks:\n  - type: transcribe\n    manifest: data/manifest.jsonl\n", 2, "unknown task type 'transcribe'"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    metrics: [wer, bleu]\n", 4,
     "unknown metric 'bleu' for a transcription task"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    metrics:\n      - cer\n      - acc\n", 6,
     "unknown metric 'acc'"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    target_lang: de\n", 4,
     "unknown transcription task setting `target_lang`"),
    ("name: x\n\ntasks:\n  - type: translation\n    manifest: data/manifest.jsonl\n", 4, "needs `language:`"),
    ("tasks:\n  - manifest: data/manifest.jsonl\n", 2, "a task needs `type:`"),
    ("tasks:\n  - type: transcription\n", 2, "a task needs `manifest:`"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    limit: 0\n", 4, "at least 1"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    limit: ten\n", 4, "must be an integer"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    rows: [blsp, oracle]\n", 4,
     "unknown row 'oracle'"),
    ("tasks:\n  - type: representation\n    manifest: data/manifest.jsonl\n    rows: [blsp]\n", 4, "has no rows"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n  - type: transcription\n"
     "    manifest: data/manifest.jsonl\n", 4, "two tasks are named 'transcription'"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    type: translation\n", 4, "duplicate key"),
    ("name: x\ntask:\n  - type: transcription\n", 2, "unknown suite setting `task`"),
    ("name: x\n", 1, "needs `tasks:`"),
    ("tasks:\n  transcription: data/manifest.jsonl\n", 1, "needs `tasks:`, a list"),
    ("tasks:\n  - type: [transcription]\n    manifest: data/manifest.jsonl\n", 2, "unknown task type"),
    ("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    metrics: []\n", 4,
     "must list at least one"),
    ("tasks: [\n  {type: transcription,\n", 3, "not valid YAML"),
    ("tasks:\n  - type: classification\n    manifest: data/manifest.jsonl\n    labels: [pos, 3]\n", 4,
     "every item must be a non-empty string"),
    ("contrast_model: nowhere\ntasks:\n  - {type: transcription, manifest: data/manifest.jsonl}\n", 1,
     "no adapter checkpoint"),
]


@pytest.mark.parametrize("text, line, words", BAD_SUITES)
def test_suite_errors_name_the_line(text, line, words, tmp_path, manifest):
    path = write_suite(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_suite(path)
    assert err.value.line == line and words in err.value.reason, str(err.value)
    assert str(err.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("edit, line, words", [
    (lambda r: r[2].pop("translation"), 3, "missing or empty `translation`"),
    (lambda r: r[1].update(sentiment="mixed"), 2, "gold label 'mixed' is not in the task's labels"),
    (lambda r: r[3].update(asr="an asr transcript"), 1, "no `asr` transcript, though other lines have one"),
    (lambda r: r[1].pop("continuation"), 2, "no `continuation`"),
])
def test_manifest_errors_name_the_manifest_line(edit, line, words, tmp_path, manifest):
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    edit(rows)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = load_suite(write_suite(tmp_path, GOOD))
    with pytest.raises(InputError) as err:
        for spec in suite.tasks:
            load_task_data(spec)
    assert (err.value.path, err.value.line) == (str(manifest), line) and words in err.value.reason, str(err.value)


def test_the_command_stops_before_loading_a_model(tmp_path, manifest, capsys, monkeypatch):
    import blsp.evaluation

    def no_model(*_):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(blsp.evaluation, "load_model_for_eval", no_model)
    path = write_suite(tmp_path, GOOD.replace("metrics: [bleu]", "metrics: [bleu, meteor]"))
    code = main(["eval", "--model", str(tmp_path), "--suite", str(path), "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"blsp: error: {path}:11: unknown metric 'meteor'") and "Traceback" not in err
    code = main(["eval", "--model", str(tmp_path), "--suite", str(path), "--data", str(manifest),
                 "--output-dir", str(tmp_path / "r")])
    assert code == 2 and "either --suite" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------
# Voice: the `where` filter, the described row, the voice_description task
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def voice_manifest(tmp_path) -> Path:
    """Five lines: unseen voices (u0, u3), a seen one (u1), one without voice_seen (u2: a real
    clip) and one whose voice_seen is 0, not false (u4); u2 states no attribute at all."""
    path = write_corpus(tmp_path / "data", n=5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    extra = [dict(voice_seen=False, gender="female", rate="fast", pitch="high", whispered="no", noisy="yes"),
             dict(voice_seen=True, gender="male", rate="slow", pitch="low", whispered="yes", noisy="no"),
             dict(),
             dict(voice_seen=False, gender="male", pitch="normal"),
             dict(voice_seen=0, gender="female")]
    path.write_text("".join(json.dumps({**r, **e}) + "\n" for r, e in zip(rows, extra)))
    return path


def voice_suite(tmp_path: Path, task: str) -> Path:
    return write_suite(tmp_path, "name: v\ntasks:\n" + task)


GENDER = "  - type: classification\n    manifest: data/manifest.jsonl\n    label_field: gender\n"


def test_where_keeps_the_lines_with_the_value_and_drops_those_without_the_field(tmp_path, voice_manifest):
    suite = load_suite(voice_suite(tmp_path, GENDER + "    where: {voice_seen: false}\n"))
    spec = suite.tasks[0]
    assert spec.where.required == (("voice_seen", False),) and spec.where.line == 6
    data = load_task_data(spec)
    # u1 is seen, u2 has no voice_seen, u4's 0 is not false
    assert [u.id for u in data.utterances] == ["u0", "u3"] and data.gold == ("female", "male")
    assert data.n_total == 5 and data.n_selected == 2
    assert [u.id for u in load_task_data(spec, limit=1).utterances] == ["u0"]  # the limit after the filter
    # a dropped line need not carry the task's field: u2 has no gender, yet no error
    seen = load_task_data(load_suite(voice_suite(tmp_path, GENDER + "    where:\n      voice_seen: true\n"
                                                           "      gender: male\n")).tasks[0])
    assert [u.id for u in seen.utterances] == ["u1"]
    # a list: any of its values (the lines that state a pitch, here low or normal)
    pitched = load_task_data(load_suite(voice_suite(tmp_path, GENDER + "    where: {pitch: [low, normal]}\n")).tasks[0])
    assert [u.id for u in pitched.utterances] == ["u1", "u3"]
    # without a filter, u2's missing label is an error at its line
    with pytest.raises(InputError) as err:
        load_task_data(load_suite(voice_suite(tmp_path, GENDER)).tasks[0])
    assert err.value.line == 3 and "missing or empty `gender`" in err.value.reason


@pytest.mark.parametrize("where, line, words", [
    ("    where: voice_seen\n", 6, "`where` must map manifest fields to the values"),
    ("    where: {}\n", 6, "`where` must map manifest fields"),
    ("    where:\n      voice_seen: [[false]]\n", 7, "`where`: `voice_seen` must be a string, a number or true/false"),
    ("    where:\n      voice_seen: []\n", 7, "or a list of them"),
    ("    where:\n      voice_seen: null\n", 7, "must be a string, a number or true/false"),
    ("    wher: {voice_seen: false}\n", 6, "unknown classification task setting `wher`"),
])
def test_where_errors_name_the_suite_line(where, line, words, tmp_path, voice_manifest):
    path = voice_suite(tmp_path, GENDER + where)
    with pytest.raises(InputError) as err:
        load_suite(path)
    assert (err.value.path, err.value.line) == (str(path), line) and words in err.value.reason, str(err.value)


def test_a_where_that_keeps_nothing_is_an_error_at_its_line(tmp_path, voice_manifest):
    path = voice_suite(tmp_path, "  - name: g\n    type: classification\n    manifest: data/manifest.jsonl\n"
                                 "    label_field: gender\n    where: {voice: nobody}\n")
    spec = load_suite(path).tasks[0]  # the suite is fine; the manifest is read with the task's data
    with pytest.raises(InputError) as err:
        load_task_data(spec)
    assert (err.value.path, err.value.line) == (str(path), 7)
    assert "task 'g' (line 3): `where` (voice=nobody) keeps none of the 5 line(s)" in err.value.reason
    assert "quote it" not in err.value.reason
    # an unquoted yes reads as true: the message says so when the lines hold strings
    path = voice_suite(tmp_path, GENDER + "    where: {whispered: yes}\n")
    with pytest.raises(InputError, match="whispered=true.* quote it"):
        load_task_data(load_suite(path).tasks[0])


def test_the_described_row_is_opt_in_and_known_to_voice_tasks_only(tmp_path, voice_manifest):
    task = GENDER + "    where: {voice_seen: false}\n"
    assert load_suite(voice_suite(tmp_path, task)).tasks[0].rows == ("blsp", "cascade", "text")
    spec = load_suite(voice_suite(tmp_path, task + "    rows: [text, described]\n")).tasks[0]
    assert spec.rows == ("text", "described")
    spec = load_suite(voice_suite(tmp_path, "  - {type: voice_description, manifest: data/manifest.jsonl, "
                                            "rows: [blsp, described], metrics: [overall, pitch]}\n")).tasks[0]
    assert spec.rows == ("blsp", "described") and spec.metrics == ("overall", "pitch")
    assert default_instruction(spec) == "Describe the speaker's voice in one sentence."
    path = voice_suite(tmp_path, "  - type: transcription\n    manifest: data/manifest.jsonl\n"
                                 "    rows:\n      - blsp\n      - described\n")
    with pytest.raises(InputError) as err:
        load_suite(path)
    assert err.value.line == 7 and "unknown row 'described' for a transcription task (known: blsp, cascade, text; " \
        "`described` is a row of classification and voice_description tasks)" in err.value.reason
    path = voice_suite(tmp_path, "  - {type: voice_description, manifest: data/manifest.jsonl, metrics: [age]}\n")
    with pytest.raises(InputError, match="unknown metric 'age' for a voice_description task"):
        load_suite(path)


def test_voice_tasks_need_lines_that_state_an_attribute(tmp_path, manifest):
    """`manifest` (the sentiment one) states no voice attribute: nothing to score, no ceiling."""
    spec = load_suite(write_suite(tmp_path, "tasks:\n  - {type: voice_description, manifest: data/manifest.jsonl}\n"
                                  )).tasks[0]
    with pytest.raises(InputError, match="no line states a voice attribute .*nothing to score"):
        load_task_data(spec)
    spec = load_suite(write_suite(tmp_path, "tasks:\n  - {type: classification, manifest: data/manifest.jsonl, "
                                  "label_field: sentiment, rows: [text, described]}\n")).tasks[0]
    with pytest.raises(InputError, match="row `described`: no line states a voice attribute"):
        load_task_data(spec)


def test_voice_description_data_is_each_lines_stated_attributes(tmp_path, voice_manifest):
    spec = load_suite(voice_suite(tmp_path, "  - {type: voice_description, manifest: data/manifest.jsonl}\n")).tasks[0]
    data = load_task_data(spec)
    assert data.gold[2] == {} and data.gold[3] == {"gender": "male", "pitch": "normal"}
    assert data.gold[0] == {"gender": "female", "rate": "fast", "pitch": "high", "whispered": "no", "noisy": "yes"}


def test_an_unquoted_yes_label_says_why(tmp_path, voice_manifest):
    path = voice_suite(tmp_path, GENDER.replace("gender", "whispered") + "    labels: [yes, no]\n")
    with pytest.raises(InputError) as err:
        load_suite(path)
    assert err.value.line == 6
    assert "not True (YAML reads a bare yes/no/on/off/true/false as a boolean" in err.value.reason


@pytest.mark.parametrize("extra, words", [
    ("    labels: [male, female]\n    label_keywords: accent\n", 'only "voice"'),
    ("    label_field: sentiment\n    labels: [male, female]\n    label_keywords: voice\n", "a voice attribute"),
    ("    labels: [man, woman]\n    label_keywords: voice\n", "gender's classes"),
])
def test_label_keywords_need_a_voice_attribute_and_its_classes(extra, words, tmp_path, voice_manifest):
    task = GENDER.replace("    label_field: gender\n", "") if "label_field" in extra else GENDER
    path = voice_suite(tmp_path, task + extra)
    with pytest.raises(InputError) as err:
        load_suite(path)
    assert words in err.value.reason, str(err.value)
    ok = load_suite(voice_suite(tmp_path, GENDER + "    labels: [female, male]\n    label_keywords: voice\n"))
    assert ok.tasks[0].options.label_keywords == "voice"


def test_the_cascade_transcribes_as_the_model_reads_unless_the_suite_says(tmp_path, manifest):
    from types import SimpleNamespace

    from blsp.tasks import Runner

    suite = load_suite(write_suite(tmp_path, "asr_language: auto\n" + GOOD))
    assert suite.asr_language == "auto" and load_suite(write_suite(tmp_path, GOOD)).asr_language is None
    model = lambda language: SimpleNamespace(config=SimpleNamespace(speech_language=language))  # noqa: E731
    assert Runner(model("auto")).asr_language == "auto"  # trained with Whisper's language detection
    assert Runner(model(None)).asr_language == "en"  # the encoder's frames: no language of its own
    assert Runner(model("en"), asr_language="auto").asr_language == "auto"
