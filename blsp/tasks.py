"""Running a suite's tasks: each a table with the rows BLSP, cascade and text.

  blsp     the speech, through the adapter, in the user turn;
  cascade  an ASR transcript of the same clip in its place (the manifest's `asr` field, else the
           greedy transcript of the Whisper the encoder came from), the same LLM and instruction;
  text     the gold transcript in its place: what the LLM does when it reads perfectly.
The gap between text and blsp is what the adapter loses; cascade is the baseline to beat.
Questions about the voice (classification of a voice attribute, voice_description) may add

  described  the gold transcript after a sentence describing the voice (blsp.voice): the ceiling,
             what the LLM answers when it is told what the speech alone carries.

Every row is generated greedily and batched (`blsp.inference.generate_from_examples`) with the
same instruction and token budget, so the rows differ only in what fills the slot.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .answer_cache import AnswerCache
from .data import Utterance, common_language, prompt_transcript
from .errors import BlspError
from .scoring import (
    SpeechFeatures,
    _as_prompted,
    alignment_report,
    load_cascade_asr,
    speech_generate,
    whisper_transcripts,
)
from .metrics import (
    LABEL_RULE,
    VOICE_LABEL_RULE,
    DESCRIPTION_RULE,
    classification_scores,
    continuation_agreement,
    description_scores,
    error_rates,
    map_label,
    map_voice_label,
    normaliser_name,
    translation_scores,
)
from .fingerprint import weights_fingerprint
from .modeling import BlspModel
from .processing import Example
from .suites import ASR_FIELD, DESCRIBED, Suite, TaskData, TaskSpec, default_instruction
from .voice import describe_voice, described_transcript, voice_attributes
from .voice_channel import voice_rows

MaxTokens = int | Callable[[Sequence[Utterance]], int]
HEARD = "heard"  # a voice task's row of what the voice channel's classifier heard (no LLM involved)


# ----------------------------------------------------------------------------------------------
# Generation of the three rows
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def text_generate(model: BlspModel, utterances: Sequence[Utterance], texts: Sequence[str], instruction: str,
                  batch_size: int = 8, max_new_tokens: MaxTokens = 64, desc: str = "eval: generating",
                  progress: bool = True, generate_kwargs: dict | None = None,
                  cache: AnswerCache | None = None) -> list[str]:
    """Greedy answers to `instruction` with each text where the speech would be (the same prompt
    splicing as step 1), batched; `max_new_tokens` may be a function of the batch's utterances.
    With a `cache`, a batch answered before by the same frozen LLM is read, not decoded again."""
    from .inference import generate_from_examples

    answers: list[str] = []
    with tqdm(total=len(texts), desc=desc, unit="utt", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            utts = utterances[start : start + batch_size]
            limit = max_new_tokens(utts) if callable(max_new_tokens) else max_new_tokens
            prompts = [model.processor.transcript_prompt(instruction, t) for t in texts[start : start + batch_size]]
            key = cache.key(model, prompts, limit, generate_kwargs or {}) if cache is not None else None
            batch = cache.get(key, len(prompts)) if cache is not None else None
            if batch is None:
                batch = generate_from_examples(model, [Example(p) for p in prompts], max_new_tokens=limit,
                                               **(generate_kwargs or {}))
                if cache is not None:
                    cache.put(key, batch)
            answers += batch
            bar.update(len(prompts))
    return answers


def length_budget(model: BlspModel, factor: float, extra: int, cap: int = 256) -> Callable[[Sequence[Utterance]], int]:
    """Per batch: `factor` x the longest transcript's LLM tokens + `extra`, at most `cap`. A
    looping answer then costs bounded time and still scores as the insertions it is."""
    tok = model.processor.tokenizer

    def budget(utts: Sequence[Utterance]) -> int:
        longest = max(len(tok(u.text, add_special_tokens=False)["input_ids"]) for u in utts)
        return min(cap, int(factor * longest) + extra)

    return budget


class Runner:
    """What the tasks of one suite run share: the model, speech features, the cascade's ASR."""

    def __init__(self, model: BlspModel, batch_size: int = 8, feature_cache: str | Path | None = None,
                 asr_model: str | None = None, progress: bool = True, max_new_tokens: int | None = None,
                 generate_kwargs: dict | None = None, answer_cache: str | Path | None = None,
                 asr_language: str | None = None):
        self.model = model
        # the text rows' answers, kept between runs (blsp.answer_cache): they do not depend on the adapter
        self.answer_cache = AnswerCache(answer_cache) if answer_cache is not None else None
        self.generate_kwargs = generate_kwargs or {}  # every row's decoding beyond greedy (the loop guards)
        self.max_new_tokens = max_new_tokens  # a cap over every task's own budget (a quick look)
        self.batch_size = batch_size
        self.feature_cache = feature_cache
        self.asr_model = asr_model
        # the cascade transcribes as the model's own Whisper reads (a model trained with
        # --speech-language auto: Whisper's language detection), unless the suite says otherwise
        own = getattr(getattr(model, "config", None), "speech_language", None)
        self.asr_language = asr_language or own or "en"
        self.progress = progress
        self._whisper = None
        self._asr_memo: dict[str, str] = {}  # audio reference -> Whisper's transcript
        self.asr_identity: dict[str, Any] | None = None

    def features(self, utterances: Sequence[Utterance]) -> SpeechFeatures:
        return SpeechFeatures(self.model, utterances, self.feature_cache)

    def heard_labels(self, utterances: Sequence[Utterance], attribute: str) -> list[str] | None:
        """Per clip, the class the voice channel's classifier for `attribute` hears (its argmax),
        or None where the model names no such attribute."""
        channel = self.model.voice_channel
        if channel is None or attribute not in channel.attributes:
            return None
        n = voice_rows(self.model.config)
        feats = self.features(utterances)(utterances)
        heard = []
        for start in range(0, len(feats), self.batch_size):
            rows = torch.stack([f[:n] for f in feats[start : start + self.batch_size]])
            lengths = torch.full((rows.shape[0],), n)
            for posterior in self.model.heard_voice(rows, lengths):
                heard.append(max(posterior[attribute], key=posterior[attribute].get))
        return heard

    def cascade_transcripts(self, data: TaskData) -> dict[str, str]:
        """id -> the cascade's transcript: the manifest's own ASR output, else Whisper's (each
        clip transcribed once per run, whichever tasks share it)."""
        if data.asr is not None:
            return data.asr
        todo = [u for u in data.utterances if str(u.audio) not in self._asr_memo]
        if todo:
            whisper = self._load_whisper()
            for u, text in zip(todo, whisper_transcripts(whisper, todo, batch_size=self.batch_size,
                                                         language=self.asr_language,
                                                         progress=self.progress, cache=self.answer_cache,
                                                         fingerprint=self.asr_identity["fingerprint"])):
                self._asr_memo[str(u.audio)] = text
        return {u.id: self._asr_memo[str(u.audio)] for u in data.utterances}

    def _load_whisper(self):
        if self._whisper is None:
            name = self.asr_model or self.model.config.encoder_name
            if not name:
                raise BlspError("cascade: the model's config names no encoder; give the suite an `asr_model`")
            self._whisper = load_cascade_asr(name)
            self._whisper[0].to(self.model.language_model.device)
            self.asr_identity = {"source": "whisper", "name": name,
                                 "fingerprint": weights_fingerprint(self._whisper[0]),
                                 "decoding": f"greedy, 30 s window, language {self.asr_language} "
                                             "(blsp.whisper.transcribe)"}
        return self._whisper

    def row_answers(self, rows: Sequence[str], utterances: Sequence[Utterance], instruction: str,
                    texts: dict[str, Sequence[str]], max_new_tokens: MaxTokens, name: str,
                    feats: SpeechFeatures | None = None) -> dict[str, list[str]]:
        """Greedy answers of each row: `texts` gives the text rows' slot contents by row."""
        if self.max_new_tokens is not None:
            max_new_tokens = self.max_new_tokens
        out = {}
        for row in rows:
            desc = f"eval: {name} ({row})"
            if row == "blsp":
                out[row] = speech_generate(self.model, utterances, instruction, feats or self.features(utterances),
                                           batch_size=self.batch_size, max_new_tokens=max_new_tokens, desc=desc,
                                           progress=self.progress, generate_kwargs=self.generate_kwargs)
            else:  # the text rows read the frozen LLM: LoRA that acts on text too is off for them
                with self.model.lora_off() if self.model is not None else contextlib.nullcontext():
                    out[row] = text_generate(self.model, utterances, texts[row], instruction, self.batch_size,
                                             max_new_tokens, desc, self.progress, self.generate_kwargs,
                                             self.answer_cache)
        return out


def _slot_texts(spec: TaskSpec, data: TaskData, runner: Runner,
                prepare: Callable[[Utterance, str | None], str]) -> dict:
    """What the text rows put in the slot: the gold transcript, the cascade's transcript, and
    (row described) the gold transcript with its voice described."""
    texts = {"text": [prepare(u, None) for u in data.utterances]}
    if "cascade" in spec.rows:
        asr = runner.cascade_transcripts(data)
        texts["cascade"] = [prepare(u, asr[u.id]) for u in data.utterances]
        texts["asr"] = [asr[u.id] for u in data.utterances]
    if DESCRIBED in spec.rows:
        texts[DESCRIBED] = [described_text(u, t) for u, t in zip(data.utterances, texts["text"])]
    return texts


def voice_description(utt: Utterance) -> str | None:
    """The sentence the described row adds for this line's voice; None when the line states nothing."""
    return describe_voice(voice_attributes(utt.extra))


def described_text(utt: Utterance, transcript: str) -> str:
    """What the described row reads: the voice's description, then the transcript as the text row
    reads it (so the two rows differ only by the description); the bare transcript when the line
    states no attribute."""
    return described_transcript(transcript, voice_description(utt))


def _as_step1_fed(utt: Utterance, asr: str | None) -> str:
    """The transcript as step 1 fed it (normalised or not), and an ASR transcript prepared the same way."""
    return prompt_transcript(utt) if asr is None else _as_prompted(utt, asr)


def _as_written(utt: Utterance, asr: str | None) -> str:
    return utt.text if asr is None else asr


def voice_gate_entry(runner: Runner, instruction: str) -> dict:
    """{"voice_gate": "open" or "closed"}: whether a gated model's LLM read the voice under the
    instruction (blsp.voice_gate); empty for a model without a gate."""
    opens = runner.model.voice_gate_opens(instruction) if hasattr(runner.model, "voice_gate_opens") else None
    return {} if opens is None else {"voice_gate": "open" if opens else "closed"}


def _result(runner: Runner, spec: TaskSpec, data: TaskData, instruction: str, table: dict, **extra: Any) -> dict:
    cascade = None
    if "cascade" in spec.rows:
        cascade = {"source": f"the manifest's `{ASR_FIELD}` field"} if data.asr is not None else runner.asr_identity
    manifest = {"path": str(spec.manifest), "sha256": data.manifest_sha256, "n_total": data.n_total,
                "n_evaluated": len(data.utterances)}
    if spec.where is not None:
        manifest.update(where=dict(spec.where.required), n_selected=data.n_selected)
    return {"type": spec.type, "set": spec.set, "manifest": manifest,
            "instruction": instruction, **voice_gate_entry(runner, instruction),
            "options": dataclasses.asdict(spec.options), "metrics": list(spec.metrics),
            "rows": list(table), "cascade_asr": cascade, "table": table, **extra}


# ----------------------------------------------------------------------------------------------
# Task types
# ----------------------------------------------------------------------------------------------
def run_transcription(runner: Runner, spec: TaskSpec, data: TaskData, instruction: str) -> dict:
    """WER and CER of each row against `text`; plus the row `asr`, the ASR transcript itself."""
    utts = data.utterances
    texts = _slot_texts(spec, data, runner, _as_written)
    budget = spec.max_new_tokens or length_budget(runner.model, 2, 8)
    answers = runner.row_answers(spec.rows, utts, instruction, texts, budget, spec.name)
    if "asr" in texts:
        answers["asr"] = list(texts["asr"])
    refs = [u.text for u in utts]
    language = common_language(utts)
    table, details = {}, {}
    per_utt = [{"id": u.id, "reference": u.text} for u in utts]
    for row, hyps in answers.items():
        scores = error_rates(refs, hyps, language=language)
        for p, h, s in zip(per_utt, hyps, scores.pop("per_utterance")):
            p.update({row: h, f"{row}_wer": s["wer"], f"{row}_cer": s["cer"]})
        table[row] = {m: scores[m] for m in spec.metrics}
        details[row] = scores
    return _result(runner, spec, data, instruction, table, details=details, normaliser=normaliser_name(language),
                   per_utterance=per_utt)


def run_translation(runner: Runner, spec: TaskSpec, data: TaskData, instruction: str) -> dict:
    """BLEU and chrF of each row against the manifest's reference translation(s)."""
    opts = spec.options
    utts = data.utterances
    texts = _slot_texts(spec, data, runner, _as_written)
    budget = spec.max_new_tokens or length_budget(runner.model, 3, 16)
    answers = runner.row_answers(spec.rows, utts, instruction, texts, budget, spec.name)
    table, details, signatures = {}, {}, {}
    per_utt = [{"id": u.id, "source": u.text, "reference": g} for u, g in zip(utts, data.gold)]
    for row, hyps in answers.items():
        scores = translation_scores(hyps, data.gold, target_lang=opts.target_lang, tokenize=opts.tokenize)
        for p, h, s in zip(per_utt, hyps, scores.pop("per_utterance")):
            p.update({row: h, f"{row}_bleu": s["bleu"], f"{row}_chrf": s["chrf"]})
        table[row] = {m: scores[m] for m in spec.metrics}
        details[row] = scores
        signatures = {"bleu": scores["bleu_signature"], "chrf": scores["chrf_signature"]}
    return _result(runner, spec, data, instruction, table, details=details, signatures=signatures,
                   per_utterance=per_utt)


def run_classification(runner: Runner, spec: TaskSpec, data: TaskData, instruction: str) -> dict:
    """Accuracy and macro-F1 of each row; answers that map to no label are wrong and listed."""
    utts, opts = data.utterances, spec.options
    texts = _slot_texts(spec, data, runner, _as_written)
    budget = spec.max_new_tokens or 16
    answers = runner.row_answers(spec.rows, utts, instruction, texts, budget, spec.name)
    table, details = {}, {}
    per_utt = [{"id": u.id, "gold": g} for u, g in zip(utts, data.gold)]
    for row, said in answers.items():
        matches = [map_voice_label(a, opts.label_field) if opts.label_keywords else map_label(a, data.labels)
                   for a in said]
        scores = classification_scores(data.gold, [m.label for m in matches], data.labels)
        scores["unmapped_answers"] = [
            {"id": u.id, "answer": a, "gold": g, "why": m.rule,
             **({"labels_found": list(m.candidates)} if m.candidates else {})}
            for u, a, g, m in zip(utts, said, data.gold, matches) if m.label is None]
        for p, a, m in zip(per_utt, said, matches):
            p.update({row: a, f"{row}_label": m.label, f"{row}_rule": m.rule})
        table[row] = _classification_cells(scores, spec.metrics)
        details[row] = scores
    if DESCRIBED in texts:
        for p, t in zip(per_utt, texts[DESCRIBED]):
            p["described_input"] = t
    heard = runner.heard_labels(utts, opts.label_field) if opts.label_keywords == "voice" else None
    if heard is not None:  # what the voice channel's classifier heard, before the LLM says anything
        scores = {**classification_scores(data.gold, heard, data.labels), "unmapped_answers": []}
        table[HEARD], details[HEARD] = _classification_cells(scores, spec.metrics), scores
        for p, label in zip(per_utt, heard):
            p[f"{HEARD}_label"] = label
    rule = VOICE_LABEL_RULE if opts.label_keywords else LABEL_RULE
    return _result(runner, spec, data, instruction, table, labels=list(data.labels), label_rule=rule,
                   details=details, per_utterance=per_utt)


def _classification_cells(scores: dict, metrics: Sequence[str]) -> dict:
    """A row's table cells: the metrics asked for, accuracy's 95% interval beside it (a
    difference of a few points between rows on a hundred clips is noise), the unmapped count."""
    cells = {m: scores[m] for m in metrics}
    if "accuracy" in cells:
        cells = {"accuracy": cells.pop("accuracy"), "accuracy_ci": scores["accuracy_ci95"], **cells}
    return {**cells, "unmapped": scores["unmapped"]}


def _description_cells(scores: dict, metrics: Sequence[str]) -> dict:
    """A row's table cells, in the order of `metrics`: the overall share with its 95% interval,
    and the share of each attribute asked for."""
    cells = {}
    for m in metrics:
        if m == "overall":
            cells.update(overall=scores["overall"], overall_ci=scores["overall_ci95"])
        else:
            cells[m] = scores["attributes"][m]["share"]
    return cells


def run_voice_description(runner: Runner, spec: TaskSpec, data: TaskData, instruction: str) -> dict:
    """Free-form descriptions of the voice (DESCRIBE_QUESTION) by each row, scored per attribute
    the line states by its keywords (metrics.description_scores): the text and cascade rows can
    only guess (the floor), the described row is told (the ceiling)."""
    utts = data.utterances
    texts = _slot_texts(spec, data, runner, _as_written)
    budget = spec.max_new_tokens or 48  # one sentence
    answers = runner.row_answers(spec.rows, utts, instruction, texts, budget, spec.name)
    table, details, named = {}, {}, {}
    for row, said in answers.items():
        scores = description_scores(said, data.gold)
        named[row] = scores.pop("per_utterance")
        scores.pop("rule")  # once per result (description_rule), not per row
        details[row] = scores
        table[row] = _description_cells(scores, spec.metrics)
    examples = [{"id": u.id, "transcript": u.text, "attributes": g, "description": voice_description(u),
                 **({"asr": texts["asr"][i]} if "asr" in texts else {}),
                 **{row: answers[row][i] for row in answers}, **{f"{row}_named": named[row][i] for row in answers}}
                for i, (u, g) in enumerate(zip(utts[: spec.options.n_examples], data.gold))]
    return _result(runner, spec, data, instruction, table, details=details, description_rule=DESCRIPTION_RULE,
                   examples=examples,
                   table_note="share of clips whose answer names the attribute right (keywords; only attributes "
                              "with keywords for the clip's class are scored); overall pools every scored attribute")


def run_continuation(runner: Runner, spec: TaskSpec, data: TaskData, instruction: str) -> dict:
    """Behavior alignment (losses, gap closed, KL) and the agreement of greedy continuations.

    Agreement: BLEU of each row's greedy continuation against the greedy continuation of the
    gold transcript (generated now, with the same budget, so the text row is the reference).
    """
    opts = spec.options
    utts = list(data.utterances)
    feats = runner.features(utts)
    # as step 1 fed the transcript (normalised or not), and the ASR transcript prepared the same way
    texts = _slot_texts(spec, data, runner, _as_step1_fed)
    asr = dict(zip([u.id for u in utts], texts["asr"])) if "cascade" in spec.rows else None
    table: dict[str, dict] = {row: {} for row in spec.rows}
    extra: dict[str, Any] = {}
    if {"loss", "gap_closed", "kl"} & set(spec.metrics):
        report = alignment_report(runner.model, utts, batch_size=runner.batch_size, feature_cache=feats,
                                  instruction=instruction, asr_transcripts=asr, group_by=opts.group_by,
                                  bootstrap_samples=opts.bootstrap, seed=opts.seed, progress=runner.progress)
        extra["alignment"] = report
        loss = report["loss"]
        values = {
            "blsp": {"loss": loss["speech"], "gap_closed": report["gap_closed"], "kl": report["kl_text_speech"]},
            "cascade": {"loss": loss.get("cascade"), "gap_closed": report.get("gap_closed_cascade"),
                        "kl": report.get("kl_text_cascade")},
            "text": {"loss": loss["transcript"], "gap_closed": 1.0, "kl": 0.0},
            "floor": {"loss": loss["instruction"], "gap_closed": 0.0, "kl": None},
        }
        table["floor"] = {}
        for row in table:
            table[row].update({m: values[row][m] for m in ("loss", "gap_closed", "kl") if m in spec.metrics})
    # greedy continuations: of every utterance for the agreement, else of the examples only
    n_generate = len(utts) if "agreement" in spec.metrics else opts.n_examples
    generated = {}
    if n_generate:
        rows = list(dict.fromkeys(["text", *spec.rows]))  # the text row is the reference
        generated = runner.row_answers(rows, utts[:n_generate], instruction,
                                       {k: v[:n_generate] for k, v in texts.items()},
                                       spec.max_new_tokens or 64, spec.name, feats=feats)
    if "agreement" in spec.metrics:
        agreement = {row: continuation_agreement(generated[row], generated["text"]) for row in spec.rows}
        for row in spec.rows:
            table[row]["agreement"] = None if row == "text" else agreement[row]["bleu"]
        extra["agreement"] = {row: {k: v for k, v in a.items() if k != "per_utterance"}
                              for row, a in agreement.items() if row != "text"}
        extra["agreement"]["reference"] = "the greedy continuation of the gold transcript (row text)"
    if generated:
        extra["examples"] = [
            {"id": u.id, "transcript": prompt_transcript(u), "data_continuation": u.extra.get("continuation"),
             **{f"{row}_continuation": generated[row][i] for row in generated}}
            for i, u in enumerate(utts[: opts.n_examples])]
    return _result(runner, spec, data, instruction, {k: v for k, v in table.items() if v}, **extra)


def run_behaviour(runner: Runner, spec: TaskSpec, data: TaskData, instruction: str) -> dict:
    """Each behaviour instruction (blsp/parity.py) asked with the gold transcript (row text, the
    reference), the speech (blsp) and the ASR transcript (cascade): agreement with the text row,
    runaway answers, and KL(text||row) teacher-forced over the text row's answers."""
    from .parity import ANSWER_TOKENS, agreement_scores, answer_budget, answer_kl, load_behaviour_instructions

    model, opts = runner.model, spec.options
    utts = list(data.utterances)
    feats = runner.features(utts)
    texts = _slot_texts(spec, data, runner, _as_step1_fed)
    others = [r for r in spec.rows if r != "text"]
    tok = model.processor.tokenizer
    per_instruction, pooled = {}, {row: {"sum_kl": 0.0, "n_tokens": 0, "runaway": 0, "n": 0} for row in others}
    # the speech features the KL reads, loaded once for every instruction
    speech = feats(utts) if "blsp" in others and "kl" in spec.metrics else None
    for item in load_behaviour_instructions(opts.instructions):
        budget = spec.max_new_tokens or ANSWER_TOKENS
        text_answers = runner.row_answers(["text"], utts, item.instruction, texts, budget, f"{spec.name}/{item.name}",
                                          feats=feats)["text"]
        by_id = dict(zip([u.id for u in utts], text_answers))
        answers = runner.row_answers(others, utts, item.instruction, texts,
                                     lambda batch: answer_budget(tok, [by_id[u.id] for u in batch]),
                                     f"{spec.name}/{item.name}", feats=feats)
        result = {"instruction": item.instruction, **voice_gate_entry(runner, item.instruction),
                  "labels": list(item.labels), "rows": {}}
        for row in others:
            result["rows"][row] = agreement_scores(answers[row], text_answers, item)
        if "kl" in spec.metrics and others:
            cut = [len(tok(a, add_special_tokens=False)["input_ids"]) >= budget for a in text_answers]
            slots = {"text": texts["text"], **{row: (speech if row == "blsp" else texts[row]) for row in others}}
            kls = answer_kl(model, item.instruction, text_answers, cut, slots, batch_size=runner.batch_size)
            for row in others:
                result["rows"][row]["kl"] = kls[row]["kl"]
                pooled[row]["sum_kl"] += kls[row]["sum_kl"]
                pooled[row]["n_tokens"] += kls[row]["n_tokens"]
        for row in others:
            pooled[row]["runaway"] += sum(k is not None for k in result["rows"][row].pop("runaway_per_utterance"))
            pooled[row]["n"] += len(utts)
        result["examples"] = [{"id": u.id, "transcript": texts["text"][i], "text": text_answers[i],
                               **{row: answers[row][i] for row in others}} for i, u in enumerate(utts[: opts.n_examples])]
        per_instruction[item.name] = result
    table: dict[str, dict] = {}
    for row in others:
        cells = {}
        if "kl" in spec.metrics:
            p = pooled[row]
            cells["kl"] = p["sum_kl"] / p["n_tokens"] if p["n_tokens"] else None
        if "runaway" in spec.metrics:
            cells["runaway"] = pooled[row]["runaway"] / pooled[row]["n"] if pooled[row]["n"] else None
        if "agreement" in spec.metrics:
            cells.update({f"agree:{name}": r["rows"][row]["agreement"] for name, r in per_instruction.items()})
        table[row] = cells
    from .metrics import RUNAWAY_RULE

    return _result(runner, spec, data, "; ".join(r["instruction"] for r in per_instruction.values()), table,
                   instructions=per_instruction, instructions_file=opts.instructions, runaway_rule=RUNAWAY_RULE,
                   table_note="agreement with the text row's answers: BLEU, or % same label for closed answers; "
                              "KL over the text row's answer tokens, pooled over instructions")


def run_representation(runner: Runner, spec: TaskSpec, data: TaskData, instruction: str,
                       contrast_model: str | Path | None = None) -> dict:
    """Per-layer cosine of speech and transcript states; `contrast_model` adds a second adapter."""
    from .representation import representation_report

    utts = list(data.utterances)
    contrast = spec.options.contrast_model or contrast_model
    report = representation_report(runner.model, utts, [prompt_transcript(u) for u in utts], runner.features(utts),
                                   spec.options.instructions, contrast_model=contrast,
                                   batch_size=runner.batch_size, progress=runner.progress)
    table = {}
    for row, sims in report["models"].items():
        centred = sims["centred"]
        table[row] = {"cosine_same": sims["same_instruction"][-1],
                      "cosine_mismatched": (sims["mismatched_utterance"] or [None])[-1],
                      "centred_same": centred["same_instruction"][-1],
                      "centred_different": (centred["different_instruction"] or [None])[-1],
                      "centred_mismatched": (centred["mismatched_utterance"] or [None])[-1]}
    return _result(runner, spec, data, "; ".join(spec.options.instructions), table,
                   table_note="cosines at the last layer; per layer below", **report)


RUNNERS = {"transcription": run_transcription, "translation": run_translation,
           "classification": run_classification, "continuation": run_continuation, "behaviour": run_behaviour,
           "representation": run_representation, "voice_description": run_voice_description}


def run_tasks(runner: Runner, suite: Suite, data: dict[str, TaskData], continuation_instruction: str,
              contrast_model: str | Path | None = None) -> dict[str, dict]:
    """Every task of the suite in order, by name."""
    results = {}
    for spec in suite.tasks:
        task_data = data[spec.name]
        instruction = default_instruction(spec, task_data.labels, continuation_instruction)
        extra = {"contrast_model": contrast_model or suite.contrast_model} if spec.type == "representation" else {}
        results[spec.name] = RUNNERS[spec.type](runner, spec, task_data, instruction, **extra)
    return results
