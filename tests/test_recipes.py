"""The recipe runners outside the package: the demo end to end, the ablation's test selection and table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A visit to a strange place will bring fresh work.",
             "She found that he had lied to her again.", "The ship rolled on the heavy seas all night.",
             "Anything worth doing is worth doing slowly and well.", "The home team easily demolished the visitors.",
             "Every cloud has a silver lining somewhere up high.", "The old clock in the hall struck nine times."]


def load_recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_selects_the_unseen_voice_with_paths_that_still_resolve(tmp_path):
    ablation = load_recipe_module("ablation")
    src = tmp_path / "behavior" / "test.jsonl"
    src.parent.mkdir()
    src.write_text("\n".join(json.dumps({"audio": f"../data/wav/{v}.wav", "text": "t", "voice_seen": v == "awb"})
                             for v in ("slt", "awb")) + "\n")
    dest = ablation.select_test(src, {"voice_seen": False}, tmp_path / "out" / "test.jsonl")
    (line,) = [json.loads(l) for l in dest.read_text().splitlines()]
    assert (dest.parent / line["audio"]).resolve() == (tmp_path / "data" / "wav" / "slt.wav").resolve()


def fake_row(run: Path, gap: float, warm_s: float, train_s: float, features: tuple[float, int] = (0.0, 0)) -> None:
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps({
        "alignment": {"gap_closed": gap, "gap_closed_ci95": [gap - 0.02, gap + 0.02], "kl_text_speech": 1.0,
                      "n_utterances": 100, "loss": {"instruction": 2.6, "speech": 2.0, "transcript": 0.9}},
        "transcription": {"blsp": {"wer": 0.5}}}))
    (run / "train_summary.json").write_text(json.dumps({
        "steps": 115, "options": {"warm_start": "ctc", "warm_start_steps": 250},
        "warm_start_s": warm_s, "train_s": train_s, "peak_rss_mb": 3072,
        "features_s": features[0], "clips_encoded": features[1]}))


def test_ablation_table_reports_every_finished_row_as_markdown_json_and_png(tmp_path):
    ablation = load_recipe_module("ablation")
    rows = [{"name": "a", "what": "first", "train": {"max_steps": 115}},
            {"name": "b", "what": "second", "train": {"drop_copies": True}},
            {"name": "unfinished", "what": "not run", "train": {}}]
    fake_row(tmp_path / "a", 0.25, 240, 360)
    fake_row(tmp_path / "b", 0.40, 0, 600, features=(351.0, 1800))  # it filled its feature cache
    done = [r for row in rows if (r := ablation.row_result(row, tmp_path / row["name"]))]
    assert [r["name"] for r in done] == ["a", "b"] and done[0]["minutes"] == 10.0 and done[1]["peak_rss_gb"] == 3.0
    recipe = {"train_data": "train.jsonl", "test_data": "test.jsonl", "test_where": {"voice_seen": False}}
    ablation.write_table(done, recipe, tmp_path / "docs" / "ablation")
    md = (tmp_path / "docs" / "ablation.md").read_text()
    assert "| **a**: first | 25.0 (23.0–27.0) |" in md and "| **b**: second | 40.0" in md
    assert "| 10.0 |  | 3.0 |" in md and "| 10.0 | 5.8 (1,800) | 3.0 |" in md  # a's features were cached
    assert json.loads((tmp_path / "docs" / "ablation.json").read_text())["rows"][1]["flags"] == ["--drop-copies"]
    assert (tmp_path / "docs" / "ablation.png").stat().st_size > 5000


def test_the_demo_runs_every_stage_reports_and_resumes(tmp_path, tiny_dirs, tiny_whisper_dir, private_cache,
                                                        monkeypatch, capsys):
    """recipes/demo.py end to end on tiny models and four spoken sentences: corpus, step 1, step 2,
    a second round on a grown corpus, the three evaluations of its model, then report.json,
    report.png and the printed report; run again, every stage resumes and the numbers stay."""
    import shutil
    import sys

    import yaml

    if shutil.which("flite") is None:
        pytest.fail("flite is not installed: run `make system-deps` (apt-get install flite)")
    demo = load_recipe_module("demo")
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    data_recipe = tmp_path / "data.yaml"
    data_recipe.write_text(yaml.safe_dump({
        "train_sentences": 4, "dev_sentences": 1, "test_sentences": 2, "voices": ["kal"], "test_voices": ["slt"],
        "voices_per_sentence": 1, "dev_voices_per_sentence": 1, "test_seen_voices": 1, "min_words": 4}))
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny",
        "data": {"spec": str(data_recipe), "text": str(text)},
        "models": {"encoder": tiny_whisper_dir, "llm": tiny_dirs["llm"]},
        # step 1 on 3 of the 4 train clips; the warm start hears all 4
        "continue": {"batch_size": 4, "max_new_tokens": 6, "train_max_new_tokens": 2, "train_utterances": 3},
        "train": {"preset": "paper", "warm_start": "ctc", "warm_start_steps": 2, "warm_start_batch_size": 2,
                  "max_steps": 2, "batch_size": 2, "save_every": 1},
        # round 2: the corpus grown to 5 train sentences, step 1 on the 2 clips round 1 left (as two
        # windows of one clip each), 1 more step
        "more_rounds": [{"sentences": 5, "from": [3, 4], "train_utterances": [1, 1], "max_steps": 1}],
        "eval": {"tasks": "alignment,examples", "cascade_limit": 2, "untrained_limit": 3, "no_repeat_ngram_size": 2,
                 # the behaviour sets: the unseen voice's 2 clips, clean and through the telephone band
                 # (real speech needs downloads: tests/test_realspeech.py)
                 "behaviour_limit": 2, "degraded": ["telephone"], "real_sources": "", "behaviour_batch_size": 2}}))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["demo.py", "--recipe", str(recipe), "--output", str(out)])

    demo.main()
    first = json.loads((out / "report.json").read_text())
    printed = capsys.readouterr().out
    assert first["trained"]["alignment"]["n_utterances"] == 4  # 2 test sentences x (unseen + seen voice)
    assert first["untrained"]["alignment"]["n_utterances"] == 3
    assert first["cascade"]["transcription"]["n_utterances"] == 2 and "cascade" in first["cascade"]["transcription"]
    assert "gap_closed_cascade" in first["cascade"]["alignment"]
    assert set(first["timings_s"]) >= {"speech corpus", "step 2", "evaluation (transcription, cascade)"}
    assert "a voice never heard in training" in printed and "zero-shot transcription on the same 2 clips" in printed
    # the recipe's loop guard decoded the LLM's transcriptions and examples, and the report says so
    assert first["cascade"]["transcription"]["decoding"] == {"greedy": True, "no_repeat_ngram_size": 2}
    assert first["trained"]["identity"]["decoding"]["no_repeat_ngram_size"] == 2
    assert "'transcribe' over speech; greedy, no 2-gram twice" in printed
    assert (out / "report.png").stat().st_size > 20_000
    # the behaviour headline per set, first in the report: BLSP beside the cascade, the bars
    sets = first["behaviour"]["behaviour"]
    assert list(sets) == ["TTS, unseen voice", "TTS, unseen voice, telephone"]
    assert all(s["rows"]["cascade"]["agreement"] and "kl" in s["bars"] for s in sets.values())
    assert printed.index("behaviour (what the LLM writes") < printed.index("behaviour alignment on held-out")
    train_lines = [json.loads(l) for l in (out / "behavior" / "train.jsonl").read_text().splitlines()]
    assert len(train_lines) == 3
    # train rows: 2 tokens (a word at most each); the test rows were allowed 6
    assert all(len(r["continuation"].split()) <= 2 for r in train_lines)
    assert json.loads((out / "adapter" / "train_summary.json").read_text())["warm_start_clips"] == 4
    # round 2 continued the train clips round 1 did not (the 4th, and the 5th sentence it synthesised)
    # and went on from round 1's model; the evaluations are of its model
    train = [json.loads(l)["id"] for l in (out / "data" / "train.jsonl").read_text().splitlines()]
    round2 = [json.loads(l)["id"] for l in (out / "behavior" / "train_round2.jsonl").read_text().splitlines()]
    assert len(train) == 5 and sorted(round2) == sorted(train[3:])
    summary2 = json.loads((out / "adapter_round2" / "train_summary.json").read_text())
    assert (summary2["options"]["init_from"], summary2["steps"], summary2["warm_start_clips"]) == (str(out / "adapter"), 1, 0)
    assert first["trained"]["identity"]["model_dir"] == str(out / "adapter_round2")
    assert {"step 1 (round 2), part 1", "step 1 (round 2), part 2", "step 2 (round 2)"} <= set(first["timings_s"])

    demo.main()  # every stage finds its work done
    again = json.loads((out / "report.json").read_text())
    assert "0 clips made" in capsys.readouterr().out
    assert again["trained"]["alignment"]["loss"] == first["trained"]["alignment"]["loss"]


def test_a_rebuilt_table_keeps_rows_run_on_another_machine_with_their_machine(tmp_path, monkeypatch):
    import sys

    import yaml

    ablation = load_recipe_module("ablation")
    elsewhere = tmp_path / "elsewhere" / "old"
    elsewhere.parent.mkdir()
    fake_row(elsewhere, 0.20, 240, 360)
    old = {k: v for k, v in ablation.row_result({"name": "old", "what": "ran elsewhere", "train": {}}, elsewhere).items()
           if k not in ("date", "machine")}
    docs = tmp_path / "docs" / "ablation"
    docs.parent.mkdir()  # the table as an earlier run left it: one date and machine for all rows
    docs.with_suffix(".json").write_text(json.dumps({"date": "2026-11-22", "machine": "2 CPU cores (AMD EPYC), Linux",
                                                     "rows": [old]}))
    fake_row(tmp_path / "runs" / "new", 0.30, 100, 200)
    recipe = tmp_path / "ablation.yaml"
    recipe.write_text(yaml.safe_dump({
        "train_data": "train.jsonl", "test_data": "test.jsonl", "test_where": {"voice_seen": False},
        "output": str(tmp_path / "runs"), "docs": str(docs),
        "rows": [{"name": "old", "what": "ran elsewhere", "train": {}}, {"name": "new", "what": "ran here", "train": {}},
                 {"name": "never", "what": "not run anywhere", "train": {}}]}))
    monkeypatch.setattr(sys, "argv", ["ablation.py", "--recipe", str(recipe), "--table-only"])
    ablation.main()
    rows = json.loads(docs.with_suffix(".json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["old", "new"]
    assert (rows[0]["date"], rows[0]["machine"]) == ("2026-11-22", "2 CPU cores (AMD EPYC), Linux")
    assert rows[1]["machine"] == ablation.machine() and rows[0]["gap_closed"] == 0.20
    md = docs.with_suffix(".md").read_text()
    assert "| 2026-11-22, AMD EPYC |" in md and "| **new**: ran here | 30.0" in md


@pytest.mark.parametrize("size", ["default", "full", "encoder", "medium", "full-encoder", "long", "voice", "multilingual"])
def test_every_demo_size_parses_into_the_commands_it_runs(size):
    """A typo in a demo recipe should fail here, not an hour into `make demo SIZE=...`."""
    from blsp.cli import build_parser
    from blsp.options import option_flags, options_from_args as train_options

    demo = load_recipe_module("demo")
    recipe = demo.load_recipe(demo.SIZES[size])
    parser = build_parser()
    data = {k: v for k, v in recipe["data"].items() if k != "spec"}
    cont = {k: v for k, v in recipe["continue"].items() if k not in ("train_utterances", "train_max_new_tokens")}
    parser.parse_args(["data", "synth", "--output", "x", *option_flags(data)])
    parser.parse_args(["continue", "--manifest", "m", "--output", "o", *option_flags(cont)])
    train = parser.parse_args(["train", "--data", "d", "--output-dir", "o", *option_flags(recipe["train"]),
                               *(["--warm-start-data", "m"] if "train_utterances" in recipe["continue"]
                                 and demo.warm_starts(recipe["train"]) else [])])
    train_options(train)  # the options' own checks, as `blsp train` runs them
    for spec in recipe.get("more_rounds") or []:
        assert "train_utterances" in spec
        assert all(count > 0 for _, count in demo.round_windows(spec, 0))
        parser.parse_args(["continue", "--manifest", "m", "--output", "o", "--skip", "1", "--limit", "1"])
        again = parser.parse_args(["train", "--data", "d", "--output-dir", "o2", "--init-from", "o",
                                   *demo.round_train_flags(recipe, spec)])
        train_options(again)
    assert set(recipe["eval"]) <= {"tasks", "cascade_limit", "untrained_limit", *demo.GUARD_KEYS,
                                   *demo.BEHAVIOUR_DEFAULTS, *demo.VOICE_KEYS, *demo.CROSSLINGUAL_KEYS}
    for spec in recipe["eval"].get("crosslingual") or []:  # test-only corpora in a language never trained on
        from blsp.corpus import load_corpus_spec

        spec = load_corpus_spec(demo.HERE.parent / spec)
        assert spec.language != "en" and spec.train_sentences == 0
    if recipe["eval"].get("voice_suite"):
        suite = demo.HERE.parent / recipe["eval"]["voice_suite"]
        assert suite.exists() and recipe["continue"].get("voice_questions") and recipe["train"].get("voice_vectors")
    ev = {**demo.BEHAVIOUR_DEFAULTS, **recipe["eval"]}
    parser.parse_args(["data", "degrade", "--manifest", "m", "--output", "o", "--conditions", ",".join(ev["degraded"])])
    parser.parse_args(["data", "real", "--output", "o", "--sources", ev["real_sources"]])
    parser.parse_args(["eval", "--data", "d", "--output-dir", "o", *demo.guard_flags(recipe["eval"])])
    assert (demo.HERE.parent / recipe["data"]["spec"]).exists()


def test_a_round_takes_one_window_of_train_clips_or_several():
    demo = load_recipe_module("demo")
    assert demo.round_windows({"train_utterances": 5}, 7) == [(7, 5)]  # after the rounds before
    assert demo.round_windows({"from": 2, "train_utterances": 5}, 7) == [(2, 5)]
    assert demo.round_windows({"from": [11200, 23200], "train_utterances": [800, 800]}, 0) == [(11200, 800), (23200, 800)]
    for bad in ({"from": [1, 2], "train_utterances": 5}, {"from": [1], "train_utterances": [1, 2]},
                {"from": [], "train_utterances": []}):
        with pytest.raises(SystemExit, match="both be numbers or both lists"):
            demo.round_windows(bad, 0)


def test_the_demo_report_says_when_transcription_was_trained_not_zero_shot():
    demo = load_recipe_module("demo")
    label = lambda train: demo.transcription_label({"train": train})
    assert label({}) == "transcription (30% of step 2's clips trained on their transcript)"  # `blsp train`'s default
    assert label({"preset": "paper"}) == "zero-shot transcription"
    assert label({"preset": "decoder", "mix_transcribe": 0}) == "zero-shot transcription"
    assert label({"preset": "paper", "mix": "summarize=0.1, transcribe=0.2"}) == (
        "transcription (20% of step 2's clips trained on their transcript)")
    # as `blsp train` reads it: a typed --mix transcribe=... replaces the preset's share, not adds to it
    assert label({"mix": "transcribe=0.1"}) == "transcription (10% of step 2's clips trained on their transcript)"
    assert demo.warm_starts({"preset": "fast"}) and not demo.warm_starts({})


def test_make_demo_installs_what_blsp_serve_needs(tmp_path):
    """The README's first command leaves a working `blsp serve` (the `serve` extra), not one that
    stops with 'needs the serve extra'. A dry run (-n) prints the commands without running them."""
    import subprocess

    dry = subprocess.run(["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    installs = [line for line in dry.splitlines() if "pip install" in line and " -e " in line]
    assert installs and any("[serve" in line or ",serve" in line for line in installs), installs


def test_the_demo_report_shows_the_voice_suite_beside_its_rows():
    demo = load_recipe_module("demo")
    task = {"type": "classification", "rows": ["blsp", "cascade", "described"], "manifest": {"n_evaluated": 40},
            "table": {"blsp": {"accuracy": 0.925, "accuracy_ci": [0.8, 0.97]},
                      "cascade": {"accuracy": 0.5, "accuracy_ci": [0.35, 0.65]},
                      "described": {"accuracy": 0.55, "accuracy_ci": [0.4, 0.7]},
                      "heard": {"accuracy": 0.975}}}
    description = {"type": "voice_description", "rows": ["blsp", "cascade"],
                   "table": {"blsp": {"overall": 0.81}, "cascade": {"overall": 0.2}},
                   "examples": [{"id": "t1", "description": "The speaker is a woman.", "blsp": "A woman speaks."}]}
    lines = demo.format_voice({"tasks": {"gender": task, "description": description}})
    text = "\n".join(lines)
    assert "voices never heard in training (first 40 clips" in lines[0]
    assert "gender" in text and "92.5% (80.0%..97.0%)" in text and "50.0% (35.0%..65.0%)" in text
    assert "blsp 81.0%  cascade 20.0%" in text and "blsp says: A woman speaks." in text
    assert "classifiers heard, before the LLM says it: gender 97.5%" in text
    assert demo.format_voice({}) == []


def test_the_report_says_which_way_the_voice_gate_went():
    demo = load_recipe_module("demo")
    summary = {"voice": {"tasks": {"gender": {"voice_gate": "open"}, "rate": {"voice_gate": "open"}}},
               "behaviour": {"tasks": {"a: behaviour": {"instructions": {"continue": {"voice_gate": "closed"},
                                                                         "speaker": {"voice_gate": "closed"}}},
                                       "b: behaviour": {"instructions": {"continue": {"voice_gate": "closed"}}}}}}
    assert demo.format_gate(summary) == [
        "the voice gate (the voice vectors read only under a question about the voice):",
        "  voice questions: gender open, rate open",
        "  behaviour instructions: continue closed, speaker closed"]
    assert demo.format_gate({"voice": {"tasks": {"gender": {}}}}) == []  # no gate: nothing to say


def behaviour_results(path: Path, set_name: str, keywords: float) -> None:
    bars = {"kl": {"met": True}, "agreement:keywords": {"met": keywords >= 27}}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"behaviour": {set_name: {
        "rows": {"blsp": {"kl_answers": 0.2, "agreement": {"keywords": keywords}, "runaway": 0.05, "wer": 0.3},
                 "cascade": {"kl_answers": 0.18, "agreement": {"keywords": 30.0}, "runaway": 0.04}},
        "kl_measured_on": "kl_answers", "whisper_wer": 0.1, "bars": bars}}}))


def test_behaviour_ablation_reads_each_rows_extra_suites_into_its_sets_and_runs_each_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))  # it imports the step-2 ablation's runner
    ablation = load_recipe_module("behaviour_ablation")
    run = tmp_path / "row"
    behaviour_results(run / "eval", "real speech", 20.0)
    behaviour_results(run / "eval-real-all", "real speech, all clips", 29.0)
    result = ablation.row_result({"name": "row", "what": "a lever"}, run)
    assert set(result["sets"]) == {"real speech", "real speech, all clips"}
    assert result["sets"]["real speech, all clips"]["agreement"] == {"keywords": 29.0}
    assert [s["bars_met"] for s in result["sets"].values()] == [1, 2]

    calls = []
    monkeypatch.setattr(ablation, "blsp", lambda *args, log: calls.append(args))
    recipe = {"suite": "demo.yaml", "limit": 16, "extra_suites": {"real-all": "real.yaml", "more": "more.yaml"}}
    ablation.run_extra_suites({"name": "row"}, recipe, run, "model", tmp_path / "log")
    # real-all is there: only `more` runs, on its whole suite (no --limit)
    assert calls == [("eval", "--model", "model", "--suite", "more.yaml", "--batch-size", "24",
                      "--output-dir", str(run / "eval-more"))]
