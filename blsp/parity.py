"""Does the LLM behave on speech as it does on the transcript? The measures `blsp eval` reports first.

BLSP's promise is that the LLM, given speech, writes what it writes given the transcript. The
teacher-forced loss gap measures that only on the training behaviour, and past 100% it measures
drift (the adapter and LoRA learned the continuations' style, not to read speech as text). What a
user sees is the answers, so beside the cascade (the ASR transcript fed to the same LLM: the
baseline a user would otherwise pick) we measure, on held-out speech:

- KL(text || speech): the next-token distributions with the speech against those with the
  transcript, over the text path's own answer (teacher-forced), per instruction;
- agreement: the greedy answers with the speech against those with the transcript, under
  instructions never trained on (recipes/behaviour.yaml): BLEU for free answers, the share
  of the same label for closed ones;
- runaway answers: loops, refusals, answers past 3x the text path's length (metrics.RUNAWAY_RULE);
- transcription WER (the transcription task) against Whisper's own.

`BARS` holds what the toolkit must reach, as multiples of the cascade's (or Whisper's) numbers;
`parity_summary` gathers a suite's results into that one table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .metrics import continuation_agreement, label_agreement, runaway_rate
from .processing import Example
from .suites import BEHAVIOUR_INSTRUCTIONS, BehaviourInstruction, load_behaviour_instructions  # noqa: F401 (re-exported)

ANSWER_TOKENS = 64  # the text path's answers: the instructions ask for a sentence or a list
RUNAWAY_BUDGET = (3, 16)  # the other rows may write 3x the text answer's tokens + 16: room to show a runaway


@dataclass(frozen=True)
class Bar:
    """A row's number against the baseline's: `value <= factor x baseline` (or `>=` when `higher`)."""

    metric: str
    factor: float
    baseline: str  # the row (or "whisper": the ASR's own transcript) it is measured against
    higher: bool = False
    absolute: float | None = None  # a bar of its own (runaway rate), not a multiple

    def check(self, value: float | None, baseline: float | None) -> bool | None:
        if value is None:
            return None
        if self.absolute is not None:
            return value <= self.absolute
        if baseline is None:
            return None
        return value >= self.factor * baseline if self.higher else value <= self.factor * baseline + 1e-12


# What the speech row must reach (issue: behave like the text path on any speech).
BARS = {
    "kl": Bar("kl", 1.5, "cascade"),
    "agreement": Bar("agreement", 0.9, "cascade", higher=True),  # under every instruction
    "wer": Bar("wer", 1.5, "whisper"),
    "runaway": Bar("runaway", 0.0, "", absolute=0.01),
}


# ----------------------------------------------------------------------------------------------
# Scores of one instruction's answers
# ----------------------------------------------------------------------------------------------
def answer_budget(tokenizer, text_answers: Sequence[str]) -> int:
    """The other rows' token budget for a batch: room to run past 3x the text path's longest answer."""
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in text_answers), default=0)
    factor, extra = RUNAWAY_BUDGET
    return factor * longest + extra


def agreement_scores(answers: Sequence[str], text_answers: Sequence[str], item: BehaviourInstruction) -> dict:
    """Agreement (0-100) of a row's answers with the text path's, and its runaway answers."""
    if item.labels:
        agree = label_agreement(answers, text_answers, item.labels)
        out = {"agreement": agree["agreement"], "measure": "same label (%)", "labels": agree["labels"]}
    else:
        agree = continuation_agreement(answers, text_answers)
        out = {"agreement": agree["bleu"], "measure": "BLEU", "identical": agree["identical"],
               "bleu_signature": agree["bleu_signature"]}
    runaway = runaway_rate(answers, text_answers)
    out["runaway"] = {k: v for k, v in runaway.items() if k != "per_utterance"}
    out["runaway_per_utterance"] = runaway["per_utterance"]
    return out


@torch.no_grad()
def answer_kl(model, instruction: str, text_answers: Sequence[str], truncated: Sequence[bool],
              prompts: dict[str, Sequence], batch_size: int = 8) -> dict[str, dict]:
    """KL(p_text || p_row) over the text path's answer tokens (and its end of turn unless cut off),
    teacher-forced, for each row of `prompts` besides "text". `prompts[row][i]` is what fills the
    slot: a transcript string, or the speech features (a tensor) for row "blsp"."""
    from .scoring import target_hidden, token_scores

    proc = model.processor
    others = [r for r in prompts if r != "text"]
    sums = {r: 0.0 for r in others}
    per_utt: dict[str, list[float]] = {r: [] for r in others}
    n_tokens = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(text_answers), batch_size):
        end = start + batch_size
        targets = [proc.prompt.target_ids(a, t) for a, t in zip(text_answers[start:end], truncated[start:end])]
        hidden, lengths, tokens = {}, None, None
        for row, slots in prompts.items():
            if row == "blsp":
                exs = [Example(proc.speech_prompt(instruction), [f], t) for f, t in zip(slots[start:end], targets)]
            else:
                exs = [Example(proc.transcript_prompt(instruction, s), target=t) for s, t in zip(slots[start:end], targets)]
            # the text rows are the frozen LLM's (LoRA, if the adapter has it, is for speech)
            with model.lora_off() if row != "blsp" else contextlib.nullcontext():
                hidden[row], tgt, lens = target_hidden(model, exs)
            if tokens is None:
                tokens, lengths = tgt, lens
        scores = token_scores(model, hidden, tokens, kl_pair=("text", others[0]), extra_kl=others[1:])
        n_tokens += int(tokens.shape[0])
        for k, row in enumerate(others):
            kl = scores["kl" if k == 0 else f"kl_{row}"]
            sums[row] += float(kl.sum())
            offset = 0
            for n in lengths:
                per_utt[row].append(float(kl[offset : offset + n].mean()) if n else 0.0)
                offset += n
    model.train(was_training)
    return {row: {"kl": sums[row] / n_tokens if n_tokens else None, "sum_kl": sums[row], "n_tokens": n_tokens,
                  "per_utterance": per_utt[row]} for row in others}


# ----------------------------------------------------------------------------------------------
# The headline table
# ----------------------------------------------------------------------------------------------
def parity_summary(tasks: dict[str, dict]) -> dict | None:
    """From a suite's results (task name -> result): per row (blsp, cascade) KL(text||row) on the
    training behaviour (continuation tasks) and on the behaviour instructions' answers, agreement
    under each instruction, runaway rate, transcription WER (and Whisper's own), the loss gap as a
    secondary number (flagged as drift past 100%), and each bar met or not."""
    rows: dict[str, dict] = {"blsp": {}, "cascade": {}}
    whisper_wer = None
    for name, result in tasks.items():
        table = result.get("table", {})
        if result["type"] == "behaviour":
            for row in rows:
                if row in table:
                    rows[row]["kl_answers"] = table[row].get("kl")
                    rows[row]["runaway"] = table[row].get("runaway")
                    rows[row].setdefault("agreement", {}).update(
                        {i: result["instructions"][i]["rows"][row]["agreement"] for i in result["instructions"]})
        elif result["type"] == "continuation":
            for row in rows:
                if row in table:
                    rows[row]["kl"] = table[row].get("kl")
                    rows[row]["gap_closed"] = table[row].get("gap_closed")
        elif result["type"] == "transcription":
            for row in rows:
                if row in table:
                    rows[row]["wer"] = table[row].get("wer")
            if "asr" in table:
                whisper_wer = table["asr"].get("wer")
    if not any(v is not None for v in rows["blsp"].values()):
        return None
    blsp, cascade = rows["blsp"], rows["cascade"]
    kl_key = "kl" if blsp.get("kl") is not None else "kl_answers"
    bars = {
        "kl": _bar("kl", blsp.get(kl_key), cascade.get(kl_key)),
        "wer": _bar("wer", blsp.get("wer"), whisper_wer),
        "runaway": _bar("runaway", blsp.get("runaway"), None),
    }
    for name, value in blsp.get("agreement", {}).items():
        bars[f"agreement:{name}"] = _bar("agreement", value, cascade.get("agreement", {}).get(name))
    gap = blsp.get("gap_closed")
    return {"rows": rows, "whisper_wer": whisper_wer, "kl_measured_on": kl_key, "bars": bars,
            "drift": gap is not None and gap > 1.0,
            "note": "the loss gap is secondary: past 100% the speech predicts the training continuations better "
                    "than the transcript does (drift: the style learned, not speech read as text)"}


def _bar(metric: str, value: float | None, baseline: float | None) -> dict:
    bar = BARS[metric]
    limit = bar.absolute if bar.absolute is not None else (None if baseline is None else bar.factor * baseline)
    return {"value": value, "baseline": baseline, "limit": limit, "higher_is_better": bar.higher,
            "met": bar.check(value, baseline), "rule": _rule(bar)}


def _rule(bar: Bar) -> str:
    if bar.absolute is not None:
        return f"<= {bar.absolute:g}"
    return f"{'>=' if bar.higher else '<='} {bar.factor:g}x {bar.baseline}"


def format_parity(summary: dict) -> list[str]:
    """The headline table: one line per measure, BLSP beside the cascade, the bar and whether it is met."""
    rows = summary["rows"]
    b, c = rows["blsp"], rows["cascade"]
    lines = ["behaviour (what the LLM writes with the speech vs with the transcript; held-out speech)",
             f"  {'measure':34}{'BLSP':>10}{'cascade':>10}{'bar':>22}  met"]

    def line(label, value, base, bar, kind):
        lines.append(f"  {label:34}{_fmt(value, kind):>10}{_fmt(base, kind):>10}"
                     f"{_bar_text(bar, kind):>22}  {_met(bar['met'])}")

    bars = summary["bars"]
    kl_key = summary["kl_measured_on"]
    line("KL(text||row)" + (" on continuations" if kl_key == "kl" else " on answers"), b.get(kl_key),
         c.get(kl_key), bars["kl"], "num")
    if kl_key == "kl" and b.get("kl_answers") is not None:
        lines.append(f"  {'KL(text||row) on answers':34}{_fmt(b.get('kl_answers'), 'num'):>10}"
                     f"{_fmt(c.get('kl_answers'), 'num'):>10}")
    for name in b.get("agreement", {}):
        line(f"agreement: {name}", b["agreement"][name], c.get("agreement", {}).get(name), bars[f"agreement:{name}"],
             "score")
    line("runaway answers", b.get("runaway"), c.get("runaway"), bars["runaway"], "pct")
    line("transcription WER (vs Whisper's)", b.get("wer"), summary.get("whisper_wer"), bars["wer"], "pct")
    if b.get("gap_closed") is not None:
        flag = "  DRIFT: past 100%, not success" if summary["drift"] else ""
        lines.append(f"  {'loss gap closed (secondary)':34}{_fmt(b['gap_closed'], 'pct'):>10}"
                     f"{_fmt(c.get('gap_closed'), 'pct'):>10}{flag}")
    return lines


def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    return {"pct": f"{100 * value:.1f}%", "score": f"{value:.1f}", "num": f"{value:.3f}"}[kind]


def _bar_text(bar: dict, kind: str) -> str:
    if bar["limit"] is None:
        return bar["rule"]
    return f"{'>=' if bar['higher_is_better'] else '<='} {_fmt(bar['limit'], kind)}"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[met]
