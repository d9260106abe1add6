"""`blsp eval`: the command in both its forms: `--suite SUITE.yaml` (suites.py checks it, tasks.py
runs its tasks, representation.py the hidden-state analysis, report.py prints and plots) and the
quick `--data FILE --tasks ...` over one file (behavior alignment, side-by-side continuations,
zero-shot transcription and the cascade), implemented here over the measurements of scoring.py.

Every result is a plain dict (JSON-ready, no NaN: an undefined number is None); the metric
formulas live in metrics.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import Utterance, read_manifest
from .errors import BlspError
from .inference import decoding_record
from .io import file_sha256
from .metrics import LABEL_RULE, NORMALISER
from .modeling import BlspModel
from .prompts import CONTINUATION_INSTRUCTION
from .report import behaviour_headline, format_suite, write_plots
from .scoring import (SpeechFeatures, _num, _pct, alignment_report, continuation_examples, plot_alignment,
                      transcription_report)
from .suites import load_suite, load_task_data
from .tasks import Runner, run_tasks

TASKS = ("alignment", "examples", "transcribe", "cascade")


# ----------------------------------------------------------------------------------------------
# Output: identity, table
# ----------------------------------------------------------------------------------------------
def model_identity(model: BlspModel, model_dir: str | Path | None, untrained_seed: int | None = None) -> dict:
    cfg = model.config
    adapter_file = Path(model_dir) / "adapter.safetensors" if model_dir and untrained_seed is None else None
    return {
        "model_dir": str(model_dir) if model_dir else None,
        "adapter": "untrained" if untrained_seed is not None else "trained",
        "adapter_seed": untrained_seed,
        "adapter_sha256": file_sha256(adapter_file) if adapter_file else None,
        "adapter_type": cfg.adapter_type,
        "speech_states": cfg.speech_states,  # encoder frames, or Whisper's decoder states
        "speech_vectors": cfg.speech_vectors,
        "bridge_confidence": getattr(cfg, "bridge_confidence", None),  # sure tokens read as themselves
        "bridge_transcript": getattr(cfg, "bridge_transcript", False),  # Whisper's transcript as the LLM's tokens
        "speech_language": cfg.speech_language,
        "decoder_fingerprint": cfg.decoder_fingerprint,
        "encoder_name": cfg.encoder_name,
        "encoder_fingerprint": cfg.encoder_fingerprint,
        "llm_name": cfg.llm_name,
        "llm_fingerprint": cfg.llm_fingerprint,
        "system_prompt": cfg.system_prompt,
    }


def format_table(results: dict) -> str:
    lines = []
    al = results.get("alignment")
    if al:
        lines.append(f"behavior alignment ({al['n_utterances']} utterances, {al['n_tokens']} target tokens; nats/token)")
        for c, label in (("instruction", "instruction only (floor)"), ("speech", "speech"),
                         ("cascade", "ASR transcript (cascade)"), ("transcript", "transcript (ceiling)")):
            if c in al["loss"]:
                lines.append(f"  {label:28} {_num(al['loss'][c])}")
        ci = al.get("gap_closed_ci95")
        lines.append(f"  {'gap closed by speech':28} {_pct(al['gap_closed'])}"
                     + (f"  (95% CI {_pct(ci[0])} .. {_pct(ci[1])})" if ci else ""))
        if "gap_closed_cascade" in al:
            lines.append(f"  {'gap closed by cascade':28} {_pct(al['gap_closed_cascade'])}")
        lines.append(f"  {'KL(text || speech)':28} {_num(al['kl_text_speech'])}")
        for field, groups in al.get("groups", {}).items():
            for value, g in groups.items():
                lines.append(f"    {field}={value:<18} n={g['n_utterances']:<5} gap closed {_pct(g['gap_closed'])}")
    tr = results.get("transcription")
    if tr:
        lines.append(f"transcription ({tr['n_utterances']} utterances; {tr['normaliser'].split(':')[0]} normaliser)")
        for key, label in (("blsp", "BLSP (speech -> LLM)"), ("cascade", "cascade (Whisper)")):
            if key in tr:
                lines.append(f"  {label:28} WER {_pct(tr[key]['wer'])}  CER {_pct(tr[key]['cer'])}")
    for ex in results.get("examples", []):
        lines.append(f"[{ex['id']}] transcript:        {ex['transcript']}")
        lines.append(f"  continuation of text:   {ex['text_continuation']}")
        lines.append(f"  continuation of speech: {ex['speech_continuation']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise BlspError(f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(TASKS)}")
    return tasks


def read_eval_data(paths: Sequence[str | Path], needs_behavior: bool, limit: int | None) -> list[Utterance]:
    from .behavior import read_behavior_data

    for p in paths:
        if not Path(p).is_file():
            raise BlspError(f"--data: no such file: {p}")
    if needs_behavior:
        utterances, _ = read_behavior_data(paths)
    else:
        utterances = [u for p in paths for u in read_manifest(p).utterances]
    if not utterances:
        raise BlspError(f"no utterances in {', '.join(map(str, paths))}")
    return utterances[:limit] if limit else utterances


def load_model_for_eval(args: argparse.Namespace) -> BlspModel:
    from .distributed import DistInfo, default_device
    from .config import BlspConfig, initial_speech_vectors

    if args.untrained:
        cfg = BlspConfig.from_pretrained(args.model) if args.model else None
        encoder = args.encoder or (cfg.encoder_name if cfg else None)
        llm = args.llm or (cfg.llm_name if cfg else None)
        if not encoder or not llm:
            raise BlspError("--untrained needs --model (whose config names the encoder and LLM) or --encoder and --llm")
        kwargs = {"adapter_type": cfg.adapter_type, "adapter_bottleneck": cfg.adapter_bottleneck,
                  "adapter_downsample": cfg.adapter_downsample, "system_prompt": cfg.system_prompt,
                  "speech_states": cfg.speech_states,
                  "speech_vectors": initial_speech_vectors(cfg.speech_states, cfg.speech_vectors),
                  "speech_language": cfg.speech_language or "en",
                  "bridge_confidence": getattr(cfg, "bridge_confidence", None),
                  "bridge_transcript": getattr(cfg, "bridge_transcript", False)} if cfg else {}
        model = BlspModel.from_components(encoder, llm, seed=args.seed, **kwargs)
    else:
        if not args.model:
            raise BlspError("give --model DIR (a trained adapter), or --untrained with --encoder and --llm")
        model = BlspModel.from_pretrained(args.model, strict=not args.no_strict)
    if getattr(args, "bridge_confidence", None) is not None:
        set_bridge_confidence(model, args.bridge_confidence)
    if getattr(args, "bridge_transcript", None) is not None:
        set_bridge_transcript(model, args.bridge_transcript)
    return model.to(default_device(DistInfo())).eval()


def set_bridge_transcript(model: BlspModel, on: bool = True) -> None:
    """Read Whisper's transcript as the LLM's tokens (blsp.readers.bridge.TranscriptTokens), or (not
    `on`) one vector per Whisper token, whatever the model was trained with: the bridge is rebuilt so."""
    from .speech_sources import decoder_tokenizer

    if not model.reads_token_bridge:
        if not on:
            return  # nothing to turn off
        raise BlspError("--bridge-transcript: this model does not read Whisper's decoder through the token bridge "
                        "(trained with --preset decoder, it would)")
    model.config.bridge_transcript = on
    model.build_token_bridge(decoder_tokenizer(model.config.encoder_name), strict=False)


def set_bridge_confidence(model: BlspModel, confidence: float) -> None:
    """Read the tokens Whisper is at least `confidence` sure of as themselves (blsp.readers.bridge),
    whatever the model was trained with."""
    from .config import check_bridge_confidence

    if not model.reads_token_bridge:
        raise BlspError(f"--bridge-confidence {confidence}: this model does not read Whisper's decoder through the "
                        "token bridge (trained with --preset decoder, it would)")
    check_bridge_confidence(confidence)
    model.config.bridge_confidence = confidence


def default_instruction(model_dir: str | None) -> str:
    """The instruction the adapter was trained with (train_summary.json), else the paper's."""
    summary = Path(model_dir) / "train_summary.json" if model_dir else None
    if summary and summary.is_file():
        try:
            return json.loads(summary.read_text())["options"]["instruction"]
        except (ValueError, KeyError, TypeError):
            pass
    return CONTINUATION_INSTRUCTION


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--n-examples", args.n_examples),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise BlspError(f"{flag} must be at least 1, not {value}")
    if args.model and not args.untrained and not Path(args.model).is_dir():
        raise BlspError(f"--model: no such directory: {args.model}")
    if args.contrast_model and not (Path(args.contrast_model) / "config.json").is_file():
        raise BlspError(f"--contrast-model: no adapter checkpoint at {args.contrast_model}")
    if bool(args.suite) == bool(args.data):
        raise BlspError("give either --suite SUITE.yaml or --data FILE (with --tasks), not both or neither")


def run_eval(args: argparse.Namespace) -> dict:
    from . import __version__, packaged
    from .flags import repetition_kwargs

    _check_flags(args)
    args.generate_kwargs = repetition_kwargs(args)
    if args.suite:
        return run_suite(args)
    tasks = parse_tasks(args.tasks)
    args.batch_size = args.batch_size or 8
    utterances = read_eval_data(args.data, needs_behavior=bool({"alignment", "examples"} & set(tasks)),
                                limit=args.limit)
    out_dir = Path(args.output_dir)
    model = load_model_for_eval(args)
    instruction = args.instruction or default_instruction(args.model)
    cache_root = Path(args.feature_cache) if args.feature_cache else packaged.CACHE_DIR / "features"
    feats = SpeechFeatures(model, utterances, None if args.no_feature_cache else cache_root)

    results: dict[str, Any] = {
        "identity": {
            **model_identity(model, args.model, args.seed if args.untrained else None),
            "data": [{"path": str(p), "sha256": file_sha256(p)} for p in args.data],
            "n_utterances": len(utterances),
            "limit": args.limit,
            "normaliser": NORMALISER,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "blsp_version": __version__,
            "torch_version": torch.__version__,
            "device": str(model.language_model.device),
            "tasks": tasks,
            "decoding": decoding_record(args.generate_kwargs),
        }
    }
    asr = None
    if "transcribe" in tasks or "cascade" in tasks:
        results["transcription"] = transcription_report(
            model, utterances, whisper=args.asr_model, cascade="cascade" in tasks, blsp="transcribe" in tasks,
            batch_size=args.batch_size, feature_cache=feats, generate_kwargs=args.generate_kwargs)
        if "cascade" in tasks:
            asr = {r["id"]: r["cascade"] for r in results["transcription"]["per_utterance"]}
    if "alignment" in tasks:
        results["alignment"] = alignment_report(
            model, utterances, batch_size=args.batch_size, feature_cache=feats, instruction=instruction,
            asr_transcripts=asr, group_by=[g for g in args.group_by.split(",") if g],
            bootstrap_samples=args.bootstrap, seed=args.seed)
    if "examples" in tasks:
        results["examples"] = continuation_examples(model, utterances, n=args.n_examples, instruction=instruction,
                                                    max_new_tokens=args.max_new_tokens or 64, feature_cache=feats,
                                                    generate_kwargs=args.generate_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .io import atomic_write_json

    atomic_write_json(out_dir / "results.json", results)
    if "alignment" in results:
        which = "untrained adapter" if args.untrained else (Path(args.model).name if args.model else "")
        plot_alignment(results["alignment"], out_dir / "alignment.png", title=which)
    return results


def run_suite(args: argparse.Namespace) -> dict:
    """`blsp eval --suite`: check the suite and every manifest, then load the model and run."""
    import sacrebleu
    import transformers

    from . import __version__, packaged
    from .io import atomic_write_json

    suite = load_suite(args.suite)
    limit = args.limit or suite.limit
    data = {spec.name: load_task_data(spec, limit) for spec in suite.tasks}  # all checked before the model loads
    model = load_model_for_eval(args)
    cache_root = None if args.no_feature_cache else (
        Path(args.feature_cache) if args.feature_cache else packaged.CACHE_DIR / "features")
    runner = Runner(model, batch_size=args.batch_size or suite.batch_size or 8, feature_cache=cache_root,
                    asr_model=args.asr_model or suite.asr_model, asr_language=suite.asr_language,
                    max_new_tokens=args.max_new_tokens,
                    generate_kwargs=args.generate_kwargs,
                    answer_cache=None if args.no_answer_cache else (
                        Path(args.answer_cache) if args.answer_cache else packaged.CACHE_DIR / "answers"))
    tasks = run_tasks(runner, suite, data, continuation_instruction=args.instruction or default_instruction(args.model),
                      contrast_model=args.contrast_model)
    import jiwer

    identity = {
        **model_identity(model, args.model, args.seed if args.untrained else None),
        "suite": {"path": str(suite.path), "sha256": suite.sha256, "name": suite.name,
                  "description": suite.description},
        "data": [{"task": name, "path": r["manifest"]["path"], "sha256": r["manifest"]["sha256"],
                  "n_evaluated": r["manifest"]["n_evaluated"]} for name, r in tasks.items()],
        "asr": {name: r["cascade_asr"] for name, r in tasks.items() if r.get("cascade_asr")},
        "contrast_model": next((r["contrast_model"] for r in tasks.values() if r.get("contrast_model")), None),
        "normaliser": NORMALISER,
        "label_rule": LABEL_RULE,
        "sacrebleu_signatures": {name: r["signatures"] for name, r in tasks.items() if r.get("signatures")},
        "metric_packages": {"sacrebleu": sacrebleu.__version__, "jiwer": _version("jiwer", jiwer)},
        "limit": limit,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "blsp_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "device": str(model.language_model.device),
        "decoding": decoding_record(args.generate_kwargs),
    }
    results = {"identity": identity, "behaviour": behaviour_headline(tasks), "tasks": tasks}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    results["plots"] = write_plots(results, out_dir)
    return results


def _version(dist: str, module: Any) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return getattr(module, "__version__", None)


def cmd_eval(args: argparse.Namespace) -> int:
    results = run_eval(args)
    if args.suite:
        print(format_suite(results))
    else:
        print(format_table(results))
    print(f"eval: wrote {Path(args.output_dir) / 'results.json'}")
    return 0


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate an adapter: a suite of tasks (--suite), or behavior alignment, "
                       "examples and transcription WER on one file (--data)")
    p.add_argument("--model", default=None, help="a trained adapter directory")
    p.add_argument("--untrained", action="store_true",
                   help="evaluate a freshly initialised adapter (backbones named by --model's config, or --encoder/--llm)")
    p.add_argument("--encoder", default=None, help="with --untrained and no --model")
    p.add_argument("--llm", default=None, help="with --untrained and no --model")
    p.add_argument("--suite", default=None, metavar="SUITE.yaml",
                   help="a suite of tasks (docs/evaluation.md; recipes/eval/*.yaml); checked whole before any "
                        "model loads")
    p.add_argument("--data", default=None, nargs="+", help="the quick form: behavior data JSONL (held-out), or a "
                   "manifest for transcribe/cascade only")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"with --data, comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="only the first N utterances (of each task's manifest)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the suite's, else 8")
    p.add_argument("--contrast-model", default=None, metavar="DIR",
                   help="a second adapter (e.g. ASR-only) for the suite's representation tasks")
    p.add_argument("--asr-model", default=None,
                   help="the cascade's Whisper (default: the suite's asr_model, else the adapter's encoder)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--instruction", default=None,
                   help="the continuation instruction (default: the one the adapter was trained with, else the paper's)")
    p.add_argument("--group-by", default="voice,voice_seen", help="line fields to break alignment down by (comma-separated)")
    p.add_argument("--n-examples", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="--data: for the examples' speech continuations (default 64); --suite: a cap on every "
                        "task's answers, for a quick look (default: each task's own)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the gap-closed CI")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed; the adapter's seed with --untrained")
    p.add_argument("--feature-cache", default=None, help="default: $BLSP_CACHE/features (shared with training)")
    p.add_argument("--no-feature-cache", action="store_true", help="encode speech on the fly, write nothing")
    p.add_argument("--answer-cache", default=None, metavar="DIR",
                   help="--suite: the text rows' answers (transcript and cascade; they depend on the frozen LLM only, "
                        "not the adapter), kept to be read again by the next evaluation (default: $BLSP_CACHE/answers)")
    p.add_argument("--no-answer-cache", action="store_true", help="--suite: answer every text row afresh, keep nothing")
    p.add_argument("--no-strict", action="store_true", help="allow backbones other than the trained ones")
    p.add_argument("--bridge-confidence", type=float, default=None, metavar="P",
                   help="token-bridge models: read each token Whisper is at least P sure of as the LLM's own "
                        "embedding of it (default: as the model was trained)")
    p.add_argument("--bridge-transcript", action=argparse.BooleanOptionalAction, default=None,
                   help="token-bridge models: read Whisper's transcript as the LLM's tokenizer splits it, each token "
                        "plus the correction of the state that holds it; --no-bridge-transcript: one vector per "
                        "Whisper token (default: as the model was trained)")
    from .flags import add_repetition_flags

    add_repetition_flags(p)  # every generated answer's (transcription, examples, a suite's tasks)
    p.set_defaults(func=cmd_eval)
    return p
