"""The suites in recipes/eval/, each on a tiny fake of its data's layout: converted with
`blsp data manifest` as the suite's header says, checked, and run end to end on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_corpus import records, tone
from conftest import write_corpus
from test_evaluation import behavior_data

from blsp.cli import main
from blsp.suites import load_suite, load_task_data
from blsp.voice import DESCRIBE_QUESTION, VOICE_ATTRIBUTES

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (REPO / "recipes" / "eval").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("private_cache")


def convert(*argv: str) -> None:
    assert main(["data", "manifest", *argv]) == 0


def fake_librispeech(root: Path) -> None:
    chapter = root / "LibriSpeech" / "test-clean" / "1089" / "134686"
    for uid in ("1089-134686-0000", "1089-134686-0001"):
        tone(chapter / f"{uid}.flac", fmt="FLAC")
    (chapter / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE WOULD BE STEW FOR DINNER\n"
                                                   "1089-134686-0001 STUFF IT INTO YOU HIS BELLY COUNSELLED HIM\n")
    convert("--librispeech", str(root / "LibriSpeech" / "test-clean"),
            "--output", str(root / "data" / "eval" / "librispeech-test-clean.jsonl"))


def fake_covost2(root: Path) -> None:
    clips = root / "cv" / "en" / "clips"
    for i in range(2):
        tone(clips / f"common_voice_en_{i}.mp3.wav")
    for pair, refs in (("en_de", ["Ein Satz.", 'Er sagte \\"hallo\\".']), ("en_zh-CN", ["一句话。", "他说你好。"])):
        tsv = root / "covost" / f"covost_v2.{pair}.test.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_text("path\tsentence\ttranslation\tclient_id\n" + "".join(
            f"common_voice_en_{i}.mp3.wav\t{s}\t{r}\tc{i}\n"
            for i, (s, r) in enumerate(zip(["A sentence.", 'He said \\"hello\\".'], refs))))
        short = "de" if pair == "en_de" else "zh"
        convert("--covost2", str(tsv), "--clips", str(clips), "--output",
                str(root / "data" / "eval" / f"covost2-en-{short}.jsonl"))


def fake_mustc(root: Path) -> None:
    split = root / "MUSTC" / "en-de" / "data" / "tst-COMMON"
    tone(split / "wav" / "ted_1096.wav", seconds=3.0)
    (split / "txt").mkdir(parents=True)
    (split / "txt" / "tst-COMMON.yaml").write_text(
        "- {duration: 1.25, offset: 0.5, rW: 4, uW: 0, speaker_id: spk.1096, wav: ted_1096.wav}\n"
        "- {duration: 0.75, offset: 2.0, rW: 3, uW: 0, speaker_id: spk.1096, wav: ted_1096.wav}\n")
    (split / "txt" / "tst-COMMON.en").write_text("Thank you so much.\nIt's great.\n")
    (split / "txt" / "tst-COMMON.de").write_text("Vielen Dank.\nEs ist toll.\n")
    convert("--mustc", str(split), "--output", str(root / "data" / "eval" / "mustc-en-de-tst-COMMON.jsonl"))


def fake_slue(root: Path) -> None:
    slue = root / "slue-voxceleb"
    for uid in ("id10059_229vKIGbxrI_00001", "id10059_229vKIGbxrI_00002", "id10060_x_00001"):
        tone(slue / "dev_raw" / f"{uid}.flac", seconds=2.0, fmt="FLAC")
    (slue / "slue-voxceleb_dev.tsv").write_text(
        "id\tnormalized_text\tspeaker_id\tsplit\tstart_second\tend_second\tsentiment\n"
        "id10059_229vKIGbxrI_00001\ti love this show\tid10059\tdev\t0.2\t1.4\tPositive\n"
        "id10059_229vKIGbxrI_00002\tit was fine i guess\tid10059\tdev\t0.0\t1.0\tNeutral\n"
        "id10060_x_00001\tyes and no\tid10060\tdev\t0.5\t1.5\t<mixed>\n")
    convert("--slue-voxceleb", str(slue / "slue-voxceleb_dev.tsv"),
            "--output", str(root / "data" / "eval" / "slue-voxceleb-dev.jsonl"))


def fake_demo(root: Path) -> None:
    """What `make demo` leaves: runs/demo/data/test.jsonl and runs/demo/behavior/test.jsonl."""
    behavior = behavior_data(root / "runs" / "demo" / "behavior", n=3)
    (root / "runs" / "demo" / "behavior" / "test.jsonl").write_text(behavior.read_text())
    data = root / "runs" / "demo" / "data"
    shutil.copytree(root / "runs" / "demo" / "behavior" / "wav", data / "wav")
    (data / "test.jsonl").write_text("".join(
        json.dumps({k: r[k] for k in ("id", "audio", "text", "voice", "voice_seen")}) + "\n"
        for r in records(behavior)))


def fake_voice(root: Path) -> None:
    """The voice corpus's test split in runs/voice/data/: lines stating the voice attributes, one
    of them a training voice and one a real clip (its noise level and voice unknown): the suite's
    `where` drops both."""
    data = write_corpus(root / "runs" / "voice" / "data", n=5)
    attributes = [dict(gender="female", rate="fast", pitch="high", whispered="no", noisy="yes", voice_seen=False),
                  dict(gender="male", rate="slow", pitch="low", whispered="yes", noisy="no", voice_seen=True),
                  dict(gender="male", rate="normal", pitch="normal", whispered="no", noisy="no", voice_seen=False),
                  dict(gender="female"),
                  dict(gender="female", rate="slow", pitch="low", whispered="yes", noisy="no", voice_seen=False)]
    lines = [{**r, **a, **({"voice": f"espeak:en-us+v{i}"} if "voice_seen" in a else {})}
             for i, (r, a) in enumerate(zip(records(data), attributes))]
    (data.parent / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def fake_real(root: Path) -> None:
    """What `blsp data real` leaves in runs/demo/real/: real.jsonl naming each clip's package."""
    data = write_corpus(root / "runs" / "demo" / "real", n=3)
    lines = [{**r, "source": "fake", "package": "fake==1.0", "licence": "MIT"} for r in records(data)]
    (data.parent / "real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


FAKES = {"demo.yaml": fake_demo, "voice.yaml": fake_voice, "real-speech.yaml": fake_real,
         "librispeech-test-clean.yaml": fake_librispeech, "covost2.yaml": fake_covost2,
         "mustc.yaml": fake_mustc, "slue-voxceleb.yaml": fake_slue}


def test_every_shipped_suite_has_a_fake():
    assert sorted(FAKES) == SHIPPED


@pytest.fixture
def repo_copy(tmp_path):
    """A repository-shaped folder: the shipped suites in recipes/eval/, data beside them."""
    (tmp_path / "recipes").mkdir()
    shutil.copytree(REPO / "recipes" / "eval", tmp_path / "recipes" / "eval")
    return tmp_path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_suite_on_a_fake_of_its_layout(name, repo_copy, tiny_dirs, tiny_whisper_dir, capsys):  # noqa: F811
    FAKES[name](repo_copy)
    suite_path = repo_copy / "recipes" / "eval" / name
    suite = load_suite(suite_path)
    for spec in suite.tasks:
        data = load_task_data(spec)
        assert data.utterances and spec.manifest.is_relative_to(repo_copy)
    out = repo_copy / "out"
    code = main(["eval", "--untrained", "--encoder", tiny_whisper_dir, "--llm", tiny_dirs["llm"], "--suite",
                 str(suite_path), "--limit", "2", "--batch-size", "2", "--max-new-tokens", "3",
                 "--no-feature-cache", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == [t.name for t in suite.tasks]
    for task in results["tasks"].values():
        if task["type"] == "behaviour":  # the text path is what both rows are measured against
            assert {"blsp", "cascade"} <= set(task["table"])
        elif task["type"] != "representation":
            assert {"blsp", "cascade", "text"} <= set(task["table"])


def test_converted_references(repo_copy, capsys):
    fake_covost2(repo_copy)
    de, zh = (records(repo_copy / "data" / "eval" / f"covost2-en-{x}.jsonl") for x in ("de", "zh"))
    assert [(r["text"], r["translation"], r["speaker"]) for r in de] == [
        ("A sentence.", "Ein Satz.", "c0"), ('He said "hello".', 'Er sagte "hallo".', "c1")]
    assert zh[1]["translation"] == "他说你好。" and de[0]["audio"] == "../../cv/en/clips/common_voice_en_0.mp3.wav"
    fake_mustc(repo_copy)
    mustc = records(repo_copy / "data" / "eval" / "mustc-en-de-tst-COMMON.jsonl")
    assert [(r["id"], r["audio"], r["translation"]) for r in mustc] == [
        ("ted_1096_0", "../../MUSTC/en-de/data/tst-COMMON/wav/ted_1096.wav:8000:20000", "Vielen Dank."),
        ("ted_1096_1", "../../MUSTC/en-de/data/tst-COMMON/wav/ted_1096.wav:32000:12000", "Es ist toll.")]
    capsys.readouterr()
    fake_slue(repo_copy)
    assert "sentiment '<mixed>' is none of Negative, Neutral, Positive" in capsys.readouterr().out
    slue = records(repo_copy / "data" / "eval" / "slue-voxceleb-dev.jsonl")
    assert [(r["id"], r["audio"].rsplit("/", 1)[1], r["text"], r["sentiment"]) for r in slue] == [
        ("id10059_229vKIGbxrI_00001", "id10059_229vKIGbxrI_00001.flac:3200:19200", "i love this show", "Positive"),
        ("id10059_229vKIGbxrI_00002", "id10059_229vKIGbxrI_00002.flac:0:16000", "it was fine i guess", "Neutral")]


def test_the_voice_suite_asks_what_step_1_answered(repo_copy, tiny_dirs, tiny_whisper_dir, capsys):
    """recipes/eval/voice.yaml: one task per attribute with blsp.voice's question and labels, and
    the description task; the four rows; only the unseen voices' lines."""
    fake_voice(repo_copy)
    suite = load_suite(repo_copy / "recipes" / "eval" / "voice.yaml")
    by_name = {t.name: t for t in suite.tasks}
    assert list(by_name) == [*VOICE_ATTRIBUTES, "description"]
    for name, attribute in VOICE_ATTRIBUTES.items():
        task = by_name[name]
        assert task.instruction == attribute.question and task.options.labels == attribute.labels
        assert task.options.label_field == name
    for task in suite.tasks:
        assert task.rows == ("blsp", "cascade", "text", "described")
        data = load_task_data(task)
        assert [u.id for u in data.utterances] == ["u0", "u2", "u4"] and data.n_selected == 3
    out = repo_copy / "out"
    code = main(["eval", "--untrained", "--encoder", tiny_whisper_dir, "--llm", tiny_dirs["llm"], "--suite",
                 str(repo_copy / "recipes" / "eval" / "voice.yaml"), "--max-new-tokens", "3", "--batch-size", "4",
                 "--no-feature-cache", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    tasks = json.loads((out / "results.json").read_text())["tasks"]
    assert tasks["description"]["instruction"] == DESCRIBE_QUESTION
    assert tasks["gender"]["manifest"]["where"] == {"voice_seen": False}
    assert set(tasks["description"]["table"]["described"]) == {"overall", "overall_ci", *VOICE_ATTRIBUTES}
    assert "(where voice_seen=false: 3 line(s))" in printed and "described (gold+voice->LLM)" in printed
