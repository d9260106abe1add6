"""`blsp eval` on tiny models: the alignment numbers equal explicit forward passes, the metric
formulas equal hand computations, and the command writes results.json and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_corpus

from blsp.cli import main
from blsp.errors import InputError
from blsp.data import load_utterance_audio, normalize_transcript, read_manifest
from blsp.io import file_sha256
from blsp.metrics import bootstrap_gap_ci, error_rates, gap_closed
from blsp.scoring import (
    SpeechFeatures,
    alignment_report,
    continuation_examples,
    instruction_only_prompt,
    token_scores,
    transcription_report,
)
from blsp.features import encode_waveforms
from blsp.processing import Example
from blsp.prompts import CONTINUATION_INSTRUCTION
from blsp.behavior import read_behavior_data



pytestmark = pytest.mark.usefixtures("private_cache")  # nothing here writes to ~/.cache/blsp


def behavior_data(root: Path, n: int = 4) -> Path:
    """Behavior lines as step 1 writes them, with a voice field, one truncated continuation and
    one continuation that copies its transcript."""
    path = write_corpus(root, n=n, with_continuation=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["prompt_transcript"] = normalize_transcript(r["text"])  # as step 1 feeds it ("forty" -> "40")
        r["voice"] = "seen" if i % 2 else "unseen"
        r["voice_seen"] = bool(i % 2)
        r["truncated"] = i == 1
        r["fingerprint"] = "test"
    rows[2]["continuation"] = rows[2]["text"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------
# Metric formulas
# ----------------------------------------------------------------------------------------------
def test_wer_of_a_known_pair_is_exactly_a_quarter():
    assert error_rates(["the cat sat down"], ["the cat sat town"], normalise=False)["wer"] == 0.25
    # after Whisper's normaliser, case and punctuation are not errors
    scores = error_rates(["The cat sat down."], ["the cat, sat TOWN"])
    assert scores["wer"] == 0.25 and scores["substitutions"] == 1 and scores["ref_words"] == 4
    assert scores["cer"] == 1 / len("the cat sat down")
    # corpus WER is total edits over total reference words, not a mean of rates
    two = error_rates(["a b c d", "e f"], ["a b c d", ""], normalise=False)
    assert two["wer"] == 2 / 6 and [r["wer"] for r in two["per_utterance"]] == [0.0, 1.0]


def test_gap_closed_and_its_bootstrap_interval():
    assert gap_closed(3.0, 2.0, 1.0) == 0.5
    assert gap_closed(2.5, 2.5, 0.5) == 0.0 and gap_closed(2.5, 0.5, 0.5) == 1.0
    assert gap_closed(2.0, 1.0, 2.0) is None  # the transcript does not help: undefined
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(50, generator=gen) * 3 + 2).tolist()
    c = (torch.rand(50, generator=gen)).tolist()
    b = [ai - 0.3 * (ai - ci) for ai, ci in zip(a, c)]  # every utterance closes exactly 30%
    assert bootstrap_gap_ci(a, b, c, samples=200, seed=1) == pytest.approx([0.3, 0.3])
    b = [ai - (0.1 + 0.4 * k / 49) * (ai - ci) for k, (ai, ci) in enumerate(zip(a, c))]
    ci1, ci2 = bootstrap_gap_ci(a, b, c, samples=300, seed=7), bootstrap_gap_ci(a, b, c, samples=300, seed=7)
    point = (sum(a) - sum(b)) / (sum(a) - sum(c))
    assert ci1 == ci2 and ci1[0] < point < ci1[1]


def test_kl_of_identical_inputs_is_zero_and_chunking_changes_nothing(tiny_model):
    torch.manual_seed(0)
    h = torch.randn(7, tiny_model.language_model.config.hidden_size)
    h2 = torch.randn_like(h)
    targets = torch.randint(0, 50, (7,))
    same = token_scores(tiny_model, {"transcript": h, "speech": h}, targets)
    assert torch.equal(same["kl"], torch.zeros(7)) and torch.equal(same["transcript"], same["speech"])
    one, big = (token_scores(tiny_model, {"transcript": h, "speech": h2}, targets, chunk=k) for k in (1, 100))
    for key in one:
        assert torch.allclose(one[key], big[key], atol=1e-6), key
    assert (one["kl"] > 0).all()


# ----------------------------------------------------------------------------------------------
# Alignment numbers against explicit forward passes
# ----------------------------------------------------------------------------------------------
def explicit_scores(model, utt, feats):
    """(loss sums under the three prompts, number of targets, KL sum), one utterance at a time."""
    proc = model.processor
    target = proc.prompt.target_ids(utt.extra["continuation"], utt.extra["truncated"])
    examples = {
        "instruction": Example(instruction_only_prompt(model, CONTINUATION_INSTRUCTION), target=target),
        "speech": Example(proc.speech_prompt(CONTINUATION_INSTRUCTION), [feats], target),
        "transcript": Example(proc.transcript_prompt(CONTINUATION_INSTRUCTION, utt.extra["prompt_transcript"]),
                              target=target),
    }
    sums, logps = {}, {}
    with torch.no_grad():
        for name, ex in examples.items():
            out = model(**proc.collate([ex]), return_logits=True)
            assert out.n_tokens == len(target)
            sums[name] = float(out.loss_sum)
            logps[name] = F.log_softmax(out.logits[0, -len(target) - 1 : -1].float(), -1)
    kl = F.kl_div(logps["speech"], logps["transcript"], log_target=True, reduction="sum")
    return sums, len(target), float(kl)


def test_alignment_equals_explicit_forward_passes(tiny_model, tmp_path):
    utts, _ = read_behavior_data([behavior_data(tmp_path / "data", n=5)])
    report = alignment_report(tiny_model, utts, batch_size=2, bootstrap_samples=50, progress=False)

    feats = encode_waveforms(tiny_model, [load_utterance_audio(u) for u in utts])
    total = {"instruction": 0.0, "speech": 0.0, "transcript": 0.0}
    n_tok, kl_sum = 0, 0.0
    for u, f, row in zip(utts, feats, report["per_utterance"]):
        sums, n, kl = explicit_scores(tiny_model, u, f)
        assert row["id"] == u.id and row["n_tokens"] == n
        for c in total:
            total[c] += sums[c]
            assert row[f"loss_{c}"] == pytest.approx(sums[c] / n, rel=1e-4, abs=1e-5), (u.id, c)
        assert row["kl_text_speech"] == pytest.approx(kl / n, rel=1e-3, abs=1e-5)
        n_tok += n
        kl_sum += kl
    assert report["n_tokens"] == n_tok and report["n_utterances"] == 5
    a, b, c = (total[k] / n_tok for k in ("instruction", "speech", "transcript"))
    assert report["loss"] == pytest.approx({"instruction": a, "speech": b, "transcript": c}, rel=1e-4)
    assert report["gap_closed"] == pytest.approx((a - b) / (a - c), rel=1e-3, abs=1e-4)
    assert report["kl_text_speech"] == pytest.approx(kl_sum / n_tok, rel=1e-3, abs=1e-5)
    lo, hi = report["gap_closed_ci95"]
    assert lo <= hi
    # the truncated line scores no end-of-turn token
    eot = tiny_model.processor.prompt.end_of_turn_id
    t1 = tiny_model.processor.prompt.target_ids(utts[1].extra["continuation"], True)
    assert report["per_utterance"][1]["n_tokens"] == len(t1) and eot not in t1
    # breakdowns: by the voice field and by copy-vs-continue; their token counts add up
    assert set(report["groups"]["voice"]) == {"seen", "unseen"}
    assert sum(g["n_tokens"] for g in report["groups"]["voice"].values()) == n_tok
    assert report["groups"]["copy"]["true"]["n_utterances"] == 1
    assert report["groups"]["voice_seen"]["true"] == report["groups"]["voice"]["seen"]
    json.dumps(report, allow_nan=False)  # plain, strict JSON


def test_alignment_through_the_feature_cache_and_with_a_cascade(tiny_model, tmp_path):
    utts, _ = read_behavior_data([behavior_data(tmp_path / "data", n=3)])
    direct = alignment_report(tiny_model, utts, batch_size=3, bootstrap_samples=10, progress=False)
    # a perfect ASR, cased and punctuated: normalised as step 1 normalised the transcript
    asr = {u.id: u.text.capitalize() + "." for u in utts}
    cached = alignment_report(tiny_model, utts, batch_size=1, feature_cache=tmp_path / "features",
                              asr_transcripts=asr, bootstrap_samples=10, progress=False)
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 3
    # features are cached as float16: the same numbers to float16's precision
    assert cached["loss"]["speech"] == pytest.approx(direct["loss"]["speech"], rel=1e-2)
    assert cached["loss"]["cascade"] == pytest.approx(cached["loss"]["transcript"], rel=1e-5)
    assert cached["gap_closed_cascade"] == pytest.approx(1.0, abs=1e-4)


def test_a_feature_cache_of_other_features_than_the_model_reads_is_refused(tiny_model, tmp_path):
    """With trained top encoder layers the model reads features cut below them (config.feature_key);
    a cache opened by the encoder's fingerprint holds the whole encoder's: refused, not read."""
    from blsp.errors import BlspError
    from blsp.features import FeatureCache

    utts, _ = read_behavior_data([behavior_data(tmp_path / "data", n=3)])
    tiny_model.unfreeze_encoder_layers(1)
    whole = FeatureCache(tmp_path / "features", tiny_model.config.encoder_fingerprint)
    with pytest.raises(BlspError, match="the feature cache holds features .* but the model reads .*-below-layer1"):
        SpeechFeatures(tiny_model, utts, whole)
    assert not list((tmp_path / "features").rglob("*.npy"))  # nothing encoded into it
    below = FeatureCache(tmp_path / "features", tiny_model.config.feature_key)
    assert len(SpeechFeatures(tiny_model, utts, below)(utts)) == 3


def test_examples_and_transcription_report(tiny_model, tiny_whisper_dir, tmp_path):
    utts, _ = read_behavior_data([behavior_data(tmp_path / "data", n=3)])
    ex = continuation_examples(tiny_model, utts, n=2, max_new_tokens=4)
    assert [e["id"] for e in ex] == [utts[0].id, utts[1].id]
    assert all(isinstance(e["speech_continuation"], str) and e["text_continuation"] for e in ex)
    rep = transcription_report(tiny_model, utts, whisper=tiny_whisper_dir, max_new_tokens=4)
    assert rep["blsp"]["n"] == 3 and rep["cascade"]["n"] == 3 and rep["cascade"]["asr"] == tiny_whisper_dir
    rows = rep["per_utterance"]
    assert [r["id"] for r in rows] == [u.id for u in utts]
    hyps = [r["blsp"] for r in rows]
    assert rep["blsp"]["wer"] == error_rates([u.text for u in utts], hyps)["wer"]


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_dir(tiny_dirs, tmp_path_factory):
    from blsp.options import TrainOptions
    from blsp.training import run_train

    root = tmp_path_factory.mktemp("eval-run")
    data = behavior_data(root / "data", n=4)
    options = TrainOptions.from_flat(encoder=tiny_dirs["encoder"], llm=tiny_dirs["llm"], batch_size=2, max_steps=2,
                           warmup_steps=1, feature_cache=str(root / "features"))
    run_train([data], root / "adapter", options)
    return {"model": root / "adapter", "data": data, "features": root / "features"}


def test_eval_command_writes_results_and_plot(trained_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--model", str(trained_dir["model"]), "--data", str(trained_dir["data"]),
                 "--tasks", "alignment,examples,transcribe", "--limit", "3", "--batch-size", "2",
                 "--n-examples", "2", "--max-new-tokens", "4", "--bootstrap", "20",
                 "--feature-cache", str(trained_dir["features"]), "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    ident = results["identity"]
    assert ident["adapter"] == "trained" and len(ident["adapter_sha256"]) == 64
    assert ident["encoder_fingerprint"] and ident["llm_fingerprint"] and ident["n_utterances"] == 3
    assert ident["data"][0]["sha256"] == file_sha256(trained_dir["data"])
    assert "normaliser" in ident["normaliser"] and ident["date"]
    al = results["alignment"]
    assert set(al["loss"]) == {"instruction", "speech", "transcript"} and al["n_utterances"] == 3
    assert len(results["examples"]) == 2 and results["transcription"]["blsp"]["n"] == 3
    assert "cascade" not in results["transcription"]
    assert (out / "alignment.png").stat().st_size > 1000
    assert "gap closed by speech" in printed and "WER" in printed


def test_eval_untrained_baseline_with_the_cascade(trained_dir, tiny_dirs, tiny_whisper_dir, tmp_path, capsys):
    out = tmp_path / "untrained"
    code = main(["eval", "--untrained", "--encoder", tiny_whisper_dir, "--llm", tiny_dirs["llm"],
                 "--data", str(trained_dir["data"]), "--tasks", "cascade,alignment", "--limit", "2",
                 "--bootstrap", "10", "--no-feature-cache", "--output-dir", str(out)])
    capsys.readouterr()
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["identity"]["adapter"] == "untrained" and results["identity"]["adapter_sha256"] is None
    assert results["transcription"]["cascade"]["n"] == 2 and "blsp" not in results["transcription"]
    assert "cascade" in results["alignment"]["loss"]
    assert (out / "alignment.png").exists()


def test_eval_loop_guard_is_applied_and_recorded(trained_dir, tmp_path, capsys):
    """`--no-repeat-ngram-size 1` changes the tiny LLM's (looping) transcriptions, and the report
    says how it decoded (tests/test_inference.py checks the guard itself)."""
    def transcribe(out, *guard):
        code = main(["eval", "--model", str(trained_dir["model"]), "--data", str(trained_dir["data"]),
                     "--tasks", "transcribe", "--limit", "3", "--feature-cache", str(trained_dir["features"]),
                     "--output-dir", str(out), *guard])
        assert code == 0
        return json.loads((out / "results.json").read_text())

    greedy = transcribe(tmp_path / "greedy")
    guarded = transcribe(tmp_path / "guarded", "--no-repeat-ngram-size", "1")
    capsys.readouterr()
    assert greedy["identity"]["decoding"] == {"greedy": True}
    assert guarded["identity"]["decoding"] == {"greedy": True, "no_repeat_ngram_size": 1}
    assert guarded["transcription"]["decoding"]["no_repeat_ngram_size"] == 1
    answers = lambda r: [row["blsp"] for row in r["transcription"]["per_utterance"]]
    assert answers(guarded) != answers(greedy)  # the guard reached `generate`


@pytest.mark.parametrize("argv, words", [
    (["--tasks", "alignment,bleu"], "unknown task(s) bleu"),
    (["--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size must be"),
    (["--untrained"], "--untrained needs"),
    (["--model", "/nonexistent/adapter"], "no such directory"),
])
def test_eval_user_errors_are_one_line(argv, words, trained_dir, tmp_path, capsys):
    code = main(["eval", "--data", str(trained_dir["data"]), "--output-dir", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------
# A suite end to end
# ----------------------------------------------------------------------------------------------
SUITE = """\
name: tiny-suite
batch_size: 2
tasks:
  - type: transcription
    manifest: data/manifest.jsonl
    max_new_tokens: 4
  - type: translation
    manifest: data/manifest.jsonl
    language: German
    target_lang: de
    max_new_tokens: 4
  - type: classification
    manifest: data/manifest.jsonl
    label_field: sentiment
    labels: [positive, negative]
  - name: alignment
    type: continuation
    manifest: data/manifest.jsonl
    max_new_tokens: 4
    bootstrap: 10
    n_examples: 2
  - type: representation
    manifest: data/manifest.jsonl
    contrast_model: {contrast}
  - type: behaviour
    manifest: data/manifest.jsonl
    instructions: behaviour.yaml
    max_new_tokens: 4
    n_examples: 1
"""
BEHAVIOUR = """\
gist: Say what this is about.
mood:
  instruction: Happy or sad?
  labels: [happy, sad]
"""


def suite_data(root: Path) -> Path:
    """Behavior data with every field a task reads, and the cascade's transcripts given (`asr`)."""
    path = behavior_data(root / "data", n=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["translation"] = ["ein Satz", "noch ein Satz", "der dritte Satz", "zuletzt"][i]
        r["sentiment"] = ["positive", "negative"][i % 2]
        r["asr"] = r["text"].upper() if i else "something else entirely"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_suite_end_to_end_on_tiny_models(trained_dir, tmp_path, capsys):
    manifest = suite_data(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.format(contrast=trained_dir["model"]))
    (tmp_path / "behaviour.yaml").write_text(BEHAVIOUR)
    out = tmp_path / "report"
    code = main(["eval", "--model", str(trained_dir["model"]), "--suite", str(suite), "--limit", "3",
                 "--feature-cache", str(trained_dir["features"]), "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    ident = results["identity"]
    assert ident["suite"]["name"] == "tiny-suite" and ident["suite"]["sha256"] == file_sha256(suite)
    assert len(ident["adapter_sha256"]) == 64 and ident["llm_fingerprint"] and ident["encoder_fingerprint"]
    assert all(d["sha256"] == file_sha256(manifest) and d["n_evaluated"] == 3 for d in ident["data"])
    assert ident["asr"] == {name: {"source": "the manifest's `asr` field"}
                            for name in ("transcription", "translation", "classification", "alignment", "behaviour")}
    assert "whisper-english" in ident["normaliser"]
    assert ident["sacrebleu_signatures"]["translation"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert ident["contrast_model"]["adapter_sha256"] == ident["adapter_sha256"]
    tasks = results["tasks"]
    assert list(tasks) == ["transcription", "translation", "classification", "alignment", "representation",
                           "behaviour"]

    # every table: BLSP, cascade, text (transcription adds the ASR transcript itself)
    tr = tasks["transcription"]
    assert tr["rows"] == ["blsp", "cascade", "text", "asr"] and set(tr["table"]["blsp"]) == {"wer", "cer"}
    rows = tr["per_utterance"]
    assert [r["asr"] for r in rows[1:]] == [r["reference"].upper() for r in rows[1:]]
    assert tr["table"]["asr"]["wer"] == error_rates([r["reference"] for r in rows], [r["asr"] for r in rows])["wer"]
    assert tr["table"]["blsp"]["wer"] == error_rates([r["reference"] for r in rows], [r["blsp"] for r in rows])["wer"]
    mt = tasks["translation"]
    assert mt["rows"] == ["blsp", "cascade", "text"] and mt["instruction"].endswith("into German text.")
    assert all(0 <= mt["table"][r]["bleu"] <= 100 and 0 <= mt["table"][r]["chrf"] <= 100 for r in mt["rows"])

    cl = tasks["classification"]
    for row in cl["rows"]:
        d = cl["details"][row]
        mapped_right = sum(r[f"{row}_label"] == r["gold"] for r in cl["per_utterance"])
        assert cl["table"][row]["accuracy"] == mapped_right / 3
        assert len(d["unmapped_answers"]) == d["unmapped"] == cl["table"][row]["unmapped"]
        assert {a["id"] for a in d["unmapped_answers"]} == {
            r["id"] for r in cl["per_utterance"] if r[f"{row}_label"] is None}
    assert cl["instruction"] == "What is the sentiment of the speaker? Answer with one word: positive or negative."

    al = tasks["alignment"]
    assert al["rows"] == ["blsp", "cascade", "text", "floor"]
    assert al["table"]["text"]["gap_closed"] == 1.0 and al["table"]["text"]["agreement"] is None
    assert al["table"]["blsp"]["loss"] == al["alignment"]["loss"]["speech"]
    assert al["table"]["cascade"]["kl"] == al["alignment"]["kl_text_cascade"] > 0
    assert 0 <= al["table"]["blsp"]["agreement"] <= 100 and len(al["examples"]) == 2
    assert set(al["examples"][0]) >= {"text_continuation", "blsp_continuation", "cascade_continuation"}

    rep = tasks["representation"]
    n_layers = 2 + 1  # the tiny Llama's layers and its input
    blsp, contrast = rep["models"]["blsp"], rep["models"]["contrast"]
    assert rep["layers"] == list(range(n_layers)) and len(blsp["same_instruction"]) == n_layers
    assert blsp["same_instruction"] == pytest.approx(contrast["same_instruction"], abs=1e-5)  # the same adapter
    assert all(-1 <= c <= 1 for c in blsp["mismatched_utterance"])

    be = tasks["behaviour"]
    assert be["rows"] == ["blsp", "cascade"] and list(be["instructions"]) == ["gist", "mood"]
    assert be["instructions"]["mood"]["rows"]["blsp"]["measure"] == "same label (%)"
    for row in ("blsp", "cascade"):
        cells = be["table"][row]
        assert set(cells) == {"kl", "runaway", "agree:gist", "agree:mood"}
        assert cells["kl"] >= 0 and 0 <= cells["runaway"] <= 1 and 0 <= cells["agree:mood"] <= 100
        # the pooled KL is the token-weighted mean of the instructions' KLs
        assert all(r["rows"][row]["kl"] >= 0 for r in be["instructions"].values())
    assert set(be["instructions"]["gist"]["examples"][0]) == {"id", "transcript", "text", "blsp", "cascade"}
    # the headline: BLSP beside the cascade, the KL on continuations (the alignment task), the bars
    head = results["behaviour"][""]
    assert head["kl_measured_on"] == "kl" and head["rows"]["blsp"]["kl"] == al["table"]["blsp"]["kl"]
    assert head["rows"]["cascade"]["agreement"]["mood"] == be["table"]["cascade"]["agree:mood"]
    assert head["whisper_wer"] == tr["table"]["asr"]["wer"]
    assert set(head["bars"]) == {"kl", "wer", "runaway", "agreement:gist", "agreement:mood"}
    assert printed.index("behaviour (what the LLM writes") < printed.index("transcription [transcription]")
    for name in ("transcription", "translation", "classification", "alignment", "alignment_alignment",
                 "representation", "behaviour"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    for words in ("BLSP (speech)", "cascade (ASR->LLM)", "text (gold->LLM)", "WER", "BLEU", "macro-F1",
                  "gap closed", "agreement BLEU", "per layer", "centred", "sacrebleu: BLEU nrefs:1"):
        assert words in printed, words
    json.dumps(results, allow_nan=False)


def test_a_suite_cascade_transcribes_with_the_encoders_whisper(tiny_dirs, tiny_whisper_dir, tmp_path, capsys):
    manifest = write_corpus(tmp_path / "data", n=2)
    rows = [dict(json.loads(line), emotion=e) for line, e in zip(manifest.read_text().splitlines(), ["sad", "happy"])]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - type: transcription\n    manifest: data/manifest.jsonl\n    max_new_tokens: 3\n"
                     "  - type: classification\n    manifest: data/manifest.jsonl\n    label_field: emotion\n"
                     "    rows: [cascade]\n")
    out = tmp_path / "r"
    code = main(["eval", "--untrained", "--encoder", tiny_whisper_dir, "--llm", tiny_dirs["llm"], "--suite",
                 str(suite), "--no-feature-cache", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    asr = results["identity"]["asr"]["transcription"]
    assert results["identity"]["asr"]["classification"] == asr and asr["source"] == "whisper" and asr["name"] == tiny_whisper_dir and len(asr["fingerprint"]) == 16
    rows = results["tasks"]["transcription"]["per_utterance"]
    assert all(isinstance(r["asr"], str) for r in rows)
    assert results["tasks"]["classification"]["rows"] == ["cascade"]
    assert results["identity"]["adapter"] == "untrained"


# ----------------------------------------------------------------------------------------------
# Voice: the described row (the ceiling), accuracy's interval, voice_description
# ----------------------------------------------------------------------------------------------
VOICES = [dict(gender="female", rate="fast", pitch="high", whispered="no", noisy="yes", voice_seen=False),
          dict(gender="male", rate="slow", pitch="normal", voice_seen=False),
          dict(gender="male", voice_seen=True),
          dict(voice_seen=False)]  # a line stating no attribute: the described row reads the bare transcript
VOICE_SUITE = """\
tasks:
  - name: gender
    type: classification
    manifest: data/manifest.jsonl
    label_field: gender
    labels: [male, female]
    rows: [{rows}]
    where: {{voice_seen: false}}
  - name: description
    type: voice_description
    manifest: data/manifest.jsonl
    rows: [{rows}]
    n_examples: 2
"""


def voice_data(root: Path, gender_on_every_line: bool = True) -> Path:
    path = write_corpus(root / "data", n=len(VOICES))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r, v in zip(rows, VOICES):
        r.update(v, asr=r["text"].upper())  # the cascade's transcripts given: no Whisper needed
    if gender_on_every_line:
        rows[3]["gender"] = "female"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_described_row_reads_the_voice_then_the_words(tmp_path):
    from blsp.suites import load_suite, load_task_data
    from blsp.tasks import Runner, _as_written, _slot_texts

    voice_data(tmp_path, gender_on_every_line=False)
    (tmp_path / "suite.yaml").write_text(VOICE_SUITE.format(rows="cascade, text, described"))
    gender, description = load_suite(tmp_path / "suite.yaml").tasks
    texts = _slot_texts(description, load_task_data(description), Runner(None), _as_written)
    t0, t1 = texts["text"][:2]
    assert texts["described"][0] == ("The speaker is a woman, talking fast in a high-pitched voice over loud "
                                     f"background noise. They say: \"{t0}\"")
    assert texts["described"][1] == ("The speaker is a man, talking slowly in a voice of normal pitch. "
                                     f"They say: \"{t1}\"")
    assert texts["described"][3] == texts["text"][3]  # nothing stated: the bare transcript
    assert texts["cascade"][0] == t0.upper()
    # the filter applies before the slots are filled: u2 (a seen voice) is not read; u3 has no gold gender
    with pytest.raises(InputError, match="missing or empty `gender`"):
        load_task_data(gender)
    voice_data(tmp_path)
    texts = _slot_texts(gender, load_task_data(gender), Runner(None), _as_written)
    assert texts["described"][2] == f"The speaker is a woman. They say: \"{texts['text'][2]}\""


def test_voice_rows_scored_with_a_scripted_llm(tmp_path, monkeypatch):
    """The LLM replaced by a script that knows the voice only when it is described: the described
    row is right everywhere, the text row answers "male" (right on 1 of 3) and says nothing of the
    voice; the table carries accuracy's Wilson interval. A line stating no voice gets "I cannot tell"
    from either row."""
    import blsp.tasks
    from blsp.metrics import wilson_interval
    from blsp.report import format_task
    from blsp.suites import load_suite, load_task_data
    from blsp.tasks import Runner, run_tasks

    def scripted(model, utterances, texts, instruction, *args, **kwargs):
        if instruction.startswith("Describe"):
            return [t.split(" They say:")[0] if "They say:" in t else "I cannot tell." for t in texts]
        return ["female" if "a woman" in t else "male" for t in texts]

    monkeypatch.setattr(blsp.tasks, "text_generate", scripted)
    voice_data(tmp_path)
    (tmp_path / "suite.yaml").write_text(VOICE_SUITE.format(rows="text, described"))
    suite = load_suite(tmp_path / "suite.yaml")
    data = {t.name: load_task_data(t) for t in suite.tasks}
    results = run_tasks(Runner(None, progress=False), suite, data, "unused")

    gender = results["gender"]
    assert gender["manifest"]["where"] == {"voice_seen": False} and gender["manifest"]["n_selected"] == 3
    # gold (unseen voices): female, male, female
    assert gender["table"]["text"]["accuracy"] == 1 / 3 and gender["table"]["described"]["accuracy"] == 1.0
    assert gender["table"]["text"]["accuracy_ci"] == wilson_interval(1, 3) == gender["details"]["text"]["accuracy_ci95"]
    assert list(gender["table"]["text"]) == ["accuracy", "accuracy_ci", "macro_f1", "unmapped"]
    assert gender["per_utterance"][0]["described_input"].startswith("The speaker is a woman")

    desc = results["description"]
    described, text = desc["table"]["described"], desc["table"]["text"]
    # scored pairs: u0 gender, rate, pitch, noisy (whispered "no" has no keywords); u1 gender, rate; u2, u3 gender
    assert desc["details"]["described"]["scored"] == 8 and described["overall"] == 1.0
    assert described["gender"] == described["rate"] == described["pitch"] == described["noisy"] == 1.0
    assert described["whispered"] is None  # no clip stated a whisper with keywords
    assert text["overall"] == 0.0 and text["overall_ci"] == wilson_interval(0, 8)
    ex = desc["examples"]
    assert [e["id"] for e in ex] == ["u0", "u1"] and ex[1]["described"].startswith("The speaker is a man")
    assert ex[0]["described_named"] == {"gender": True, "rate": True, "pitch": True, "whispered": None, "noisy": True}
    assert ex[0]["attributes"]["noisy"] == "yes" and ex[0]["text"] == "I cannot tell."

    printed = "\n".join(format_task("gender", gender))
    assert "(where voice_seen=false: 3 line(s))" in printed and "accuracy          95% CI" in printed
    lo, hi = wilson_interval(1, 3)
    assert f"{100 * lo:.1f}%..{100 * hi:.1f}%" in printed and "described (gold+voice->LLM)" in printed
    json.dumps(results, allow_nan=False)


def test_voice_suite_on_tiny_models(tiny_dirs, tiny_whisper_dir, tmp_path, capsys):
    voice_data(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(VOICE_SUITE.format(rows="blsp, cascade, text, described"))
    out = tmp_path / "r"
    code = main(["eval", "--untrained", "--encoder", tiny_whisper_dir, "--llm", tiny_dirs["llm"], "--suite",
                 str(suite), "--max-new-tokens", "3", "--batch-size", "4", "--no-feature-cache",
                 "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    gender, desc = results["tasks"]["gender"], results["tasks"]["description"]
    assert gender["rows"] == desc["rows"] == ["blsp", "cascade", "text", "described"]
    for row, cells in gender["table"].items():
        lo, hi = cells["accuracy_ci"]
        assert lo <= cells["accuracy"] <= hi, row
    assert desc["manifest"]["n_evaluated"] == 4 and set(desc["table"]["blsp"]) == {
        "overall", "overall_ci", "gender", "rate", "pitch", "whispered", "noisy"}
    assert (out / "gender.png").stat().st_size > 1000 and (out / "description.png").stat().st_size > 1000
    assert "all attributes" in printed and "described (gold+voice->LLM)" in printed


def test_a_voice_task_shows_what_the_channels_classifier_heard(tiny_dirs, tiny_whisper_dir, tmp_path, capsys):
    """A model whose voice channel names gender: its classifier's own answers are a row (`heard`)
    beside the LLM's, and the demo's report line says them."""
    from blsp.modeling import BlspModel
    from blsp.scoring import SpeechFeatures
    from blsp.voice_channel import fit_voice_heads, voice_rows

    voice_data(tmp_path)
    utts = read_manifest(tmp_path / "data" / "manifest.jsonl").utterances
    model = BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                      speech_states="decoder", seed=0, voice_attributes=("gender",))
    n = voice_rows(model.config)
    rows = torch.stack([f[:n] for f in SpeechFeatures(model, utts)(utts)])
    fit_voice_heads(model.voice_channel, rows, {"gender": [u.extra.get("gender") for u in utts]})
    model.save_pretrained(tmp_path / "model")
    suite = tmp_path / "suite.yaml"
    suite.write_text(VOICE_SUITE.format(rows="text").replace("labels: [male, female]\n",
                                                               "labels: [male, female]\n    label_keywords: voice\n"))
    out = tmp_path / "r"
    assert main(["eval", "--model", str(tmp_path / "model"), "--suite", str(suite), "--max-new-tokens", "3",
                 "--no-feature-cache", "--output-dir", str(out)]) == 0
    gender = json.loads((out / "results.json").read_text())["tasks"]["gender"]
    # fitted on these very clips (every one separable): the classifier hears each clip's gender
    assert gender["table"]["heard"]["accuracy"] == 1.0
    assert [p["heard_label"] for p in gender["per_utterance"]] == [p["gold"] for p in gender["per_utterance"]]
    assert "heard (channel's classifier)" in capsys.readouterr().out
