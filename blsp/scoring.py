"""What `blsp eval` measures of a model, below the command and the suite runner (evaluation.py,
tasks.py): speech features a batch at a time, behavior alignment, greedy generation over speech,
zero-shot transcription against the cascade, and the alignment plot.

Every result is a plain dict (JSON-ready, no NaN: an undefined number is None); the metric
formulas live in metrics.py.

Behavior alignment: on held-out behavior data, the LLM's mean per-token loss (nats/token over
all target tokens of the set) on the text-derived continuation (plus end-of-turn unless truncated)
given
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

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import (Utterance, common_language, is_copy_continuation, load_utterance_audio, normalize_transcript,
                   prompt_transcript, utterance_language)
from .errors import BlspError
from .features import FeatureCache, encode_waveforms
from .inference import decoding_record
from .metrics import bootstrap_gap_ci, error_rates, gap_closed, normaliser_name
from .llm import shared_prefix
from .modeling import BlspModel
from .processing import IGNORE_INDEX
from .processing import Example
from .prompts import CONTINUATION_INSTRUCTION, task_instruction, text_part

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
    language = utterance_language(utt)
    if prompt_transcript(utt) == normalize_transcript(utt.text, language):
        return normalize_transcript(asr_text, language)
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


def load_cascade_asr(name: str):
    """(WhisperForConditionalGeneration, tokenizer): the cascade's ASR, a packaged name, directory or hub id."""
    from .whisper import load_whisper, load_whisper_tokenizer

    try:
        return load_whisper(name), load_whisper_tokenizer(name)
    except BlspError as err:
        raise BlspError(f"cascade: {err}") from None


def whisper_transcripts(whisper, utterances: Sequence[Utterance], batch_size: int = 8, language: str = "en",
                        progress: bool = True, cache: Any = None, fingerprint: str | None = None) -> list[str]:
    """Whisper's own greedy transcripts (the cascade's ASR), on the padded 30 s window. With a
    `cache` (blsp.answer_cache.AnswerCache) and the weights' `fingerprint`, a batch of clips
    transcribed before is read back."""
    from .whisper import transcribe

    model, tokenizer = whisper
    out: list[str] = []
    with tqdm(total=len(utterances), desc="eval: whisper (cascade)", unit="utt", disable=not progress) as bar:
        for start in range(0, len(utterances), batch_size):
            utts = utterances[start : start + batch_size]
            audio = [load_utterance_audio(u) for u in utts]
            key = cache.asr_key(fingerprint, audio, language, model.device.type) if cache is not None else None
            texts = cache.get(key, len(utts)) if cache is not None else None
            if texts is None:
                texts = transcribe(model, tokenizer, audio, language=language, batch_size=batch_size)
                if cache is not None:
                    cache.put(key, texts)
            out += texts
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
    spoken = common_language(utterances)  # the references' language: which normaliser scores them
    report: dict[str, Any] = {"n_utterances": len(utterances), "normaliser": normaliser_name(spoken),
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
        scores = error_rates(refs, hyps, language=spoken)
        for row, h, s in zip(rows, hyps, scores.pop("per_utterance")):
            row.update(blsp=h, blsp_wer=s["wer"], blsp_cer=s["cer"])
        report["blsp"] = scores
    if cascade:
        name = whisper if isinstance(whisper, str) else model.config.encoder_name
        if whisper is None or isinstance(whisper, str):
            if not name:
                raise BlspError("cascade: the model's config names no encoder; pass the Whisper to use")
            whisper = load_cascade_asr(name)
            whisper[0].to(model.language_model.device)
        hyps = whisper_transcripts(whisper, utterances, batch_size=batch_size, language=language)
        scores = error_rates(refs, hyps, language=spoken)
        for row, h, s in zip(rows, hyps, scores.pop("per_utterance")):
            row.update(cascade=h, cascade_wer=s["wer"], cascade_cer=s["cer"])
        report["cascade"] = {**scores, "asr": name or "given"}
    report["per_utterance"] = rows
    return report


# ----------------------------------------------------------------------------------------------
# The alignment plot
# ----------------------------------------------------------------------------------------------
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
