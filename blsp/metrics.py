"""Metrics: pure functions of strings and labels, each checkable by hand (tests/test_metrics.py).

Every function returns a plain dict (JSON-ready; an undefined number is None, never NaN) that
names what was computed with what: the normaliser of WER, sacrebleu's signature of BLEU and
chrF, the label-mapping rule of classification. Scores are corpus-level (total edits over total
reference words; BLEU over the whole set), not means of per-utterance scores.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .data import normalize_transcript
from .voice import KEYWORDS, VOICE_ATTRIBUTES, describes, said_negated

NORMALISER = (
    "whisper-english: transformers EnglishTextNormalizer (Whisper's English normaliser) "
    "without the British-to-American spelling map"
)
# speech in any other language, as Whisper scores it
BASIC_NORMALISER = "whisper-basic: transformers BasicTextNormalizer (Whisper's), accents kept"


def normaliser_name(language: str) -> str:
    return NORMALISER if language == "en" else BASIC_NORMALISER


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ----------------------------------------------------------------------------------------------
# Transcription
# ----------------------------------------------------------------------------------------------
def error_rates(references: Sequence[str], hypotheses: Sequence[str], normalise: bool = True,
                language: str = "en") -> dict:
    """Corpus WER and CER (total edits / total reference words or characters) with jiwer, and the
    per-utterance values. Both sides go through Whisper's normaliser first (its English one for
    English, its basic one for `language`s other than English)."""
    import jiwer

    norm = (lambda s: normalize_transcript(s, language)) if normalise else (lambda s: s)
    refs = [norm(r).strip() for r in references]
    hyps = [norm(h).strip() for h in hypotheses]
    totals = dict.fromkeys(("substitutions", "deletions", "insertions", "ref_words",
                            "char_edits", "ref_chars"), 0)
    rows = []
    for ref, hyp in zip(refs, hyps):
        w = jiwer.process_words(ref, hyp)
        c = jiwer.process_characters(ref, hyp)
        n_words = w.hits + w.substitutions + w.deletions
        n_chars = c.hits + c.substitutions + c.deletions
        w_edits = w.substitutions + w.deletions + w.insertions
        c_edits = c.substitutions + c.deletions + c.insertions
        totals["substitutions"] += w.substitutions
        totals["deletions"] += w.deletions
        totals["insertions"] += w.insertions
        totals["ref_words"] += n_words
        totals["char_edits"] += c_edits
        totals["ref_chars"] += n_chars
        rows.append({"reference_normalised": ref, "hypothesis_normalised": hyp,
                     "wer": w_edits / n_words if n_words else None,
                     "cer": c_edits / n_chars if n_chars else None})
    word_edits = totals["substitutions"] + totals["deletions"] + totals["insertions"]
    return {
        "wer": word_edits / totals["ref_words"] if totals["ref_words"] else None,
        "cer": totals["char_edits"] / totals["ref_chars"] if totals["ref_chars"] else None,
        **totals,
        "n": len(refs),
        "normaliser": normaliser_name(language) if normalise else None,
        "per_utterance": rows,
    }


# ----------------------------------------------------------------------------------------------
# Translation (and agreement of continuations): sacrebleu
# ----------------------------------------------------------------------------------------------
def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Per-utterance references (one string, or several) -> sacrebleu's reference streams."""
    per_utt = [[r] if isinstance(r, str) else list(r) for r in references]
    counts = {len(r) for r in per_utt}
    if len(counts) > 1:
        raise ValueError(f"every utterance needs the same number of references (found {sorted(counts)})")
    n_refs = counts.pop() if counts else 1
    return [[r[k] for r in per_utt] for k in range(n_refs)]


def translation_scores(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                       target_lang: str = "", tokenize: str | None = None) -> dict:
    """Corpus BLEU and chrF (sacrebleu, its defaults), with their signatures, and per-utterance
    sentence BLEU (effective order) and chrF for reading the outliers.

    `target_lang` picks sacrebleu's tokenizer for BLEU as sacrebleu does (zh, ja-mecab,
    ko-mecab; 13a otherwise); `tokenize` overrides it. chrF works on characters: no tokenizer.
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return {"bleu": None, "chrf": None, "n": 0, "bleu_signature": None, "chrf_signature": None,
                "per_utterance": []}
    streams = _reference_streams(references)
    bleu = BLEU(trg_lang=target_lang, tokenize=tokenize)
    chrf = CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), streams)
    chrf_score = chrf.corpus_score(list(hypotheses), streams)
    sentence_bleu = BLEU(trg_lang=target_lang, tokenize=tokenize, effective_order=True)
    rows = []
    for i, hyp in enumerate(hypotheses):
        refs = [s[i] for s in streams]
        rows.append({"bleu": sentence_bleu.sentence_score(hyp, refs).score,
                     "chrf": chrf.sentence_score(hyp, refs).score})
    return {
        "bleu": float(bleu_score.score),
        "chrf": float(chrf_score.score),
        "bleu_detail": str(bleu_score),
        "n": len(hypotheses),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "per_utterance": rows,
    }


# ----------------------------------------------------------------------------------------------
# Classification: the label-mapping rule, accuracy and macro-F1
# ----------------------------------------------------------------------------------------------
LABEL_RULE = (
    "answer and labels lower-cased, NFKC, reduced to their words (runs of letters/digits); "
    "1) the answer's words equal one label's words -> that label; "
    "2) else the labels whose words occur as a contiguous run in the answer, dropping any that "
    "lies inside a longer one found (\"very positive\" over \"positive\"): exactly one left -> "
    "that label; "
    "3) else unmapped (no label, or several: ambiguous), scored as wrong and listed"
)


def label_words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower()))


def _contains(words: tuple[str, ...], part: tuple[str, ...]) -> bool:
    n = len(part)
    return n > 0 and any(words[i : i + n] == part for i in range(len(words) - n + 1))


@dataclass(frozen=True)
class LabelMatch:
    label: str | None  # None: unmapped
    rule: str  # "exact", "contains", "keywords" (map_voice_label), "ambiguous" or "none"
    candidates: tuple[str, ...] = ()  # the labels found, when ambiguous


def map_label(answer: str, labels: Sequence[str]) -> LabelMatch:
    """The model's free-text answer as one of `labels`, by LABEL_RULE."""
    words = label_words(answer)
    keyed = [(label, label_words(label)) for label in labels]
    for label, lw in keyed:
        if lw and words == lw:
            return LabelMatch(label, "exact")
    found = [(label, lw) for label, lw in keyed if _contains(words, lw)]
    # a label found only as part of a longer label found ("positive" in "very positive") is not a second answer
    found = [(label, lw) for label, lw in found
             if not any(other != lw and len(other) > len(lw) and _contains(other, lw) for _, other in found)]
    if len(found) == 1:
        return LabelMatch(found[0][0], "contains")
    if found:
        return LabelMatch(None, "ambiguous", tuple(label for label, _ in found))
    return LabelMatch(None, "none")


VOICE_LABEL_RULE = (
    LABEL_RULE.replace("3) else unmapped", "3) else, unmapped so far, the class whose words (blsp.voice.KEYWORDS: "
                       "\"woman\" is female, \"slowly\" slow, \"whispering\" yes) the answer says, not negated, "
                       "when exactly one; of a yes/no attribute whose one class has words, the other class where the "
                       "answer says them only negated (\"not whispering\"); 4) else unmapped")
)


def map_voice_label(answer: str, attribute: str) -> LabelMatch:
    """An answer to a question about the voice as one of the attribute's classes: by LABEL_RULE,
    and where that finds no label, by the words that name a class ("The speaker is a woman." is
    female, "The speaker is not whispering." is no): VOICE_LABEL_RULE. A hedge that names two
    classes stays ambiguous."""
    labels = VOICE_ATTRIBUTES[attribute].labels
    match = map_label(answer, labels)
    if match.rule != "none":
        return match
    named = [label for label in labels if describes(answer, attribute, label)]
    if len(named) == 1:
        return LabelMatch(named[0], "keywords")
    keyed = [label for label in labels if label in KEYWORDS.get(attribute, {})]
    if not named and len(keyed) == 1 and len(labels) == 2 and said_negated(answer, KEYWORDS[attribute][keyed[0]]):
        return LabelMatch(next(label for label in labels if label != keyed[0]), "keywords")
    return match


def canonical_label(value: str, labels: Sequence[str]) -> str | None:
    """A gold label as spelled in the label set (case and punctuation do not matter), or None."""
    words = label_words(value)
    return next((label for label in labels if label_words(label) == words), None)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float] | None:
    """The Wilson score interval of a share `successes / n` (None when n == 0).

    Chosen over the normal approximation because test sets here are small and accuracies near 0
    or 1 (a voice attribute the text cannot know, a ceiling that is nearly always right): there
    the normal interval leaves [0, 1] or collapses to a point, Wilson's does not. Closed form and
    deterministic, so it needs no seed (unlike the gap-closed bootstrap, a ratio of sums)."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0 or n successes the interval ends exactly at the share (not 7e-18 from it, by rounding)
    return [0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half)]


def classification_scores(gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy and macro-F1 over `labels`; a None prediction (unmapped) is wrong.

    F1 of a label = 2 TP / (2 TP + FP + FN). An unmapped answer is a false negative of its gold
    label and a false positive of none. Macro-F1 averages over the labels that occur in the gold
    or the predictions (a label absent from both has no F1), so a label set that lists a class
    the test set lacks does not pull the mean down.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    per_label, f1s = {}, []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
        per_label[label] = {"tp": tp, "fp": fp, "fn": fn, "support": tp + fn,
                            "precision": tp / (tp + fp) if tp + fp else None,
                            "recall": tp / (tp + fn) if tp + fn else None, "f1": f1}
        if f1 is not None:
            f1s.append(f1)
    n = len(gold)
    n_right = sum(g == p for g, p in zip(gold, predicted))
    columns = [*labels, None]
    confusion = {g: {("unmapped" if p is None else p): sum(x == g and y == p for x, y in zip(gold, predicted))
                     for p in columns} for g in labels}
    return {
        "accuracy": n_right / n if n else None,
        "accuracy_ci95": wilson_interval(n_right, n),  # Wilson score interval, 95%
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "unmapped": sum(p is None for p in predicted),
        "n": n,
        "per_label": per_label,
        "confusion": confusion,  # gold -> predicted -> count
    }


# ----------------------------------------------------------------------------------------------
# Voice description: free-form answers scored by the keywords of each stated attribute
# ----------------------------------------------------------------------------------------------
DESCRIPTION_RULE = (
    "per attribute a line states (blsp.voice.voice_attributes), an answer names it right when it "
    "says a keyword of the gold class and none of another class (blsp.voice.describes); classes "
    "without keywords (normal pace or pitch, not whispering, quiet) are not scored; overall: the "
    "share of right (clip, attribute) pairs over every scored pair")


def description_scores(answers: Sequence[str], truths: Sequence[Mapping[str, str]]) -> dict:
    """How often free-form voice descriptions name the attributes each clip is known to have.

    `truths[i]` is clip i's attribute -> class (only what its line states). Per attribute: the
    share of the scored clips whose answer names the class right, with its Wilson 95% interval;
    `overall` pools every scored (clip, attribute) pair, so an attribute stated on more clips
    weighs more, as it does in the data. `all_right`: the share of clips with at least one scored
    attribute whose answer names every scored attribute right."""

    if len(answers) != len(truths):
        raise ValueError(f"{len(answers)} answers but {len(truths)} clips")
    per_utt = [{name: describes(answer, name, value) for name, value in truth.items() if name in VOICE_ATTRIBUTES}
               for answer, truth in zip(answers, truths)]
    attributes = {}
    for name in VOICE_ATTRIBUTES:
        verdicts = [v[name] for v in per_utt if name in v]
        scored = [x for x in verdicts if x is not None]
        right = sum(scored)
        attributes[name] = {"share": right / len(scored) if scored else None, "right": right, "scored": len(scored),
                            "not_scored": len(verdicts) - len(scored), "ci95": wilson_interval(right, len(scored))}
    right = sum(a["right"] for a in attributes.values())
    scored = sum(a["scored"] for a in attributes.values())
    clips = [[x for x in v.values() if x is not None] for v in per_utt]
    clips = [c for c in clips if c]
    return {
        "overall": right / scored if scored else None,
        "overall_ci95": wilson_interval(right, scored),
        "right": right,
        "scored": scored,
        "all_right": sum(all(c) for c in clips) / len(clips) if clips else None,
        "n": len(answers),
        "attributes": attributes,
        "rule": DESCRIPTION_RULE,
        "per_utterance": per_utt,
    }


# ----------------------------------------------------------------------------------------------
# Behavior alignment
# ----------------------------------------------------------------------------------------------
def gap_closed(floor: float, speech: float, ceiling: float) -> float | None:
    """(a - b) / (a - c): 0 when speech helps no more than nothing, 1 when as much as the text.
    None when the transcript does not help at all (a == c): the share is undefined."""
    gap = floor - ceiling
    return None if gap == 0 else _finite((floor - speech) / gap)


def bootstrap_gap_ci(sum_floor: Sequence[float], sum_speech: Sequence[float], sum_ceiling: Sequence[float],
                     samples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of the set-level gap closed, resampling utterances.

    Takes per-utterance loss *sums*: every condition scores the same tokens, so the set-level
    gap closed is the ratio of summed differences, whatever each utterance's length.
    """
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (sum_floor, sum_speech, sum_ceiling))
    if len(a) < 2 or samples < 1:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    num, den = (a - b)[idx].sum(1), (a - c)[idx].sum(1)
    ok = den != 0
    if not ok.any():
        return None
    ratios = num[ok] / den[ok]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))]


def continuation_agreement(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """How far greedy continuations of speech (or an ASR transcript) agree with the greedy
    continuations of the gold transcript: corpus BLEU (sacrebleu, 13a) with the text-conditioned
    ones as references, and the share that are identical after whitespace normalisation."""
    scores = translation_scores(hypotheses, references)
    same = [" ".join(h.split()) == " ".join(r.split()) for h, r in zip(hypotheses, references)]
    return {"bleu": scores["bleu"], "identical": sum(same) / len(same) if same else None, "n": len(same),
            "bleu_signature": scores["bleu_signature"],
            "per_utterance": [{"bleu": r["bleu"], "identical": s} for r, s in zip(scores["per_utterance"], same)]}


# ----------------------------------------------------------------------------------------------
# Runaway answers: loops, refusals, answers that do not stop
# ----------------------------------------------------------------------------------------------
# Whisper's own loop test (openai/whisper decoding.py: compression_ratio_threshold 2.4): text that
# gzip shrinks past 2.4x repeats itself.
LOOP_COMPRESSION_RATIO = 2.4
LOOP_REPEATS = 4  # ... or one word n-gram (n <= 4) said 4 times running ("5 5 5 5", "I am. I am. ...")
LONG_FACTOR = 3  # longer than 3x the text path's answer ...
LONG_MARGIN_WORDS = 10  # ... and by more than 10 words (a one-word label answered in a sentence is not runaway)
_REFUSAL = re.compile(
    r"\b(i'?m sorry,? but|i am sorry,? but|i apologi[sz]e|i can(?:no|')t (?:help|assist|transcribe|listen|hear|"
    r"provide|process|access)|i(?:'m| am) (?:unable|not able)|as an ai\b|(?:audio|sound) (?:file|recording)s?\b"
    r"|i don'?t have (?:the ability|access))", re.IGNORECASE)
RUNAWAY_RULE = (
    f"an answer is runaway when, and the text path's answer to the same prompt is not: it loops (gzip "
    f"compression ratio > {LOOP_COMPRESSION_RATIO}, Whisper's test, or a word n-gram (n <= 4) {LOOP_REPEATS} "
    f"times running), refuses (\"I'm sorry, but\", \"I am unable\", \"as an AI\", \"audio file\", ...), or runs "
    f"past {LONG_FACTOR}x the text path's words and by more than {LONG_MARGIN_WORDS} words")


def compression_ratio(text: str) -> float:
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def is_loop(text: str) -> bool:
    if compression_ratio(text) > LOOP_COMPRESSION_RATIO:
        return True
    words = label_words(text)
    for n in range(1, 5):
        for start in range(len(words) - n * LOOP_REPEATS + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, LOOP_REPEATS)):
                return True
    return False


def is_refusal(text: str) -> bool:
    return _REFUSAL.search(text) is not None


def runaway_kind(answer: str, text_answer: str) -> str | None:
    """"loop", "refusal" or "long" (RUNAWAY_RULE) for an answer beside the text path's; None if neither."""
    if is_loop(answer) and not is_loop(text_answer):
        return "loop"
    if is_refusal(answer) and not is_refusal(text_answer):
        return "refusal"
    n, n_text = len(answer.split()), len(text_answer.split())
    if n > LONG_FACTOR * n_text and n > n_text + LONG_MARGIN_WORDS:
        return "long"
    return None


def runaway_rate(answers: Sequence[str], text_answers: Sequence[str]) -> dict:
    """The share of runaway answers and the count of each kind, by RUNAWAY_RULE."""
    kinds = [runaway_kind(a, t) for a, t in zip(answers, text_answers)]
    counts = {k: kinds.count(k) for k in ("loop", "refusal", "long")}
    return {"rate": sum(counts.values()) / len(kinds) if kinds else None, "n": len(kinds), **counts,
            "per_utterance": kinds}


def label_agreement(answers: Sequence[str], text_answers: Sequence[str], labels: Sequence[str]) -> dict:
    """For closed answers (sentiment): the share (0-100, as BLEU's scale) of answers mapped to the same
    label as the text path's answer (LABEL_RULE; two unmapped answers agree)."""
    mine = [map_label(a, labels).label for a in answers]
    theirs = [map_label(t, labels).label for t in text_answers]
    same = [a == b for a, b in zip(mine, theirs)]
    return {"agreement": 100 * sum(same) / len(same) if same else None, "n": len(same), "labels": list(labels),
            "label_rule": LABEL_RULE, "per_utterance": [{"label": a, "text_label": b} for a, b in zip(mine, theirs)]}


def answer_is_right(task: str, answer: str, attributes: Mapping[str, str]) -> bool:
    """Whether an answer to a voice question (`voice_questions`' task names) states the voice as it
    is: a closed question's answer maps to the right class (map_voice_label); a description
    names every stated attribute that has keywords right, and at least one."""
    name = task.removeprefix("voice_")
    if name in VOICE_ATTRIBUTES:
        return map_voice_label(answer, name).label == attributes.get(name)
    verdicts = [describes(answer, a, v) for a, v in attributes.items()]
    scored = [v for v in verdicts if v is not None]
    return bool(scored) and all(scored)
