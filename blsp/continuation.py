"""Step 1: the frozen LLM continues each transcript; its words become step 2's targets.

Output (behavior data) is the manifest line plus `continuation`, `truncated` (generation hit the
token limit, so no end-of-turn token may be appended to the target), the transcript as fed to the
LLM, and a `fingerprint` of everything that shaped the continuation: a changed LLM, prompt or
decoding setting never silently reuses stale data. With an instruction set (`--instruction-set`:
summarise, answer, translate...) each line also holds `responses`: {task: {instruction, text,
truncated}}, the LLM's answer to each instruction about the transcript, for step 2's `--mix`.
With `--save-topk K`, `teacher_topk` holds the LLM's top-K next-token log-probabilities at each
token of the continuation as step 2 tokenises it (the KD teacher, so step 2 skips its forward),
with the LLM's weights fingerprint (step 2 checks it is its own LLM).

Crash safety: lines are appended and fsynced one batch at a time; a re-run skips ids already
written. Under torchrun each rank writes its own part file, merged by rank 0 at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml
from tqdm import tqdm

from .data import Utterance, check_output_apart, normalize_transcript, utterance_language, read_jsonl, read_manifest
from .distributed import barrier, default_device, init_distributed
from .errors import BlspError, InputError
from .io import append_jsonl, repair_jsonl_tail
from .fingerprint import weights_fingerprint
from .llm import cache_argument, cache_of, load_language_model
from .prompts import CONTINUATION_INSTRUCTION, ChatPrompt, pieces_to_ids, transcript_message
from .metrics import answer_is_right
from .voice import describe_voice, heard_with_voice, plain_answer, voice_attributes, voice_questions


@dataclass(frozen=True)
class ContinueOptions:
    llm: str = "smollm2-135m-instruct"
    instruction: str = CONTINUATION_INSTRUCTION
    system_prompt: str | None = None  # None: the chat template's default
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 192  # the original dropped longer prompts
    # Transcripts as written, not through Whisper's English normaliser as the paper's code did: the
    # speech path reads Whisper's words as Whisper writes them (cased, punctuated: the token
    # bridge), and the LLM answers "if you ever want ... my boy you're" otherwise than "If you
    # ever want ..., my boy, you're": fed normalised text, the text path's answers were ones the
    # speech path could not reach even given Whisper's exact tokens (docs/behaviour_ablation.md).
    normalize: bool = False
    batch_size: int = 16
    seed: int = 0
    instruction_set: tuple[tuple[str, str], ...] = ()  # (task name, instruction): more answers per transcript
    backend: str = "auto"  # hf (transformers), vllm, or auto: vLLM when installed with a CUDA GPU
    save_topk: int = 0  # K > 0: also save the LLM's top-K log-probs at each continuation token (step 2's KD teacher)
    # Lines that state their voice (blsp.voice: gender, rate, pitch, whispered, noisy) are also asked
    # about the voice, the LLM reading the voice's description beside the transcript: answers only an
    # adapter that carries the voice can match (DeSTA2.5's self-generated targets; issue 27).
    # How many of them each line is asked (drawn per transcript and voice, seeded): a line trains on
    # one answer at most (`blsp train --mix voice=SHARE`), and each costs a generation. 0: none.
    voice_questions: int = 0

    def __post_init__(self) -> None:
        if self.voice_questions < 0:
            raise BlspError(f"--voice-questions {self.voice_questions}: 0 (none) or how many to ask each line")
        if self.save_topk < 0:
            raise BlspError(f"--save-topk {self.save_topk}: 0 (off) or a number of tokens per position")

    def decoding(self) -> dict:
        """The settings that change the output (batch size does not under greedy decoding)."""
        keys = ["instruction", "system_prompt", "max_new_tokens", "do_sample", "max_prompt_tokens", "normalize"]
        if self.instruction_set:
            keys.append("instruction_set")
        if self.voice_questions:
            keys.append("voice_questions")
        if self.save_topk:
            keys.append("save_topk")
        if self.do_sample:
            keys += ["temperature", "top_p", "seed"]
        return {k: getattr(self, k) for k in keys}


# Names step 2 gives a meaning of its own (`--mix transcribe=...`; `continuation` is the main target).
RESERVED_TASKS = ("transcribe", "continuation", "voice")
VOICE_TASK_PREFIX = "voice_"  # step 1's answers about the voice (blsp.voice.voice_questions)
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def read_instruction_set(path: str | Path) -> tuple[tuple[str, str], ...]:
    """A YAML mapping of task names to instructions, checked with the file and line named."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"cannot read the instruction set: {err.strerror}", str(path)) from None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        raise InputError(f"not valid YAML: {getattr(err, 'problem', err)}", str(path),
                         None if line is None else line + 1) from None
    if not isinstance(node, yaml.MappingNode) or not node.value:
        raise InputError("an instruction set is a mapping of task names to instructions, e.g. "
                         "`summarize: Summarize the following text in one sentence.`", str(path), 1)
    tasks = []
    for key, value in node.value:
        line = key.start_mark.line + 1
        name = key.value
        if not isinstance(key, yaml.ScalarNode) or not TASK_NAME.fullmatch(str(name)):
            raise InputError(f"task name {name!r}: use letters, digits, - and _", str(path), line)
        if name in RESERVED_TASKS or name.startswith(VOICE_TASK_PREFIX):
            raise InputError(f"task name {name!r} is reserved (transcribe, continuation, voice, voice_*); choose "
                             "another", str(path), line)
        if name in dict(tasks):
            raise InputError(f"task {name!r} appears twice", str(path), line)
        if not isinstance(value, yaml.ScalarNode) or not str(value.value).strip():
            raise InputError(f"task {name!r}: the instruction must be non-empty text", str(path), line)
        tasks.append((name, str(value.value).strip()))
    return tuple(tasks)


BACKENDS = ("auto", "hf", "vllm")


def choose_backend(requested: str, distributed: bool = False, save_topk: int = 0) -> str:
    """The generation backend step 1 runs on: vLLM (continuous batching, paged attention) when
    asked for or, with `auto`, when installed beside a CUDA GPU in a single process and no top-k
    is to be saved (the teacher's forward runs on transformers); else transformers."""
    if requested not in BACKENDS:
        raise BlspError(f"unknown --backend {requested!r}; choose from {', '.join(BACKENDS)}")
    installed = importlib.util.find_spec("vllm") is not None
    if requested == "vllm":
        if save_topk:
            raise BlspError("--save-topk runs the LLM as the KD teacher over each continuation: use --backend hf")
        if not installed:
            raise BlspError("--backend vllm: vLLM is not installed (`pip install vllm`, on a machine with a CUDA "
                            "GPU); --backend hf runs step 1 with transformers")
        if not torch.cuda.is_available():
            raise BlspError("--backend vllm needs a CUDA GPU; --backend hf runs step 1 with transformers")
        if distributed:
            raise BlspError("--backend vllm runs in one process (vLLM spreads a model over GPUs itself): "
                            "launch without torchrun")
    if requested == "auto":
        return "vllm" if installed and torch.cuda.is_available() and not distributed and not save_topk else "hf"
    return requested


def settings_fingerprint(options: ContinueOptions, llm_fingerprint: str, backend: str = "hf") -> str:
    # vLLM's kernels may pick another token where two are nearly tied: its outputs are their own.
    extra = {"backend": backend} if backend != "hf" else {}
    blob = json.dumps({"llm": llm_fingerprint, **options.decoding(), **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Job:
    """One generation: a transcript, its prompt, and every utterance that says it."""

    transcript: str
    prompt_ids: list[int]
    utterances: list[Utterance]
    voice: dict[str, str] | None = None  # the voice's attributes, when step 1 asks about them

    @property
    def key(self) -> str:
        """What makes two utterances one job under greedy decoding: the transcript, and the
        description of the voice where step 1 asks about it."""
        return job_key(self.transcript, self.voice)


def job_key(transcript: str, voice: dict | None) -> str:
    return transcript if not voice else f"{transcript}\x00{describe_voice(voice)}"


@dataclass
class ContinueSummary:
    written: int
    already_done: int
    dropped_long: list[str]
    skipped_bad: list[str]
    output: str
    fingerprint: str


def part_path(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}-of-{world}")


def rank_parts(output: Path) -> list[Path]:
    """The part files a killed torchrun run left beside the output, in the order they are merged."""
    return sorted(output.parent.glob(f"{output.name}.rank*-of-*"))


def existing_records(output: Path, fingerprint: str) -> dict[str, dict]:
    """Records already in the output and in any rank parts (what they hold once merged: the first
    line of an id wins), each checked against this run's settings. Read-only, every rank calls it,
    and before anything is merged or repaired: a refused run leaves every file as it was."""
    done: dict[str, dict] = {}
    for path in [output, *rank_parts(output)]:
        if not path.exists():
            continue
        for line_no, rec in read_jsonl(path, partial_tail=True):
            if rec.get("fingerprint") != fingerprint:
                raise BlspError(
                    f"{path}:{line_no}: this output was written with other step-1 settings "
                    f"(fingerprint {rec.get('fingerprint')}, now {fingerprint}); "
                    "write to another --output, or delete it to start over"
                )
            done.setdefault(str(rec["id"]), rec)
    return done


# What one transcript's generations give: (continuation, truncated), per task of the instruction
# set (answer, truncated), and the teacher's top-k (or None).
Answers = tuple[tuple[str, bool], dict[str, tuple[str, bool]], dict | None]


# What step 1 writes into a line. An input manifest may itself be an older behaviour file: its
# values of these are never carried over (a `responses` or `teacher_topk` this run does not write
# would otherwise pass as this run's).
STEP1_FIELDS = ("prompt_transcript", "continuation", "truncated", "fingerprint", "responses", "teacher_topk",
                "voice_description")


def output_record(utt: Utterance, output_dir: Path, transcript: str, answers: Answers, fingerprint: str,
                  instructions: dict[str, str], voice: dict[str, str] | None = None) -> dict:
    (continuation, truncated), responses, topk = answers
    record = {
        **{k: v for k, v in utt.extra.items() if k not in STEP1_FIELDS},
        "id": utt.id,
        "audio": utt.audio.relative_to(output_dir),
        "text": utt.text,
        "prompt_transcript": transcript,
        "continuation": continuation,
        "truncated": truncated,
        "fingerprint": fingerprint,
    }
    if voice:
        # what the LLM read beside the transcript when it answered the voice questions
        record["voice_description"] = describe_voice(voice)
    if responses:
        record["responses"] = {task: {"instruction": instructions[task], "text": text, "truncated": cut}
                               for task, (text, cut) in responses.items() if not task.startswith(VOICE_TASK_PREFIX)}
        record["responses"].update({task: voice_response(task, answer, transcript, voice)
                                    for task, answer in responses.items() if task.startswith(VOICE_TASK_PREFIX)})
    if topk is not None:
        record["teacher_topk"] = topk
    return record


def voice_response(task: str, answer: tuple[str, bool], transcript: str, voice: dict[str, str]) -> dict:
    """A line's answer about its voice: what the LLM wrote reading the voice's description (`heard`)
    where that is right, else the plain answer, the LLM's kept as `llm_answer` (blsp.voice)."""
    text, cut = answer
    out = {"instruction": voice_questions(voice)[task], "text": text, "truncated": cut, "written_by": "llm",
           "heard": heard_with_voice(transcript, voice)}
    if cut or not answer_is_right(task, text, voice):
        out.update(text=plain_answer(task, voice), truncated=False, written_by="plain", llm_answer=[text, cut])
    return out


def record_answers(record: dict) -> Answers:
    """The generations a written record holds (for reuse by other voices of its transcript)."""
    responses = {task: tuple(r["llm_answer"]) if "llm_answer" in r else (r["text"], r["truncated"])
                 for task, r in record.get("responses", {}).items()}
    return (record["continuation"], record["truncated"]), responses, record.get("teacher_topk")


def prompt_digest(prompt_ids: Sequence[int]) -> str:
    """Names the exact prompt a saved teacher read (step 2 checks its own teacher prompt against it)."""
    return hashlib.sha256(json.dumps(list(prompt_ids)).encode()).hexdigest()[:16]


class Continuer:
    """Greedy (or sampled) batched continuation with a frozen LLM."""

    def __init__(self, model, tokenizer, options: ContinueOptions, llm_fingerprint: str | None = None):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.llm_fingerprint = llm_fingerprint  # recorded with a saved top-k: step 2 checks its LLM is this one
        self.prompt = ChatPrompt(tokenizer, options.system_prompt)
        self.stop_ids = self.prompt.stop_ids
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = options.batch_size  # prompts per generation call

    def prompt_ids(self, transcript: str, instruction: str | None = None) -> list[int]:
        message = transcript_message(instruction or self.options.instruction, transcript)
        return pieces_to_ids(self.prompt.render(message))

    def answer_jobs(self, jobs: Sequence["Job"]) -> list[Answers]:
        """Each job's continuation, its answer to every instruction of the set (one batch each),
        and with `save_topk` the teacher's top-k over the continuation."""
        keys = [job.utterances[0].id for job in jobs]  # sampled: one utterance per job
        main = self.continue_batch([job.prompt_ids for job in jobs], keys)
        per_task = {task: self.continue_batch([self.prompt_ids(job.transcript, instruction) for job in jobs],
                                              [f"{key}/{task}" for key in keys])
                    for task, instruction in self.options.instruction_set}
        per_job_voice = self.voice_answers(jobs, keys)
        topk: list[dict | None] = [None] * len(jobs)
        if self.options.save_topk:
            targets = [self.prompt.target_ids(text, truncated) for text, truncated in main]
            topk = self.teacher_topk([job.prompt_ids for job in jobs], targets, self.options.save_topk)
        return [(main[i], {**{task: answers[i] for task, answers in per_task.items()}, **per_job_voice[i]}, topk[i])
                for i in range(len(jobs))]

    def asked(self, job: "Job") -> dict[str, str]:
        """The questions about its voice a job is asked: `voice_questions` of them, drawn seeded."""
        return asked_questions(job.transcript, job.voice, self.options.voice_questions, self.options.seed)

    def voice_answers(self, jobs: Sequence["Job"], keys: Sequence[str]) -> list[dict[str, tuple[str, bool]]]:
        """Each job's answers to the questions about its voice (none where it states no voice), the
        LLM reading the voice's description and the transcript. All in one batch: decoding is bound
        by its steps, not its rows, and a batch per question cost 5x the whole of step 1."""
        out: list[dict[str, tuple[str, bool]]] = [{} for _ in jobs]
        asked = [(i, task, question) for i, job in enumerate(jobs) if job.voice
                 for task, question in self.asked(job).items()]
        if not asked:
            return out
        prompts = [self.prompt_ids(heard_with_voice(jobs[i].transcript, jobs[i].voice), q)
                   for i, _, q in asked]
        for (i, task, _), answer in zip(asked, self.continue_batch(prompts, [f"{keys[i]}/{task}" for i, task, _ in asked])):
            out[i][task] = answer
        return out

    @torch.no_grad()
    def teacher_topk(self, prompts: Sequence[list[int]], targets: Sequence[list[int]], k: int,
                     rows_at_once: int = 4) -> list[dict]:
        """The LLM's top-k next-token log-probabilities at each target token, reading prompt +
        target: what step 2's KD teacher computes, saved so it need not. A few rows at a time, so
        the [rows, length, vocabulary] logits stay small."""
        out = []
        for start in range(0, len(prompts), rows_at_once):
            chunk = list(zip(prompts[start : start + rows_at_once], targets[start : start + rows_at_once]))
            width = max(len(p) + len(t) for p, t in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (p, t) in enumerate(chunk):  # right padding: positions count from 0 in every row
                ids[row, : len(p) + len(t)] = torch.tensor(p + t)
                mask[row, : len(p) + len(t)] = 1
            logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits
            for row, (p, t) in enumerate(chunk):
                scored = torch.log_softmax(logits[row, len(p) - 1 : len(p) + len(t) - 1].float(), dim=-1)
                values, indices = scored.topk(min(k, scored.shape[-1]), dim=-1)
                out.append({"k": k, "llm": self.llm_fingerprint, "prompt": prompt_digest(p), "target_ids": list(t),
                            "ids": indices.tolist(),
                            "logprobs": [[round(v, 4) for v in row_values] for row_values in values.tolist()]})
        return out

    @torch.no_grad()
    def continue_batch(self, prompts: Sequence[list[int]], keys: Sequence[str] | None = None) -> list[tuple[str, bool]]:
        """(continuation, truncated) per prompt; left padding so every row ends at the same place.
        `keys` name the prompts' requests (vLLM seeds each sampled one by its key); here sampling
        draws from torch's stream, seeded once per run."""
        o = self.options
        device = self.model.device
        # Greedy: the tokens every prompt opens with (system prompt, instruction: ~35 of SmolLM2's
        # ~57) are run once and shared; each row is [prefix][left padding][its own tokens].
        n = 0 if o.do_sample else common_prefix_length(prompts)
        width = max(map(len, prompts)) - n
        ids = torch.full((len(prompts), n + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            start = n + width - (len(p) - n)  # where the row's own tokens begin
            ids[row, :n], ids[row, start:] = torch.tensor(p[:n]), torch.tensor(p[n:])
            mask[row, :n] = mask[row, start:] = 1
        if o.do_sample:
            sampling = {"temperature": o.temperature, "top_p": o.top_p}
            rows = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=o.max_new_tokens,
                do_sample=True, eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **sampling,
            )[:, width:].tolist()
        else:
            rows = greedy_generate(self.model, ids.to(device), mask.to(device), o.max_new_tokens, self.stop_ids,
                                   shared_prefix=n)
        results = []
        for row in rows:
            stops = [i for i, t in enumerate(row) if t in self.stop_ids]
            tokens = row[: stops[0]] if stops else row
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append((text, not stops))
        return results


class VllmContinuer(Continuer):
    """Step 1 on vLLM: the same prompts (token ids) and stop tokens, many batches' worth per call
    so its scheduler keeps the GPU full (continuous batching, prefix caching of the instruction)."""

    CALL_SIZE = 1024  # prompts per call: also how often finished lines are written (resume)

    def __init__(self, path: str, tokenizer, options: ContinueOptions):
        from vllm import LLM

        super().__init__(None, tokenizer, options)
        self.batch_size = max(options.batch_size, self.CALL_SIZE)
        self.engine = LLM(model=path, tokenizer=path, seed=options.seed, enable_prefix_caching=True)

    def continue_batch(self, prompts: Sequence[list[int]], keys: Sequence[str] | None = None) -> list[tuple[str, bool]]:
        from vllm import SamplingParams

        o = self.options
        common = dict(max_tokens=o.max_new_tokens, stop_token_ids=list(self.stop_ids), skip_special_tokens=True)
        if not o.do_sample:
            params = SamplingParams(temperature=0.0, top_p=1.0, seed=None, **common)
        else:
            # One seed per request, from the run's seed and the utterance: one seed for all would
            # give the same transcript spoken in several voices the same sample every time.
            keys = keys if keys is not None else [str(i) for i in range(len(prompts))]
            params = [SamplingParams(temperature=o.temperature, top_p=o.top_p, seed=request_seed(o.seed, key), **common)
                      for key in keys]
        outputs = self.engine.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        # finish_reason "length": the token limit ended it, no stop token (what `truncated` records)
        return [(out.outputs[0].text.strip(), out.outputs[0].finish_reason == "length") for out in outputs]


def request_seed(seed: int, key: str) -> int:
    """A sampled request's seed: a function of the run's seed and the request's key alone, so a
    re-run (or a resumed one) draws the same sample for the same utterance."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "little")


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many tokens all prompts open with, leaving each at least one of its own (the last
    prompt token's logits start the generation)."""
    n = min(map(len, prompts)) - 1
    first = prompts[0]
    for i in range(max(0, n)):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(0, n)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: Sequence[int], shared_prefix: int = 0, inputs_embeds: torch.Tensor | None = None,
                    prompt_scope: contextlib.AbstractContextManager | None = None,
                    step_scope: Callable[[list[int]], contextlib.AbstractContextManager] | None = None
                    ) -> list[list[int]]:
    """Greedy decoding that drops each row from the batch (and its KV cache) once it has stopped.

    `generate` keeps computing finished rows until the longest one ends; SmolLM2's continuations
    average ~20 tokens under a 48-token limit, so most of a batch's decoding steps went to rows
    that were already done. Returns each row's new tokens, its stop token included when it
    stopped. Same tokens as `generate(do_sample=False)` (tested).

    `shared_prefix`: the first n tokens are the same in every row (padding comes after them);
    their keys and values are computed once, for one row, and shared by the batch.
    `inputs_embeds`: the prompt as vectors (speech in it; `input_ids` then only sizes the batch),
    read inside `prompt_scope` (e.g. `BlspModel.reading`: which prompt positions are speech);
    each later step inside `step_scope(rows)`, `rows` the prompt rows still generating (e.g.
    `BlspModel.answering`: LoRA that acts on a whole speech request).
    """
    if inputs_embeds is not None and shared_prefix:
        raise ValueError("greedy_generate: a shared prefix is for token prompts, not inputs_embeds")
    stops = set(stop_ids)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    n, cache = shared_prefix, None
    if n:
        from transformers import DynamicCache

        first = cache_of(model(input_ids=input_ids[:1, :n], use_cache=True))
        rows = input_ids.shape[0]
        # expand() is a view; the cache's first update concatenates, so rows never share storage.
        cache = DynamicCache(ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                                             for layer in first.layers], config=model.config)
    prompt = {"input_ids": input_ids[:, n:]} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    with prompt_scope or contextlib.nullcontext():
        out = model(**prompt, attention_mask=attention_mask, position_ids=positions[:, n:],
                    use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
    cache, next_tokens = cache_of(out), out.logits[:, -1].argmax(-1)
    alive = list(range(input_ids.shape[0]))  # batch row -> original row
    last_position = positions[:, -1]
    results: list[list[int]] = [[] for _ in alive]
    for step in range(max_new_tokens):
        tokens = next_tokens.tolist()
        for row, token in zip(alive, tokens):
            results[row].append(token)
        if step == max_new_tokens - 1:
            break
        keep = [i for i, token in enumerate(tokens) if token not in stops]
        if not keep:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            alive = [alive[i] for i in keep]
            next_tokens, attention_mask, last_position = next_tokens[index], attention_mask[index], last_position[index]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], dim=1)
        last_position = last_position + 1
        with step_scope(alive) if step_scope is not None else contextlib.nullcontext():
            out = model(input_ids=next_tokens[:, None], attention_mask=attention_mask,
                        position_ids=last_position[:, None], use_cache=True, **cache_argument(model, cache))
        cache, next_tokens = cache_of(out), out.logits[:, -1].argmax(-1)
    return results


def run_continue(manifest: str | Path, output: str | Path, options: ContinueOptions,
                 skip_bad: bool = False, model_and_tokenizer: tuple[Any, Any] | None = None,
                 limit: int | None = None, skip: int = 0) -> ContinueSummary:
    """Step 1 over a manifest (`limit` utterances if given, after its first `skip`), resumable and
    sharded across torchrun ranks."""
    if limit is not None and limit < 1:
        raise BlspError(f"--limit {limit}: give a number of utterances, at least 1")
    if skip < 0:
        raise BlspError(f"--skip {skip}: give a number of utterances, 0 or more")
    info = init_distributed()
    output = Path(output)
    check_output_apart(manifest, output)
    read = read_manifest(manifest, skip_bad=skip_bad)
    if skip and skip >= len(read.utterances):  # before minutes go into loading the LLM
        raise BlspError(f"{manifest}: --skip {skip} leaves none of its {len(read.utterances)} utterances")
    backend = "hf" if model_and_tokenizer is not None else choose_backend(options.backend, info.enabled,
                                                                          options.save_topk)
    on_vllm = vllm_continuer(options) if backend == "vllm" else None
    if on_vllm is not None:
        continuer, fingerprint = on_vllm
    else:
        if model_and_tokenizer is None:
            model, tokenizer = load_language_model(options.llm)
            model.to(default_device(info))
        else:
            model, tokenizer = model_and_tokenizer
        llm_fingerprint = weights_fingerprint(model)
        continuer = Continuer(model, tokenizer, options, llm_fingerprint)
        fingerprint = settings_fingerprint(options, llm_fingerprint)
    # Every file a killed run left is checked before any is changed; the merge and the repair of a
    # half-written line then keep exactly the records `done` holds, so every rank sees the same.
    done = existing_records(output, fingerprint)
    barrier()  # no rank may still be reading a part file rank 0 merges and removes
    if info.is_main:
        output.parent.mkdir(parents=True, exist_ok=True)
        merge_parts(output)
    barrier()  # the output is whole before any rank appends to its own part

    # One generation per distinct transcript: under greedy decoding the same transcript spoken
    # by several voices gets the same continuation, so a corpus of 3 voices costs 1/3 the time.
    greedy = not options.do_sample
    known = {job_key(r["prompt_transcript"], voice_of(r, options)): record_answers(r) for r in done.values()} \
        if greedy else {}
    instructions = dict(options.instruction_set)
    jobs: dict[str, Job] = {}
    dropped = []
    for utt in read.utterances[skip:][:limit]:
        if utt.id in done:
            continue
        transcript = normalize_transcript(utt.text, utterance_language(utt)) if options.normalize else utt.text.strip()
        voice = voice_of(utt.extra, options)
        key = job_key(transcript, voice) if greedy else utt.id
        if key not in jobs:
            ids = continuer.prompt_ids(transcript)
            asked = [(transcript, i) for i in instructions.values()]
            if voice:
                asked += [(heard_with_voice(transcript, voice), q)
                          for q in asked_questions(transcript, voice, options.voice_questions, options.seed).values()]
            longest = max([len(ids)] + [len(continuer.prompt_ids(t, i)) for t, i in asked])
            if longest >= options.max_prompt_tokens:
                dropped.append(utt.id)
                continue
            jobs[key] = Job(transcript, ids, [], voice)
        jobs[key].utterances.append(utt)
    todo = sorted(jobs.values(), key=lambda job: -len(job.prompt_ids))  # similar lengths together
    mine = todo[info.rank :: info.world_size]
    target = part_path(output, info.rank, info.world_size) if info.enabled else output
    torch.manual_seed(options.seed + info.rank)

    bs = continuer.batch_size
    n_utts = sum(len(job.utterances) for job in mine)
    with tqdm(total=n_utts, desc="step 1: continuing", unit="utt", disable=not info.is_main) as bar:
        for start in range(0, len(mine), bs):
            batch = mine[start : start + bs]
            fresh = [job for job in batch if job.key not in known]
            if fresh:
                results = continuer.answer_jobs(fresh)
                known.update({job.key: r for job, r in zip(fresh, results)} if greedy else {})
                outcome = dict(zip(map(id, fresh), results))
            records = []
            for job in batch:
                answers = known[job.key] if job.key in known else outcome[id(job)]
                records += [output_record(u, output.parent, job.transcript, answers, fingerprint, instructions,
                                          job.voice)
                            for u in job.utterances]
            append_jsonl(target, records)
            bar.update(len(records))
    if info.enabled:
        barrier()
        if info.is_main:
            merge_parts(output)
        barrier()
    if dropped and info.is_main:
        which = "prompt under some instruction (of the continuation's and --instruction-set's)" \
            if instructions else "prompt"
        print(f"step 1: dropped {len(dropped)} utterance(s) whose {which} has >= "
              f"{options.max_prompt_tokens} tokens (--max-prompt-tokens)", file=sys.stderr)
    return ContinueSummary(
        written=sum(len(job.utterances) for job in todo), already_done=len(done), dropped_long=dropped,
        skipped_bad=[str(e) for e in read.skipped], output=str(output), fingerprint=fingerprint,
    )


def asked_questions(transcript: str, voice: dict[str, str] | None, n: int, seed: int) -> dict[str, str]:
    """`n` of the questions about a voice (all where there are no more), drawn by a generator seeded
    by the transcript and voice, so a rerun, or a resumed run, asks the same."""
    questions = voice_questions(voice) if voice else {}
    if n >= len(questions):
        return questions
    chosen = random.Random(f"{seed}:{job_key(transcript, voice)}").sample(sorted(questions), n)
    return {task: questions[task] for task in sorted(chosen)}


def voice_of(record: dict, options: ContinueOptions) -> dict[str, str] | None:
    """The voice attributes step 1 asks about for a line (None: it asks about none)."""
    return (voice_attributes(record) or None) if options.voice_questions else None


def vllm_continuer(options: ContinueOptions) -> tuple[VllmContinuer, str] | None:
    """The vLLM continuer and the settings' fingerprint (weights read from the checkpoint files).

    The fingerprint needs local safetensors files; where there are none (a hub id, .bin weights)
    `--backend auto` falls back to transformers (None), which fingerprints the loaded model.
    """
    from transformers import AutoTokenizer

    from .fingerprint import checkpoint_fingerprint
    from .packaged import resolve

    path = resolve(options.llm)
    try:
        weights = checkpoint_fingerprint(path)  # before vLLM spends minutes loading the weights
    except (BlspError, OSError) as err:
        if options.backend != "auto":
            raise BlspError(f"--backend vllm: cannot fingerprint the LLM's weights ({err}); --backend hf "
                            "runs step 1 with transformers") from None
        print(f"step 1: --backend auto: generating with transformers, not vLLM, which needs the weights' "
              f"safetensors to fingerprint them ({err})", file=sys.stderr)
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    print(f"step 1: generating with vLLM ({path})", file=sys.stderr)
    return VllmContinuer(path, tokenizer, options), settings_fingerprint(options, weights, "vllm")


def merge_parts(output: Path) -> None:
    """Append every rank's part file to the output, then remove it (ids seen twice keep one).
    Changes files: call it once `existing_records` has accepted them all."""
    repair_jsonl_tail(output)
    parts = rank_parts(output)
    if not parts:  # the usual resume: no need to read the whole output for its ids
        return
    seen = {str(rec["id"]) for _, rec in read_jsonl(output)} if output.exists() else set()
    for part in parts:
        repair_jsonl_tail(part)
        fresh = []
        for _, rec in read_jsonl(part):
            if str(rec["id"]) not in seen:
                seen.add(str(rec["id"]))
                fresh.append(rec)
        append_jsonl(output, fresh)
        part.unlink()
