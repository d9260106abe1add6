#!/usr/bin/env python
"""The BLSP demo: speech corpus -> step 1 -> step 2 -> evaluation on held-out speech.

    python recipes/demo.py                  # recipes/demo.yaml: Whisper's decoder states, ~20 minutes
    python recipes/demo.py --size full      # recipes/demo-full.yaml: the same, four times the data
    python recipes/demo.py --size encoder   # recipes/demo-encoder.yaml: the encoder's frames (the paper's)
    python recipes/demo.py --size medium    # recipes/demo-medium.yaml: that at twice the data, ~36 minutes
    python recipes/demo.py --size full-encoder  # recipes/demo-full-encoder.yaml: at four times, ~70 minutes
    python recipes/demo.py --size long      # recipes/demo-long.yaml: that, then 4 more rounds
    python recipes/demo.py --size voice     # recipes/demo-voice.yaml: a voice corpus and channel, the voice suite
    python recipes/demo.py --size multilingual  # recipes/demo-multilingual.yaml: Gemma 3 270M; German, Spanish, Italian never trained on
    python recipes/demo.py --recipe my.yaml
    python recipes/demo.py --llm gemma3-270m  # any recipe on another LLM (runs/<recipe>-gemma3-270m)

Each stage is a `blsp` command run in this process, and each resumes: re-run after a kill and
the demo picks up where it stopped. Writes OUT/report.json and OUT/report.png and prints them.
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import time
from pathlib import Path

import yaml

from blsp.cli import main as blsp
from blsp.evaluation import _pct
from blsp.io import atomic_write_json, atomic_write_text
from blsp.parity import format_parity
from blsp.options import DEFAULT_PRESET, TrainOptions, mix_shares, option_flags as flags
from blsp.trainer import draw_loss_curve, runs_warm_start


HERE = Path(__file__).parent
SIZES = {"default": HERE / "demo.yaml", "full": HERE / "demo-full.yaml", "encoder": HERE / "demo-encoder.yaml",
         "medium": HERE / "demo-medium.yaml", "full-encoder": HERE / "demo-full-encoder.yaml",
         "long": HERE / "demo-long.yaml", "voice": HERE / "demo-voice.yaml",
         "multilingual": HERE / "demo-multilingual.yaml"}


def load_recipe(path: Path) -> dict:
    """A demo recipe; `extends: OTHER.yaml` (beside it) takes OTHER's sections, its own over them."""
    recipe = yaml.safe_load(Path(path).read_text())
    base = recipe.pop("extends", None)
    return {**load_recipe(Path(path).parent / base), **recipe} if base else recipe


def run(stage: str, args: list[str], timings: dict) -> None:
    print(f"\n=== {stage}: blsp {' '.join(args)}", flush=True)
    start = time.perf_counter()
    status = blsp(args)
    timings[stage] = round(time.perf_counter() - start, 1)
    if status != 0:
        sys.exit(f"demo: stage '{stage}' failed (exit {status}); fix the cause and re-run to resume")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--recipe", default=None, help="a recipe file (overrides --size)")
    parser.add_argument("--llm", default=None,
                        help="the LLM, a packaged name (`blsp models`: gemma3-270m) or a Hugging Face directory "
                             "(default: the recipe's, smollm2-135m-instruct)")
    parser.add_argument("--output", default=None, help="default: runs/<recipe name>[-<llm>]")
    args = parser.parse_args()
    recipe = load_recipe(Path(args.recipe or SIZES[args.size]))
    if args.llm and args.llm != recipe["models"]["llm"]:
        recipe = {**recipe, "name": f"{recipe['name']}-{Path(args.llm).name}",
                  "models": {**recipe["models"], "llm": args.llm}}
    out = Path(args.output or f"runs/{recipe['name']}")
    data, behavior, adapter = out / "data", out / "behavior", out / "adapter"
    timings: dict[str, float] = {}

    synth_corpus("speech corpus", recipe, data, timings)
    # Step 1 continues the first `train_utterances` train clips (what step 2's steps can use); the
    # warm start, which needs transcripts only, hears every train clip (many more distinct words).
    # `train_max_new_tokens`: step 2 may learn from the continuations' first tokens only (cheaper
    # to write and to train on); the test split's stay whole, so the measure is the same.
    cont = dict(recipe["continue"])
    train_utterances = cont.pop("train_utterances", None)
    train_max = cont.pop("train_max_new_tokens", None)
    train_cont = {**cont, **({"max_new_tokens": train_max} if train_max else {})}
    for split, split_cont in (("train", train_cont), ("test", cont)):
        limit = ["--limit", str(train_utterances)] if split == "train" and train_utterances else []
        continue_clips(f"step 1 ({split})", recipe, data / f"{split}.jsonl", behavior / f"{split}.jsonl",
                       [*flags(split_cont), *limit], timings)
    train_flags = flags(recipe["train"])
    if train_utterances and warm_starts(recipe["train"]):
        train_flags += ["--warm-start-data", str(data / "train.jsonl")]
    train_model("step 2", recipe, behavior / "train.jsonl", adapter, train_flags, timings)
    more_rounds(out, recipe, train_cont, train_utterances, timings)
    adapter_dir = str(round_dirs(out, recipe)[-1])
    evaluate(out, adapter_dir, str(behavior / "test.jsonl"), recipe["eval"], timings)
    evaluate_behaviour(out, adapter_dir, behavior / "test.jsonl", recipe["eval"], timings)
    evaluate_voice(out, adapter_dir, data / "test.jsonl", recipe["eval"], timings)
    evaluate_crosslingual(out, adapter_dir, recipe["eval"], timings)
    report(out, recipe, timings)


def warm_starts(train: dict) -> bool:
    """Whether step 2 begins with a warm start (the recipe file's, else its `blsp train --preset`'s)."""
    return runs_warm_start(train_options(train))


def synth_corpus(stage: str, recipe: dict, data: Path, timings: dict, sentences: int | None = None) -> None:
    """`blsp data synth` with the recipe's data settings; `sentences` train sentences instead of
    the recipe's grows the corpus (its clips are reused, its test split stays as it is)."""
    settings = dict(recipe["data"])
    corpus_spec = HERE.parent / settings.pop("spec")  # paths are relative to the repository
    run(stage, ["data", "synth", "--spec", str(corpus_spec), "--output", str(data),
                *flags({**settings, **({"sentences": sentences} if sentences else {})})], timings)


def continue_clips(stage: str, recipe: dict, manifest: Path, output: Path, extra: list[str], timings: dict) -> None:
    """Step 1 (`blsp continue`) on `manifest`'s clips with the recipe's LLM."""
    run(stage, ["continue", "--manifest", str(manifest), "--llm", recipe["models"]["llm"], "--output", str(output),
                *extra], timings)


def train_model(stage: str, recipe: dict, behavior: Path, model_dir: Path, extra: list[str], timings: dict) -> None:
    """Step 2 (`blsp train`) into `model_dir`, resuming where a killed run left checkpoints."""
    resume = ["--resume"] if (model_dir / "checkpoints").exists() else []
    models = recipe["models"]
    run(stage, ["train", "--data", str(behavior), "--encoder", models["encoder"], "--llm", models["llm"],
                "--output-dir", str(model_dir), *extra, *resume], timings)


def round_dirs(out: Path, recipe: dict) -> list[Path]:
    """Where step 2 of each round saves its model: OUT/adapter, then OUT/adapter_round2, ..."""
    return [out / "adapter"] + [out / f"adapter_round{n}" for n in range(2, len(recipe.get("more_rounds") or []) + 2)]


def more_rounds(out: Path, recipe: dict, train_cont: dict, done: int | None, timings: dict) -> None:
    """`more_rounds`: each continues further train clips in step 1 and goes on training the round
    before's model on them (`blsp train --init-from`: no warm start, a fresh schedule), since step 2
    learns from distinct continuations (docs/warm_start_probe.md). A round may first grow the corpus
    (`sentences`; the test split stays as it is) and start at a given train clip (`from`; default:
    after the clips the rounds before used)."""
    data, behavior, dirs = out / "data", out / "behavior", round_dirs(out, recipe)
    start = done or 0
    for n, spec in enumerate(recipe.get("more_rounds") or [], start=2):
        if "sentences" in spec:
            synth_corpus(f"speech corpus (round {n})", recipe, data, timings, spec["sentences"])
        step1 = behavior / f"train_round{n}.jsonl"
        windows = round_windows(spec, start)
        for part, (first, count) in enumerate(windows, start=1):
            stage = f"step 1 (round {n})" + (f", part {part}" if len(windows) > 1 else "")
            continue_clips(stage, recipe, data / "train.jsonl", step1,
                           [*flags(train_cont), "--skip", str(first), "--limit", str(count)], timings)
        start = windows[-1][0] + windows[-1][1]
        train_model(f"step 2 (round {n})", recipe, step1, dirs[n - 1],
                    ["--init-from", str(dirs[n - 2]), *round_train_flags(recipe, spec)], timings)


ROUND_DATA_KEYS = ("sentences", "from", "train_utterances")  # a round's keys that are not step-2 flags


def round_windows(spec: dict, start: int) -> list[tuple[int, int]]:
    """A round's train clips as (first, count) windows of the manifest: `from` (default `start`,
    after the clips the rounds before used) and `train_utterances`, or lists of both, one window
    each (the clips several corpus sizes left unused, e.g. `from: [11200, 23200]`)."""
    firsts, counts = spec.get("from", start), spec["train_utterances"]
    if not isinstance(firsts, list) and not isinstance(counts, list):
        return [(int(firsts), int(counts))]
    if not (isinstance(firsts, list) and isinstance(counts, list) and len(firsts) == len(counts) and firsts):
        sys.exit(f"demo: a round's `from` and `train_utterances` must both be numbers or both lists of one "
                 f"length, not {firsts!r} and {counts!r}")
    return [(int(f), int(c)) for f, c in zip(firsts, counts)]


def round_train_flags(recipe: dict, spec: dict) -> list[str]:
    """A further round's step-2 flags: the first round's, less the warm start (--init-from has
    none), with the round's own settings over them."""
    base = {k: v for k, v in recipe["train"].items() if not k.startswith("warm_start")}
    return flags({**base, **{k: v for k, v in spec.items() if k not in ROUND_DATA_KEYS}})


GUARD_KEYS = ("no_repeat_ngram_size", "repetition_penalty")  # `blsp eval`'s loop guards, in a recipe's eval


def guard_flags(ev: dict) -> list[str]:
    """The LLM's answers over speech (examples, transcription) decode with the recipe's loop guard."""
    return flags({k: ev[k] for k in GUARD_KEYS if k in ev})


def evaluate(out: Path, adapter: str, test: str, ev: dict, timings: dict) -> None:
    """The three evaluations the report reads, each a `blsp eval` into its own directory."""
    def limit(key: str) -> list[str]:
        return ["--limit", str(ev[key])] if ev.get(key) else []

    guard = guard_flags(ev)
    run("evaluation (trained)", ["eval", "--model", adapter, "--data", test, "--tasks", ev["tasks"], *guard,
                                 "--output-dir", str(out / EVALS["trained"])], timings)
    # Whisper decodes a padded 30 s window per clip (~1.8 s on 2 cores), so the cascade, and the
    # zero-shot transcription it is compared with, run on the first clips only (both voices).
    run("evaluation (transcription, cascade)", ["eval", "--model", adapter, "--data", test, "--tasks",
                                                "transcribe,cascade,alignment", *limit("cascade_limit"), *guard,
                                                "--output-dir", str(out / EVALS["cascade"])], timings)
    # The untrained adapter closes about none of the gap; a share of the clips shows that for less time.
    run("evaluation (untrained adapter)", ["eval", "--model", adapter, "--untrained", "--data", test, "--tasks",
                                           "alignment", *limit("untrained_limit"),
                                           "--output-dir", str(out / EVALS["untrained"])], timings)


EVALS = {"trained": "eval", "cascade": "eval_cascade", "untrained": "eval_untrained",
         "behaviour": "eval_behaviour", "voice": "eval_voice", "crosslingual": "eval_crosslingual"}  # -> output dirs
UNSEEN_SET, REAL_SET = "TTS, unseen voice", "real speech"
# A recipe's eval keys for the behaviour sets, where it gives none (recipes/demo.yaml says why).
BEHAVIOUR_DEFAULTS = {"behaviour_limit": 16, "degraded": ["telephone"], "real_sources": "small", "real_limit": 24,
                      "behaviour_batch_size": 24}


def evaluate_behaviour(out: Path, adapter: str, test: Path, ev: dict, timings: dict) -> None:
    """What the LLM writes with the speech beside what it writes with the transcript, and the
    cascade's, on held-out speech: the unseen voice's clips, the same clips degraded, real speech
    (`blsp data real`). One suite (OUT/sets/suite.yaml) with a headline table per set."""
    sets = out / "sets"
    sets.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(line) for line in test.read_text().splitlines() if line.strip()]
    unseen = [line for line in lines if line.get("voice_seen") is False][: ev.get("behaviour_limit", BEHAVIOUR_DEFAULTS["behaviour_limit"])]
    for line in unseen:  # paths relative to the new manifest's directory
        line["audio"] = os.path.normpath(os.path.join("..", test.parent.name, line["audio"]))
    atomic_write_text(sets / "unseen.jsonl", "".join(json.dumps(line) + "\n" for line in unseen))
    ev = {**BEHAVIOUR_DEFAULTS, **ev}
    conditions = ev["degraded"] or []
    if conditions:
        run("degraded speech", ["data", "degrade", "--manifest", str(sets / "unseen.jsonl"), "--output",
                                str(sets / "degraded"), "--conditions", ",".join(conditions)], timings)
    if ev.get("real_sources"):
        run("real speech", ["data", "real", "--output", str(out / "real"), "--sources", ev["real_sources"]], timings)
    suite = {"name": "demo-behaviour", "batch_size": ev.get("behaviour_batch_size", 16), "tasks": []}

    def tasks(set_name: str, manifest: str, behaviour_data: bool, limit: int | None = None) -> None:
        common = {"set": set_name, "manifest": manifest, **({"limit": limit} if limit else {})}
        suite["tasks"].append({"name": f"{set_name}: behaviour", "type": "behaviour", **common})
        if behaviour_data:  # the training behaviour's loss gap and KL (secondary)
            suite["tasks"].append({"name": f"{set_name}: continuation", "type": "continuation", **common,
                                   "metrics": ["loss", "gap_closed", "kl"], "group_by": [], "bootstrap": 200})
        suite["tasks"].append({"name": f"{set_name}: transcription", "type": "transcription", **common})

    tasks(UNSEEN_SET, "unseen.jsonl", True)
    for condition in conditions:
        tasks(f"{UNSEEN_SET}, {condition}", f"degraded/{condition}.jsonl", True)
    if ev.get("real_sources"):
        tasks(REAL_SET, "../real/real.jsonl", False, ev.get("real_limit"))
    run_suite("behaviour", suite, sets / "suite.yaml", adapter, out, timings)


def run_suite(key: str, suite: dict, path: Path, adapter: str, out: Path, timings: dict) -> None:
    """Write `suite` to `path` and evaluate the adapter on it into OUT/EVALS[key]."""
    atomic_write_text(path, yaml.safe_dump(suite, sort_keys=False))
    run(f"evaluation ({key})", ["eval", "--model", adapter, "--suite", str(path),
                                "--output-dir", str(out / EVALS[key])], timings)


VOICE_KEYS = ("voice_suite", "voice_limit")  # a recipe's eval keys for the voice suite
CROSSLINGUAL_KEYS = ("crosslingual", "crosslingual_limit")  # and for the cross-lingual sets
CROSSLINGUAL_INSTRUCTIONS = HERE / "behaviour-crosslingual.yaml"


def language_name(code: str) -> str:
    """"German" for de: Whisper's own table of the languages it knows."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code).title()


def evaluate_crosslingual(out: Path, adapter: str, ev: dict, timings: dict) -> None:
    """Zero-shot cross-lingual: speech in languages no step trained on (`crosslingual`: corpus
    specs, recipes/data/crosslingual/*.yaml, made here, test split only), the behaviour measures
    (recipes/behaviour-crosslingual.yaml: continue ... translate into English) and in-language
    transcription, beside the cascade, whose Whisper detects the language (`asr_language: auto`)."""
    if not ev.get("crosslingual"):
        return
    sets = out / "sets"
    sets.mkdir(parents=True, exist_ok=True)
    limit = ev.get("crosslingual_limit", 16)
    suite = {"name": "crosslingual", "asr_language": "auto", "batch_size": ev.get("behaviour_batch_size", 16),
             "tasks": []}
    for spec in ev["crosslingual"]:
        spec_path = HERE.parent / spec
        language = yaml.safe_load(spec_path.read_text())["language"]
        data = out / "crosslingual" / language
        run(f"speech in {language}", ["data", "synth", "--spec", str(spec_path), "--output", str(data),
                                      "--test-sentences", str(limit), "--workers", "1"], timings)
        name = language_name(language)
        common = {"set": name, "manifest": os.path.relpath(data / "test.jsonl", sets), "limit": 2 * limit}
        suite["tasks"] += [
            {"name": f"{name}: behaviour", "type": "behaviour",
             "instructions": os.path.relpath(CROSSLINGUAL_INSTRUCTIONS, sets), **common},
            {"name": f"{name}: transcription", "type": "transcription", "language": name, **common}]
    run_suite("crosslingual", suite, sets / "crosslingual.yaml", adapter, out, timings)


def evaluate_voice(out: Path, adapter: str, test: Path, ev: dict, timings: dict) -> None:
    """The voice suite (`voice_suite`, e.g. recipes/eval/voice.yaml) on this run's test split: what
    the LLM says of the voice never heard in training, beside the cascade and the described ceiling."""
    if not ev.get("voice_suite"):
        return
    suite = yaml.safe_load((HERE.parent / ev["voice_suite"]).read_text())
    sets = out / "sets"
    sets.mkdir(parents=True, exist_ok=True)
    for task in suite["tasks"]:  # the run's own test split, relative to the written suite
        task["manifest"] = os.path.relpath(test, sets)
        if ev.get("voice_limit"):
            task["limit"] = ev["voice_limit"]
    run_suite("voice", suite, sets / "voice.yaml", adapter, out, timings)


def format_voice(voice: dict) -> list[str]:
    """The voice suite's tables: accuracy per attribute by row, the descriptions' keyword score."""
    tasks = voice.get("tasks", {})
    classified = {name: t for name, t in tasks.items() if t.get("type") == "classification"}
    if not classified:
        return []
    rows = list(next(iter(classified.values()))["rows"])
    n = next(iter(classified.values()))["manifest"]["n_evaluated"]
    lines = [f"the voice, on voices never heard in training (first {n} clips a question; accuracy, 95% CI)",
             f"  {'':<12}" + "".join(f"{row:>22}" for row in rows)]
    for name, t in classified.items():
        cells = []
        for row in rows:
            cell = t["table"][row]
            lo, hi = cell.get("accuracy_ci") or (None, None)
            cells.append(f"{_pct(cell['accuracy'])} ({_pct(lo)}..{_pct(hi)})" if lo is not None
                         else _pct(cell["accuracy"]))
        lines.append(f"  {name:<12}" + "".join(f"{c:>22}" for c in cells))
    heard = {name: t["table"]["heard"]["accuracy"] for name, t in classified.items() if "heard" in t["table"]}
    if heard:
        lines.append("  what the voice channel's classifiers heard, before the LLM says it: "
                     + ", ".join(f"{name} {_pct(acc)}" for name, acc in heard.items()))
    for name, t in tasks.items():
        if t.get("type") != "voice_description":
            continue
        shares = "  ".join(f"{row} {_pct(t['table'][row].get('overall'))}" for row in t["rows"])
        lines.append(f"  descriptions naming each stated attribute right: {shares}")
        for ex in t.get("examples", [])[:3]:
            lines += [f"  {ex['id']}: {ex['description']}", f"    blsp says: {ex.get('blsp')}"]
    return lines


def report(out: Path, recipe: dict, timings: dict) -> None:
    """Gather the evaluations into OUT/report.json, print the short report, plot OUT/report.png."""
    results = {name: json.loads((out / d / "results.json").read_text()) for name, d in EVALS.items()
               if (out / d / "results.json").exists()}
    summary = {"recipe": recipe, "timings_s": timings, **results}
    atomic_write_json(out / "report.json", summary)
    plot_report(summary, [d / "train_log.jsonl" for d in round_dirs(out, recipe)], out / "report.png")
    print(f"\n=== report ({out / 'report.json'}, {out / 'report.png'}; per-evaluation plots in "
          f"{', '.join(str(out / d) for d in EVALS.values())})")
    print(format_report(summary))


def _alignment_row(label: str, al: dict) -> str:
    lo, hi = al["gap_closed_ci95"]
    loss = al["loss"]
    return (f"  {label:<34} {al['n_utterances']:>5} {loss['instruction']:>8.3f} {loss['speech']:>8.3f} "
            f"{loss['transcript']:>10.3f}   {_pct(al['gap_closed']):>6} ({_pct(lo)}..{_pct(hi)})"
            f"   {al['kl_text_speech']:.3f}")


def decoding_words(decoding: dict) -> str:
    """How the LLM decoded, for the report: "greedy", "greedy, no 3-gram twice"."""
    words = ["greedy"]
    if decoding.get("no_repeat_ngram_size"):
        words.append(f"no {decoding['no_repeat_ngram_size']}-gram twice")
    if decoding.get("repetition_penalty"):
        words.append(f"repetition penalty {decoding['repetition_penalty']}")
    return ", ".join(words)


def untrained_label(recipe: dict) -> str:
    """With the token bridge the untrained model already reads Whisper's tokens: say so."""
    train = train_options(recipe["train"])
    bridge = train.model.speech_states == "decoder" and train.model.speech_vectors == "tokens"
    return "untrained (the token bridge alone)" if bridge else "untrained adapter"


def train_options(train: dict) -> TrainOptions:
    """A demo recipe's `train:` as `blsp train` reads it: its options over those of the `--preset` it names."""
    return TrainOptions.from_preset(train.get("preset", DEFAULT_PRESET),
                                    **{k: v for k, v in train.items() if k != "preset"})


def transcription_label(recipe: dict) -> str:
    """"zero-shot transcription", or, where step 2 also trained on transcripts, how much of it did."""
    share = mix_shares(train_options(recipe["train"])).get("transcribe", 0)
    if not share:
        return "zero-shot transcription"
    return f"transcription ({share:.0%} of step 2's clips trained on their transcript)"


def format_gate(summary: dict) -> list[str]:
    """Which way a gated voice model's gate went (blsp/voice_gate.py: `"voice_gate"` in each result)
    under the voice suite's questions and the behaviour suite's instructions; none without a gate."""
    decisions: dict[str, dict[str, str]] = {"voice questions": {}, "behaviour instructions": {}}
    for name, t in ((summary.get("voice") or {}).get("tasks") or {}).items():
        if "voice_gate" in t:
            decisions["voice questions"][name] = t["voice_gate"]
    for t in ((summary.get("behaviour") or {}).get("tasks") or {}).values():
        for name, item in (t.get("instructions") or {}).items():
            if "voice_gate" in item:
                decisions["behaviour instructions"].setdefault(name, item["voice_gate"])
    if not any(decisions.values()):
        return []
    return ["the voice gate (the voice vectors read only under a question about the voice):"] + [
        f"  {kind}: " + ", ".join(f"{name} {state}" for name, state in found.items())
        for kind, found in decisions.items() if found]


def format_report(summary: dict) -> str:
    trained, cascade, untrained = (summary[k] for k in ("trained", "cascade", "untrained"))
    al, al_c = trained["alignment"], cascade["alignment"]
    lines = []
    for key in ("behaviour", "crosslingual"):
        for set_name, parity in (summary.get(key) or {}).get("behaviour", {}).items():
            lines += [f"[{set_name}]" + (" (never trained on: zero-shot cross-lingual)" if key == "crosslingual" else ""),
                      *format_parity(parity)]
    lines += ["behaviour alignment on held-out sentences: loss of the transcript's continuation (nats/token)",
             f"  {'':<34} {'clips':>5} {'instr.':>8} {'speech':>8} {'transcript':>10}   gap closed (95% CI)   KL(text||speech)",
             _alignment_row(untrained_label(summary["recipe"]), untrained["alignment"]),
             _alignment_row("trained adapter", al)]
    for value, g in al.get("groups", {}).get("voice_seen", {}).items():
        which = "a voice heard in training" if value == "true" else "a voice never heard in training"
        lines.append(f"    {which:<32} {g['n_utterances']:>5}   gap closed {_pct(g['gap_closed'])}")
    lines += [f"  on the first {al_c['n_utterances']} clips: speech closes {_pct(al_c['gap_closed'])}, "
              f"the cascade (Whisper's transcript -> the same LLM) {_pct(al_c.get('gap_closed_cascade'))}"]
    tr = cascade["transcription"]
    blsp_row = f"BLSP ('transcribe' over speech; {decoding_words(tr.get('decoding', {}))})"
    lines += [f"{transcription_label(summary['recipe'])} on the same {tr['n_utterances']} clips "
              "(jiwer; Whisper's English normaliser)",
              f"  {blsp_row:<47} WER {_pct(tr['blsp']['wer'])}  CER {_pct(tr['blsp']['cer'])}",
              f"  {tr['cascade']['asr'] + ' (the cascade ASR)':<47} WER {_pct(tr['cascade']['wer'])}  CER {_pct(tr['cascade']['cer'])}"]
    lines += format_voice(summary.get("voice") or {})
    lines += format_gate(summary)
    for ex in trained.get("examples", [])[:3]:
        lines += [f"example {ex['id']}", f"  transcript:               {ex['transcript']}",
                  f"  LLM continues the text:   {ex['text_continuation']}",
                  f"  LLM continues the speech: {ex['speech_continuation']}"]
    total = sum(summary["timings_s"].values())
    lines.append("minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in summary["timings_s"].items())
                 + f"; all stages {total / 60:.1f}")
    return "\n".join(lines)


def plot_report(summary: dict, train_logs: list[Path], png: Path) -> None:
    """Gap closed (untrained, trained by voice, cascade), the step-2 loss curve, WER: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    al, al_c = summary["trained"]["alignment"], summary["cascade"]["alignment"]
    bars = [("untrained", summary["untrained"]["alignment"]["gap_closed"], "#999999"),
            ("trained", al["gap_closed"], "#d9534f")]
    for value, g in sorted(al.get("groups", {}).get("voice_seen", {}).items()):
        bars.append(("trained,\nseen voice" if value == "true" else "trained,\nunseen voice", g["gap_closed"], "#e8a09e"))
    n = al_c["n_utterances"]  # the cascade beside the speech on the same first clips
    bars += [(f"trained,\nfirst {n}", al_c["gap_closed"], "#d9534f"),
             (f"cascade,\nfirst {n}", al_c.get("gap_closed_cascade"), "#f0ad4e")]
    bars = [b for b in bars if b[1] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    drawn = ax.bar([b[0] for b in bars], [100 * b[1] for b in bars], color=[b[2] for b in bars])
    for bar, (_, v, _) in zip(drawn, bars):
        ax.text(bar.get_x() + bar.get_width() / 2, 100 * v, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=9)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("gap closed (%)")
    ax.set_title("the speech's share of the gap, instruction only -> transcript", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[1]
    draw_loss_curve(ax, train_logs)
    ax.set_xlabel("step-2 step" + (f" ({len(train_logs)} rounds)" if len(train_logs) > 1 else ""))
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("step 2 training loss", fontsize=10)
    ax.grid(alpha=0.3)

    ax = axes[2]
    tr = summary["cascade"]["transcription"]
    asr = Path(tr["cascade"]["asr"]).name  # a packaged name, or the directory's
    wers = [("BLSP\n(speech -> LLM)", tr["blsp"]["wer"], "#d9534f"), (f"{asr}\n(cascade ASR)", tr["cascade"]["wer"], "#f0ad4e")]
    drawn = ax.bar([w[0] for w in wers], [100 * w[1] for w in wers], color=[w[2] for w in wers])
    for bar, (_, v, _) in zip(drawn, wers):
        ax.text(bar.get_x() + bar.get_width() / 2, 100 * v, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("WER (%)")
    ax.set_title(f"{transcription_label(summary['recipe']).split(' (')[0]}, {tr['n_utterances']} held-out clips",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
