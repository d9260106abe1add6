"""`blsp eval`: behavior alignment, side-by-side continuations, zero-shot transcription, and
the command in both its forms: `--suite SUITE.yaml` (suites.py checks it, tasks.py runs its
tasks, representation.py the hidden-state analysis, report.py prints and plots) and the quick
`--data FILE --tasks ...` over one file, implemented here.

Every result is a plain dict (JSON-ready, no NaN: an undefined number is None); the metric
formulas live in metrics.py.

Behavior alignment (DESIGN.md, "What we measure"): on held-out behavior data, the LLM's mean
per-token loss (nats/token over all target tokens of the set) on the text-derived continuation
(plus end-of-turn unless truncated) given
  (a) the instruction only (the floor), (b) the speech, (c) the transcript (the ceiling),
and `gap_closed = (a - b) / (a - c)`: the share of what the transcript tells the LLM that the
speech tells it too. Also KL(p_text || p_speech) of the next-token distributions over the
continuation positions. All three conditions share the tokens around the transcript/speech slot
(see prompts.py), so their target positions line up one for one.

Transcription: WER and CER (jiwer) after Whisper's English normaliser (`blsp.data.normalize_transcript`),
against the cascade baseline: Whisper's own greedy transcript of the same clips (30 s padded
window, `blsp.whisper.transcribe`), scored the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import (Utterance, is_copy_continuation, load_utterance_audio, normalize_transcript, prompt_transcript,
                   read_manifest)
from .errors import BlspError
from .features import FeatureCache, encode_waveforms
from .inference import decoding_record
from .io import file_sha256
from .metrics import NORMALISER, bootstrap_gap_ci, error_rates, gap_closed
from .modeling import IGNORE_INDEX, BlspModel, shared_prefix
from .processing import Example
from .prompts import CONTINUATION_INSTRUCTION, task_instruction, text_part

TASKS = ("alignment", "examples", "transcribe", "cascade")
CONDITIONS = ("instruction", "speech", "transcript")


# ----------------------------------------------------------------------------------------------
# Speech features: from the on-disk cache (as training) or encoded on the fly
# ----------------------------------------------------------------------------------------------
class SpeechFeatures:
    """Encoder features of utterances, a batch at a time (never all held in memory).

    With a `FeatureCache` (or its root directory) every clip is encoded once into the cache and
    loaded from it; without one, each batch is encoded directly.
    """

    def __init__(self, model: BlspModel, utterances: Sequence[Utterance], cache: FeatureCache | str | Path | None = None):
        self.model = model
        if cache is not None and not isinstance(cache, FeatureCache):
            # No fingerprint, no way to tell one encoder's cached features from another's: encode.
            fingerprint = model.config.feature_key  # the frozen part's output (see BlspConfig.feature_key)
            cache = FeatureCache(cache, fingerprint) if fingerprint else None
        elif cache is not None:
            cache.check_model(model)  # a cache opened by the caller: keyed as the model reads?
        self.cache = cache
        if cache is not None:
            cache.fill(model, utterances)

    def __call__(self, utterances: Sequence[Utterance]) -> list[torch.Tensor]:
        if self.cache is not None:
            return [self.cache.load(u.audio) for u in utterances]
        return encode_waveforms(self.model, [load_utterance_audio(u) for u in utterances])


def _features(model, utterances, feature_cache) -> SpeechFeatures:
    return feature_cache if isinstance(feature_cache, SpeechFeatures) else SpeechFeatures(model, utterances, feature_cache)


# ----------------------------------------------------------------------------------------------
# Behavior alignment
# ----------------------------------------------------------------------------------------------
def instruction_only_prompt(model: BlspModel, instruction: str):
    return model.processor.prompt.render([{"role": "user", "content": [text_part(instruction)]}])


def behavior_target(model: BlspModel, utt: Utterance) -> list[int]:
    return model.processor.prompt.target_ids(utt.extra["continuation"], bool(utt.extra.get("truncated")))


@torch.no_grad()
def target_hidden(model: BlspModel, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The LLM's last hidden state at each position that predicts a target token ([N, d]), those
    tokens ([N]) and each example's number of them, in example order."""
    batch = model.processor.collate(examples)
    # The system prompt and instruction every row opens with run once, for the whole batch (a
    # third to a half of each prompt's tokens), as in training.
    prefix = shared_prefix(batch["input_ids"], batch["attention_mask"], batch["labels"])
    device = model.language_model.device
    batch = {k: v.to(device) for k, v in batch.items()}
    embeds, mask = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch.get("encoder_features"),
                                        batch.get("encoder_lengths"))
    with model.reading(batch["input_ids"]):
        hidden = model.llm_hidden_states(embeds, mask, prefix)
    shift = batch["labels"][:, 1:]
    where = shift != IGNORE_INDEX
    return hidden[:, :-1][where], shift[where], where.sum(1).tolist()


@torch.no_grad()
def token_scores(model: BlspModel, hidden: dict[str, torch.Tensor], targets: torch.Tensor,
                 kl_pair: tuple[str, str] | None = ("transcript", "speech"), chunk: int = 256,
                 extra_kl: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Per-token cross-entropy of `targets` under each condition's hidden states, and per-token
    KL(p_first || p_second) for `kl_pair` (as "kl") and KL(p_first || p_name) for each name in
    `extra_kl` (as "kl_<name>"); the vocabulary projection runs `chunk` positions at a time so
    memory stays at chunk x vocab whatever the number of tokens."""
    pairs = {"kl": kl_pair} if kl_pair else {}
    pairs.update({f"kl_{name}": (kl_pair[0], name) for name in extra_kl} if kl_pair else {})
    out: dict[str, list[torch.Tensor]] = {name: [] for name in [*hidden, *pairs]}
    for start in range(0, targets.shape[0], chunk):
        tgt = targets[start : start + chunk]
        logp = {}
        for name, h in hidden.items():
            lp = F.log_softmax(model.lm_logits(h[start : start + chunk]).float(), dim=-1)
            out[name].append(-lp.gather(1, tgt[:, None])[:, 0].cpu())
            if any(name in pair for pair in pairs.values()):
                logp[name] = lp
        for key, (first, second) in pairs.items():
            p, q = logp[first], logp[second]
            out[key].append((p.exp() * (p - q)).sum(-1).clamp(min=0).cpu())
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def _summary(rows: list[dict], conditions: Sequence[str]) -> dict:
    n_tok = sum(r["n_tokens"] for r in rows)
    loss = {c: sum(r[f"sum_{c}"] for r in rows) / n_tok if n_tok else None for c in conditions}
    out = {"n_utterances": len(rows), "n_tokens": n_tok, "loss": loss,
           "gap_closed": gap_closed(loss["instruction"], loss["speech"], loss["transcript"]) if n_tok else None,
           "kl_text_speech": sum(r["sum_kl"] for r in rows) / n_tok if n_tok else None}
    if "cascade" in conditions and n_tok:
        out["gap_closed_cascade"] = gap_closed(loss["instruction"], loss["cascade"], loss["transcript"])
        out["kl_text_cascade"] = sum(r["sum_kl_cascade"] for r in rows) / n_tok
    return out


def _group_key(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def alignment_report(model: BlspModel, utterances: Sequence[Utterance], batch_size: int = 8,
                     feature_cache: FeatureCache | SpeechFeatures | str | Path | None = None,
                     instruction: str = CONTINUATION_INSTRUCTION, asr_transcripts: dict[str, str] | None = None,
                     group_by: Sequence[str] = ("voice", "voice_seen"), bootstrap_samples: int = 1000, seed: int = 0,
                     chunk: int = 256, progress: bool = True) -> dict:
    """Behavior alignment on behavior data (lines with `continuation`, `truncated`, `prompt_transcript`).

    `asr_transcripts` (id -> text, e.g. Whisper's): adds the cascade condition, the continuation's
    loss given the ASR transcript in the transcript's place (normalised as the line's own
    transcript was), and its share of the gap. `group_by`: line fields to break the numbers down
    by (e.g. `voice`, for seen vs unseen voices); a `copy` breakdown (continuation == transcript)
    is always added.
    """
    if not utterances:
        raise BlspError("alignment: no utterances to evaluate")
    proc = model.processor
    feats = _features(model, utterances, feature_cache)
    floor_prompt = instruction_only_prompt(model, instruction)
    speech_prompt = proc.speech_prompt(instruction)
    conditions = list(CONDITIONS) + (["cascade"] if asr_transcripts is not None else [])
    order = sorted(range(len(utterances)), key=lambda i: len(prompt_transcript(utterances[i])))
    rows: list[dict | None] = [None] * len(utterances)
    was_training = model.training
    model.eval()
    with tqdm(total=len(order), desc="eval: alignment", unit="utt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            utts = [utterances[i] for i in idx]
            targets = [behavior_target(model, u) for u in utts]
            speech = feats(utts)
            examples = {
                "instruction": [Example(floor_prompt, target=t) for t in targets],
                "speech": [Example(speech_prompt, [f], t) for f, t in zip(speech, targets)],
                "transcript": [Example(proc.transcript_prompt(instruction, prompt_transcript(u)), target=t)
                               for u, t in zip(utts, targets)],
            }
            if asr_transcripts is not None:
                examples["cascade"] = [Example(proc.transcript_prompt(instruction, _as_prompted(u, asr_transcripts[u.id])),
                                               target=t) for u, t in zip(utts, targets)]
            hidden, lengths, tokens = {}, None, None
            for name, exs in examples.items():
                # The text conditions are the frozen LLM's (LoRA, if the adapter has it, is for speech).
                with model.lora_off() if name != "speech" else contextlib.nullcontext():
                    hidden[name], tgt, lens = target_hidden(model, exs)
                if tokens is None:
                    tokens, lengths = tgt, lens
                elif lens != lengths or not torch.equal(tgt, tokens):
                    raise RuntimeError(f"the {name} prompt scores other target tokens than the first condition")
            scores = token_scores(model, hidden, tokens, chunk=chunk,
                                  extra_kl=("cascade",) if asr_transcripts is not None else ())
            offset = 0
            for i, u, n in zip(idx, utts, lengths):
                part = {k: v[offset : offset + n] for k, v in scores.items()}
                offset += n
                row = {"id": u.id, "n_tokens": n, "copy": is_copy_continuation(u)}
                for field in group_by:
                    if field in u.extra:
                        row[field] = u.extra[field]
                for c in conditions:
                    row[f"sum_{c}"] = float(part[c].sum())
                row["sum_kl"] = float(part["kl"].sum())
                if "kl_cascade" in part:
                    row["sum_kl_cascade"] = float(part["kl_cascade"].sum())
                rows[i] = row
            bar.update(len(idx))
    model.train(was_training)

    report = _summary(rows, conditions)
    report["gap_closed_ci95"] = bootstrap_gap_ci(
        [r["sum_instruction"] for r in rows], [r["sum_speech"] for r in rows], [r["sum_transcript"] for r in rows],
        samples=bootstrap_samples, seed=seed)
    report["bootstrap"] = {"samples": bootstrap_samples, "seed": seed, "level": 0.95,
                           "resampled": "utterances", "statistic": "set-level gap closed"}
    groups: dict[str, dict] = {}
    for field in [*group_by, "copy"]:
        values = sorted({_group_key(r[field]) for r in rows if field in r})
        if values:
            groups[field] = {v: _summary([r for r in rows if field in r and _group_key(r[field]) == v], conditions)
                             for v in values}
    report["groups"] = groups
    report["instruction"] = instruction
    report["unit"] = "nats per target token (continuation + end-of-turn unless truncated)"
    report["per_utterance"] = [
        {"id": r["id"], "n_tokens": r["n_tokens"], "copy": r["copy"],
         **{f: r[f] for f in group_by if f in r},
         **{f"loss_{c}": r[f"sum_{c}"] / r["n_tokens"] for c in conditions},
         "kl_text_speech": r["sum_kl"] / r["n_tokens"],
         "gap_closed": gap_closed(r["sum_instruction"], r["sum_speech"], r["sum_transcript"])}
        for r in rows
    ]
    return report


def _as_prompted(utt: Utterance, asr_text: str) -> str:
    """An ASR transcript prepared as step 1 prepared the line's transcript: normalised iff it was."""
    if prompt_transcript(utt) == normalize_transcript(utt.text):
        return normalize_transcript(asr_text)
    return asr_text.strip()


# ----------------------------------------------------------------------------------------------
# Generation-based reports
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def speech_generate(model: BlspModel, utterances: Sequence[Utterance], instruction: str, feats: SpeechFeatures,
                    batch_size: int = 8, max_new_tokens: int | Callable[[Sequence[Utterance]], int] = 64,
                    desc: str = "eval: generating", progress: bool = True,
                    generate_kwargs: dict | None = None) -> list[str]:
    """Greedy answers to `instruction` over each utterance's speech, batched (`generate_kwargs`:
    more of `generate`'s options, e.g. `blsp.inference.repetition_guard`'s)."""
    from .inference import generate_from_examples

    prompt = model.processor.speech_prompt(instruction)
    answers: list[str] = []
    with tqdm(total=len(utterances), desc=desc, unit="utt", disable=not progress) as bar:
        for start in range(0, len(utterances), batch_size):
            utts = utterances[start : start + batch_size]
            limit = max_new_tokens(utts) if callable(max_new_tokens) else max_new_tokens
            examples = [Example(prompt, [f]) for f in feats(utts)]
            answers += generate_from_examples(model, examples, max_new_tokens=limit, **(generate_kwargs or {}))
            bar.update(len(utts))
    return answers


def continuation_examples(model: BlspModel, utterances: Sequence[Utterance], n: int = 5,
                          instruction: str = CONTINUATION_INSTRUCTION, max_new_tokens: int = 64,
                          feature_cache: FeatureCache | SpeechFeatures | str | Path | None = None,
                          generate_kwargs: dict | None = None) -> list[dict]:
    """The first `n` utterances side by side: transcript, the LLM's continuation of it (from the
    data), and the LLM's greedy continuation of the speech."""
    utts = list(utterances[:n])
    if not utts:
        return []
    speech = speech_generate(model, utts, instruction, _features(model, utts, feature_cache),
                             max_new_tokens=max_new_tokens, desc="eval: examples", generate_kwargs=generate_kwargs)
    return [{"id": u.id, "transcript": prompt_transcript(u), "text_continuation": u.extra.get("continuation"),
             "speech_continuation": s} for u, s in zip(utts, speech)]


def load_whisper(name: str):
    """(WhisperForConditionalGeneration, tokenizer) of a packaged name, directory or hub id."""
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    from .packaged import resolve

    path = resolve(name)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise BlspError(f"cascade: cannot load Whisper {name!r} with its tokenizer: {err}") from None
    return model, tokenizer


def whisper_transcripts(whisper, utterances: Sequence[Utterance], batch_size: int = 8, language: str = "en",
                        progress: bool = True) -> list[str]:
    """Whisper's own greedy transcripts (the cascade's ASR), on the padded 30 s window."""
    from .whisper import transcribe

    model, tokenizer = whisper
    out: list[str] = []
    with tqdm(total=len(utterances), desc="eval: whisper (cascade)", unit="utt", disable=not progress) as bar:
        for start in range(0, len(utterances), batch_size):
            utts = utterances[start : start + batch_size]
            out += transcribe(model, tokenizer, [load_utterance_audio(u) for u in utts], language=language,
                              batch_size=batch_size)
            bar.update(len(utts))
    return out


def transcription_report(model: BlspModel, utterances: Sequence[Utterance], whisper: Any = None,
                         cascade: bool = True, blsp: bool = True, batch_size: int = 8,
                         max_new_tokens: int | None = None, language: str = "en",
                         feature_cache: FeatureCache | SpeechFeatures | str | Path | None = None,
                         generate_kwargs: dict | None = None) -> dict:
    """Zero-shot transcription over speech (the `transcribe` instruction) and the cascade baseline.

    `whisper`: a (model, tokenizer) pair, a name/directory, or None for the Whisper named by the
    model's config (`encoder_name`). `max_new_tokens` None: per batch, twice the longest
    reference's LLM tokens plus 8 (at most 256), so a looping answer costs bounded time and still
    scores as the insertions it is. `generate_kwargs`: the BLSP row's decoding beyond greedy (e.g.
    `blsp.inference.repetition_guard`'s), recorded in the report.
    """
    refs = [u.text for u in utterances]
    report: dict[str, Any] = {"n_utterances": len(utterances), "normaliser": NORMALISER,
                              "instruction": task_instruction("transcribe"),
                              "decoding": decoding_record(generate_kwargs or {})}
    rows = [{"id": u.id, "reference": u.text} for u in utterances]
    if blsp:
        tok = model.processor.tokenizer

        def limit(utts):
            if max_new_tokens is not None:
                return max_new_tokens
            return min(256, 2 * max(len(tok(u.text, add_special_tokens=False)["input_ids"]) for u in utts) + 8)

        hyps = speech_generate(model, utterances, task_instruction("transcribe"),
                               _features(model, utterances, feature_cache), batch_size=batch_size,
                               max_new_tokens=limit, desc="eval: transcribe", generate_kwargs=generate_kwargs)
        scores = error_rates(refs, hyps)
        for row, h, s in zip(rows, hyps, scores.pop("per_utterance")):
            row.update(blsp=h, blsp_wer=s["wer"], blsp_cer=s["cer"])
        report["blsp"] = scores
    if cascade:
        name = whisper if isinstance(whisper, str) else model.config.encoder_name
        if whisper is None or isinstance(whisper, str):
            if not name:
                raise BlspError("cascade: the model's config names no encoder; pass the Whisper to use")
            whisper = load_whisper(name)
            whisper[0].to(model.language_model.device)
        hyps = whisper_transcripts(whisper, utterances, batch_size=batch_size, language=language)
        scores = error_rates(refs, hyps)
        for row, h, s in zip(rows, hyps, scores.pop("per_utterance")):
            row.update(cascade=h, cascade_wer=s["wer"], cascade_cer=s["cer"])
        report["cascade"] = {**scores, "asr": name or "given"}
    report["per_utterance"] = rows
    return report


# ----------------------------------------------------------------------------------------------
# Output: identity, plot, table
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
        "speech_language": cfg.speech_language,
        "decoder_fingerprint": cfg.decoder_fingerprint,
        "encoder_name": cfg.encoder_name,
        "encoder_fingerprint": cfg.encoder_fingerprint,
        "llm_name": cfg.llm_name,
        "llm_fingerprint": cfg.llm_fingerprint,
        "system_prompt": cfg.system_prompt,
    }


def plot_alignment(report: dict, png_path: str | Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"instruction": "instruction only\n(floor)", "speech": "speech", "transcript": "transcript\n(ceiling)",
              "cascade": "ASR transcript\n(cascade)"}
    names = [c for c in ("instruction", "speech", "cascade", "transcript") if report["loss"].get(c) is not None]
    values = [report["loss"][c] for c in names]
    colors = {"instruction": "#999999", "speech": "#d9534f", "cascade": "#f0ad4e", "transcript": "#5cb85c"}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    bars = ax.bar([labels[c] for c in names], values, color=[colors[c] for c in names])
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("loss on continuation (nats/token)")
    g, ci = report.get("gap_closed"), report.get("gap_closed_ci95")
    head = f"gap closed by speech: {_pct(g)}" + (f" (95% CI {_pct(ci[0])} .. {_pct(ci[1])})" if ci else "")
    ax.set_title(head + (f"\n{title}" if title else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


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
    from .training import read_behavior_data

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
    from .modeling import BlspConfig, initial_speech_vectors

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
                  "speech_language": cfg.speech_language or "en"} if cfg else {}
        model = BlspModel.from_components(encoder, llm, seed=args.seed, **kwargs)
    else:
        if not args.model:
            raise BlspError("give --model DIR (a trained adapter), or --untrained with --encoder and --llm")
        model = BlspModel.from_pretrained(args.model, strict=not args.no_strict)
    return model.to(default_device(DistInfo())).eval()


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
    from .cli import repetition_kwargs

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
    from .metrics import LABEL_RULE
    from .report import write_plots
    from .suites import load_suite, load_task_data
    from .tasks import Runner, run_tasks

    suite = load_suite(args.suite)
    limit = args.limit or suite.limit
    data = {spec.name: load_task_data(spec, limit) for spec in suite.tasks}  # all checked before the model loads
    model = load_model_for_eval(args)
    cache_root = None if args.no_feature_cache else (
        Path(args.feature_cache) if args.feature_cache else packaged.CACHE_DIR / "features")
    runner = Runner(model, batch_size=args.batch_size or suite.batch_size or 8, feature_cache=cache_root,
                    asr_model=args.asr_model or suite.asr_model, max_new_tokens=args.max_new_tokens,
                    generate_kwargs=args.generate_kwargs)
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
    results = {"identity": identity, "tasks": tasks}
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
        from .report import format_suite

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
                   help="a suite of tasks (README, Evaluation; recipes/eval/*.yaml); checked whole before any "
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
    p.add_argument("--no-strict", action="store_true", help="allow backbones other than the trained ones")
    from .cli import add_repetition_flags

    add_repetition_flags(p)  # every generated answer's (transcription, examples, a suite's tasks)
    p.set_defaults(func=cmd_eval)
    return p
