"""Behavior data as training items: step 1's lines turned into the sequences step 2 learns from.

Each line (audio, transcript, the LLM's continuation, and step 1's answers to other instructions)
becomes a `BehaviorItem`: the speech prompt, its text twin (what the KD teacher reads: the
transcript in the speech's place), and the target tokens (the continuation, or with `--mix` the
transcript or another task's answer). Shared by step 2 on manifests (blsp.training) and on
shard streams (blsp.streaming).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .continuation import read_instruction_set
from .data import Utterance, is_copy_continuation, read_manifest
from .errors import BlspError, InputError
from .options import TrainOptions, choose_task, mix_shares
from .prompts import task_instruction
from .voice import heard_with_voice, plain_answer, voice_attributes, voice_questions


@dataclass
class BehaviorItem:
    """One training sequence: the speech prompt, its text twin (the KD teacher), the target."""

    utterance: Utterance
    prompt: list
    teacher_prompt: list
    target: list[int]
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None  # step 1's saved (ids, log-probs) [n, K]
    # The target is the one right answer (a transcript, a fact about the voice), not the LLM's
    # behaviour: trained by cross-entropy whatever `--loss` says. Distilled, it would teach the text path's answer to
    # "transcribe" over a transcript it can read (a preamble, a reply), not the words.
    exact: bool = False
    about_voice: bool = False  # a question about the voice: the voice gate's positive (blsp.voice_gate)





def read_behavior_data(paths: Sequence[str | Path], skip_bad: bool = False) -> tuple[list[Utterance], list[InputError]]:
    """Behavior data lines: manifest lines that also carry a non-empty `continuation`."""
    utterances, skipped, empty = [], [], 0
    for path in paths:
        result = read_manifest(path, skip_bad=skip_bad)
        skipped += result.skipped
        for utt in result.utterances:
            cont = utt.extra.get("continuation")
            if isinstance(cont, str) and cont.strip():
                utterances.append(utt)
                continue
            if isinstance(cont, str):  # the LLM ended its turn at once: nothing to learn from
                empty += 1
                continue
            err = InputError("no `continuation` (is this step 1's output? run `blsp continue` first)", utt.source, utt.line)
            if not skip_bad:
                raise err
            skipped.append(err)
    if empty:
        print(f"step 2: left out {empty} line(s) whose continuation is empty", file=sys.stderr)
    if not utterances:
        raise BlspError(f"no usable training lines in {', '.join(map(str, paths))}")
    return utterances, skipped


def speech_prompts(proc, options: TrainOptions) -> dict[str, list]:
    """The speech prompt of each instruction step 2 trains under, built once (others on first use)."""
    return {i: proc.speech_prompt(i) for i in (options.model.instruction, task_instruction("transcribe"))}


def step1_answer(utt: Utterance, task: str) -> dict | None:
    """The line's step-1 answer {instruction, text, truncated} to a task of the instruction set, if any."""
    responses = utt.extra.get("responses")
    response = responses.get(task) if isinstance(responses, dict) else None
    if isinstance(response, dict) and isinstance(response.get("text"), str) \
            and isinstance(response.get("instruction"), str):
        return response
    return None


VOICE_MIX = "voice"  # `--mix voice=SHARE`: one of the line's answers about its voice, drawn per line
# `--mix other=SHARE`: the continuation's tokens under an instruction of --other-instructions, distilled
# from the frozen LLM reading the transcript under it. Off the teacher's own answer, but what it
# constrains is the speech path's next-token distributions under many instructions, which is what
# the behaviour measures ask of it on instructions step 2 never saw; no generation needed.
OTHER_MIX = "other"


def other_instructions(options: TrainOptions) -> list[str]:
    """The instructions of `--other-instructions` (step 1's instruction-set format, checked with
    the file and line named)."""
    return [instruction for _, instruction in read_instruction_set(options.objective.other_instructions)]


def voice_tasks(utt: Utterance) -> list[str]:
    """The questions about its voice a line has an answer to, by task name: step 1's
    (`blsp continue --voice-questions`), and one per attribute the line states (voice_answer)."""
    responses = utt.extra.get("responses")
    asked = {t for t in responses if t.startswith("voice_") and step1_answer(utt, t)} \
        if isinstance(responses, dict) else set()
    return sorted(asked | set(voice_questions(voice_attributes(utt.extra))))


def voice_answer(utt: Utterance, task: str) -> dict | None:
    """The line's answer to a question about its voice: step 1's where it asked it (the LLM's own
    answer where right, else the plain fact), else the plain fact itself from the attributes the
    line states, as step 1 would have written it without the LLM; read beside the description."""
    response = step1_answer(utt, task)
    attributes = voice_attributes(utt.extra)
    if response is not None and response.get("written_by") == "plain" and attributes:
        # a plain fact is derived, not written: as the code phrases it now (PLAIN_ANSWERS)
        return {**response, "text": plain_answer(task, attributes), "truncated": False}
    if response is not None:
        return response
    question = voice_questions(attributes).get(task)
    if question is None:
        return None
    transcript = utt.extra.get("prompt_transcript") or utt.text
    return {"instruction": question, "text": plain_answer(task, attributes), "truncated": False,
            "written_by": "plain", "heard": heard_with_voice(transcript, attributes)}


def voice_task_weights(utterances: Sequence[Utterance]) -> Callable[[Utterance, str], float]:
    """How often a line drawn for `--mix voice` is asked each of its questions: in inverse
    proportion to how common its class is among the lines (a whisperer is asked whether it
    whispers about as often as all the others together), so that no answer is learnt as the
    usual one (1 in 12 clips whispers: drawn uniformly, "No" was the model's answer to every clip);
    the description at the mean of the line's weights."""
    counts: dict[str, dict[str, int]] = {}
    for u in utterances:
        for name, value in voice_attributes(u.extra).items():
            counts.setdefault(name, {}).setdefault(value, 0)
            counts[name][value] += 1
    totals = {name: sum(c.values()) for name, c in counts.items()}

    def weight(utt: Utterance, task: str) -> float:
        attributes = voice_attributes(utt.extra)
        inverse = {n: totals[n] / counts[n][v] for n, v in attributes.items() if n in counts}
        name = task.removeprefix("voice_")
        if name in inverse:
            return inverse[name]
        return sum(inverse.values()) / len(inverse) if inverse else 1.0

    return weight


def draw_voice_task(rng: random.Random, utt: Utterance,
                    weight: Callable[[Utterance, str], float] | None = None) -> str | None:
    """The question about its voice a line drawn for `--mix voice` trains on, by `weight`
    (voice_task_weights; None: uniformly); None for a line with none (it continues)."""
    asked = voice_tasks(utt)
    if not asked:
        return None
    if weight is None:
        return asked[rng.randrange(len(asked))]
    return rng.choices(asked, weights=[weight(utt, t) for t in asked])[0]


def task_response(utt: Utterance, task: str) -> dict:
    """A mixed-in task's answer {instruction, text, truncated, ...}: the transcript, an answer about
    the voice (voice_answer: with what the LLM read, `heard`), or step 1's answer."""
    if task == "transcribe":
        return {"instruction": task_instruction("transcribe"), "text": utt.text, "truncated": False}
    response = voice_answer(utt, task) if task.startswith("voice_") else step1_answer(utt, task)
    if response is None:
        raise InputError(f"--mix {task}=...: this line has no step-1 answer for task {task!r} (run `blsp continue "
                         f"--instruction-set FILE` with a task of that name)", utt.source, utt.line)
    return response


def task_target(utt: Utterance, task: str) -> tuple[str, str, bool]:
    """(instruction, target text, truncated) of a mixed-in task: the transcript, or step 1's answer."""
    response = task_response(utt, task)
    return response["instruction"], response["text"], bool(response.get("truncated"))


def check_behavior_data(utterances: Sequence[Utterance], options: TrainOptions) -> None:
    """What the lines alone can show to be wrong, checked before minutes go into loading the
    models and encoding every clip: a `--mix` task some line has no answer to (any line may be
    drawn for it), and saved top-k of differing K (the KL loss stacks them)."""
    for task in mix_shares(options):
        if task == OTHER_MIX:
            if not options.objective.other_instructions:
                raise BlspError(f"--mix {OTHER_MIX}=...: name the instructions with --other-instructions FILE "
                                "(e.g. recipes/instructions-distil.yaml)")
            other_instructions(options)
        elif task == VOICE_MIX:
            if not any(voice_tasks(u) for u in utterances):
                raise BlspError(f"--mix {VOICE_MIX}=...: no line of {', '.join(sorted({u.source for u in utterances}))} "
                                "states its voice or has step-1 answers about it (a manifest whose lines state "
                                "their voice: `blsp data synth` with voice_attributes; `blsp continue "
                                "--voice-questions` adds the LLM's own answers)")
        elif task != "transcribe":
            check_mixed_task(utterances, task)
    if "kl" in options.objective.loss:
        check_topk_width(utterances)


def check_mixed_task(utterances: Sequence[Utterance], task: str) -> None:
    missing = [u for u in utterances if step1_answer(u, task) is None]
    if len(missing) == len(utterances):  # most likely a misspelt task: say which there are
        known = sorted({t for u in utterances if isinstance(u.extra.get("responses"), dict)
                        for t in u.extra["responses"]})
        files = ", ".join(sorted({u.source for u in utterances}))
        raise BlspError(f"--mix {task}=...: no line of {files} has a step-1 answer for task {task!r} "
                        f"({'its tasks: ' + ', '.join(known) if known else 'step 1 ran without --instruction-set'})")
    if missing:
        task_target(missing[0], task)  # raises, naming the line


def topk_width(saved) -> int | None:
    """K of a line's saved top-k (its rows' width); None where there is none to read (a
    malformed one is reported by `saved_topk`)."""
    ids = saved.get("ids") if isinstance(saved, dict) else None
    return len(ids[0]) if isinstance(ids, list) and ids and isinstance(ids[0], list) else None


def check_topk_width(utterances: Sequence[Utterance]) -> None:
    first: tuple[int, Utterance] | None = None
    for utt in utterances:
        k = topk_width(utt.extra.get("teacher_topk"))
        if k is None:
            continue
        if first is None:
            first = (k, utt)
        elif k != first[0]:
            raise InputError(f"teacher_topk: K {k} here, but K {first[0]} at {first[1].source}:{first[1].line} "
                             "(lines of two step-1 runs?): distil from one --save-topk K, or train with --loss ce",
                             utt.source, utt.line)


def behavior_item(proc, utt: Utterance, options: TrainOptions, task: str | None,
                  prompts: dict[str, list], llm_fingerprint: str | None = None,
                  instruction: str | None = None) -> BehaviorItem:
    """One training sequence: the utterance's continuation under the continuation instruction (or
    under `instruction`, distilled: `--mix other`), or with a mixed-in `task` that task's target
    under its instruction (`transcribe`: the transcript); the teacher reads the transcript under
    the same instruction. `llm_fingerprint`: the model's LLM, which a saved top-k must come from
    (None: not checked)."""
    transcript = utt.extra.get("prompt_transcript") or utt.text
    other = task is None and instruction is not None
    if task is None:
        instruction = instruction or options.model.instruction
        text, truncated = utt.extra["continuation"], bool(utt.extra.get("truncated"))
    else:
        response = task_response(utt, task)
        instruction, text, truncated = response["instruction"], response["text"], bool(response.get("truncated"))
        # an answer about the voice was written reading its description beside the transcript
        if task.startswith("voice_"):
            transcript = response.get("heard") or transcript
    target = proc.prompt.target_ids(text, truncated)
    if task is None:
        target = target[: options.objective.max_target_tokens]
    if instruction not in prompts:
        prompts[instruction] = proc.speech_prompt(instruction)
    teacher_prompt = proc.transcript_prompt(instruction, transcript)
    # step 1's top-k is the teacher's under the continuation instruction only
    saved = utt.extra.get("teacher_topk") if task is None and not other and "kl" in options.objective.loss else None
    topk = saved_topk(utt, saved, teacher_prompt, target, llm_fingerprint) if saved is not None else None
    # a transcript, or a fact about the voice, is the one right answer: learnt by cross-entropy
    exact = task == "transcribe" or (task or "").startswith("voice_")
    return BehaviorItem(utt, prompts[instruction], teacher_prompt, target, topk, exact=exact,
                        about_voice=(task or "").startswith("voice_"))


def saved_topk(utt: Utterance, saved, teacher_prompt: list, target: list[int],
               llm_fingerprint: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1's saved teacher (`--save-topk`) as (ids, log-probs) [n, K] for the target's tokens,
    checked to be the teacher step 2 would run: the same LLM weights (`llm_fingerprint`, the
    model's), the same prompt and the same target tokens."""
    from .continuation import prompt_digest
    from .prompts import pieces_to_ids

    def bad(why: str) -> InputError:
        return InputError(f"teacher_topk: {why}", utt.source, utt.line)

    if not isinstance(saved, dict) or not all(k in saved for k in ("prompt", "target_ids", "ids", "logprobs")):
        raise bad("expected {prompt, target_ids, ids, logprobs} as written by `blsp continue --save-topk K`")
    if llm_fingerprint is not None and saved.get("llm") != llm_fingerprint:
        # Another LLM (a fine-tune, say) can share the tokenizer and template, so the prompt's
        # digest alone cannot tell; its top-k would teach another model's answers.
        raise bad(f"saved by LLM {saved.get('llm') or '(not recorded: an older `blsp continue`)'}, but the "
                  f"model's is {llm_fingerprint}: run step 1 with step 2's --llm, or train with --loss ce")
    if saved["prompt"] != prompt_digest(pieces_to_ids(teacher_prompt)):
        raise bad("saved for another prompt than step 2's teacher reads (another system prompt, instruction or "
                  "LLM?): run step 1 with step 2's settings, or train with --loss ce")
    n = len(target)
    if list(saved["target_ids"][:n]) != list(target) or len(saved["ids"]) < n:
        raise bad("saved for other continuation tokens than step 2 trains on (another tokenizer?)")
    try:
        ids = torch.tensor(saved["ids"][:n], dtype=torch.long)
        logprobs = torch.tensor(saved["logprobs"][:n], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise bad(f"ids and logprobs must be equal-length lists of numbers per token ({err})") from None
    if ids.shape != logprobs.shape or ids.dim() != 2:
        raise bad(f"ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must both be [tokens, K]")
    return ids, logprobs


def build_items(proc, utterances: list[Utterance], options: TrainOptions,
                llm_fingerprint: str | None = None) -> list[BehaviorItem]:
    """Training sequences: continuation targets, and with `--mix` seeded shares of the utterances
    trained instead on another task: `transcribe` (the paper's variant; it keeps the exact words in
    view) or an instruction of step 1's instruction set (summarise, answer, ...)."""
    rng = random.Random(options.optim.seed)
    prompts = speech_prompts(proc, options)
    shares = mix_shares(options)
    if options.objective.drop_copies:
        kept = [u for u in utterances if not is_copy_continuation(u)]
        print(f"step 2: left out {len(utterances) - len(kept)} of {len(utterances)} continuations that repeat "
              "the transcript (--drop-copies)", file=sys.stderr)
        utterances = kept
    items = []
    weight = voice_task_weights(utterances) if VOICE_MIX in shares else None
    others = other_instructions(options) if OTHER_MIX in shares else []
    for u in utterances:
        task, instruction = choose_task(rng.random(), shares), None
        if task == VOICE_MIX:  # one of its questions about the voice; a line with none continues
            task = draw_voice_task(rng, u, weight)
        elif task == OTHER_MIX:  # its continuation, distilled under another instruction
            task, instruction = None, rng.choice(others)
        items.append(behavior_item(proc, u, options, task, prompts, llm_fingerprint, instruction))
    return items


