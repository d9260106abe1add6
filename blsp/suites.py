"""Evaluation suites: a YAML file listing tasks, validated whole before any model is loaded.

A suite names, per task, a manifest, the task type and its options (docs/evaluation.md).
Every mistake a user can make in it (a missing manifest, an unknown task, metric or option, a
value of the wrong kind) is reported as `SUITE.yaml:LINE: ...`, the line coming from the YAML
node; a bad manifest line is reported as `MANIFEST:LINE: ...`. Both happen before the minutes
it takes to load an LLM, so a typo never costs a model load.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .data import Utterance, read_manifest
from .errors import InputError
from .io import file_sha256
from .metrics import canonical_label, label_words
from .prompts import CONTINUATION_INSTRUCTION, label_instruction, task_instruction
from .voice import DESCRIBE_QUESTION, VOICE_ATTRIBUTES, voice_attributes

ROWS = ("blsp", "cascade", "text")  # speech -> LLM; ASR transcript -> LLM; gold transcript -> LLM
# The gold transcript with a sentence describing the voice (blsp.voice.described_transcript): the
# ceiling of a question about the voice, which neither the text nor the cascade can answer. Opt-in
# (`rows:`): on a task about the words it only adds a sentence the LLM must ignore.
DESCRIBED = "described"
ASR_FIELD = "asr"  # a manifest field holding a transcript from any ASR: the cascade then uses it


# ----------------------------------------------------------------------------------------------
# Options of each task type (frozen: a spec is read once and never changed)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TranscriptionOptions:
    """Reference: the manifest's `text`. Scored after Whisper's English normaliser, or its basic
    one where the lines state another `language` (blsp data synth's de, es, it)."""

    language: str = "English"  # the speech's language in words, as the instruction names it


@dataclass(frozen=True)
class TranslationOptions:
    language: str = ""  # the target language in words, as the instruction names it ("German")
    target_lang: str = ""  # its code for sacrebleu (de, zh, ja): picks the BLEU tokenizer (zh, ja-mecab)
    tokenize: Union[str, None] = None  # a sacrebleu tokenizer, overriding the one target_lang picks
    reference_field: str = "translation"  # a string, or a list of strings (several references)


@dataclass(frozen=True)
class ClassificationOptions:
    label_field: str = "label"  # the manifest field holding the gold label
    labels: tuple[str, ...] = ()  # empty: every value found in the manifest, sorted
    # "voice": label_field is a voice attribute (blsp.voice), and an answer that names no label
    # still names a class by its words ("a woman", "slowly", "not whispering": VOICE_LABEL_RULE)
    label_keywords: str = ""


@dataclass(frozen=True)
class VoiceDescriptionOptions:
    """The free-form DESCRIBE_QUESTION, its answers scored per stated attribute (blsp.voice.describes)."""

    n_examples: int = field(default=5, metadata={"min": 0})  # side-by-side answers kept in the result


@dataclass(frozen=True)
class ContinuationOptions:
    """Behavior alignment on behavior data (`blsp continue` output of held-out utterances)."""

    group_by: tuple[str, ...] = ("voice", "voice_seen")  # line fields to break the numbers down by
    bootstrap: int = field(default=1000, metadata={"min": 0})  # resamples for the gap-closed CI
    n_examples: int = field(default=5, metadata={"min": 0})  # side-by-side continuations kept
    seed: int = 0


# The instructions the behaviour task asks (blsp/parity.py measures the answers).
BEHAVIOUR_INSTRUCTIONS = Path(__file__).resolve().parents[1] / "recipes" / "behaviour.yaml"


@dataclass(frozen=True)
class BehaviourInstruction:
    name: str
    instruction: str
    labels: tuple[str, ...] = ()  # a closed answer: agreement is the share of the same label


@dataclass(frozen=True)
class BehaviourOptions:
    """The LLM's answers to instructions never trained on, with the speech vs with the transcript
    (blsp/parity.py): agreement, runaway answers, KL(text||row) over the text path's answers."""

    instructions: str = ""  # a YAML file of them, relative to the suite (default: recipes/behaviour.yaml)
    n_examples: int = field(default=3, metadata={"min": 0})  # side-by-side answers kept per instruction


@dataclass(frozen=True)
class RepresentationOptions:
    """Cosine of the LLM's hidden states for speech and transcript, per layer (paper appendix)."""

    instructions: tuple[str, ...] = (CONTINUATION_INSTRUCTION, task_instruction("transcribe"))
    contrast_model: Union[str, None] = None  # a second adapter (e.g. ASR-only), relative to the suite


@dataclass(frozen=True)
class TaskType:
    metrics: tuple[str, ...]
    options: type
    rows: tuple[str, ...] = ROWS  # the rows run when a task names none
    optional_rows: tuple[str, ...] = ()  # rows run only when a task names them in `rows:`


TASK_TYPES: dict[str, TaskType] = {
    "transcription": TaskType(("wer", "cer"), TranscriptionOptions),
    "translation": TaskType(("bleu", "chrf"), TranslationOptions),
    "classification": TaskType(("accuracy", "macro_f1"), ClassificationOptions, optional_rows=(DESCRIBED,)),
    # per stated attribute, the share of clips whose description names it right; `overall` pools them
    "voice_description": TaskType(("overall", *VOICE_ATTRIBUTES), VoiceDescriptionOptions,
                                  optional_rows=(DESCRIBED,)),
    "continuation": TaskType(("loss", "gap_closed", "kl", "agreement"), ContinuationOptions),
    "behaviour": TaskType(("kl", "agreement", "runaway"), BehaviourOptions),
    "representation": TaskType(("cosine",), RepresentationOptions, rows=()),
}


@dataclass(frozen=True)
class LineFilter:
    """A task's `where:`: the manifest fields a line must have, with these values, to be evaluated
    (`voice_seen: false`: the voices never heard in training). A line lacking a field is dropped:
    a filter on seen/unseen voices says nothing about a clip whose voice is not known."""

    required: tuple[tuple[str, Any], ...]  # (field, value), as the suite lists them
    source: str  # the suite file and the line of `where:`, for the error when nothing is left
    line: int

    def keeps(self, utt: Utterance) -> bool:
        return all(_has_value(utt, key, value) for key, value in self.required)

    def describe(self) -> str:
        return ", ".join(f"{key}={_yaml_scalar(value)}" for key, value in self.required)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str
    manifest: Path
    line: int  # where the task starts in the suite file
    metrics: tuple[str, ...]
    rows: tuple[str, ...]
    options: Any  # the type's options dataclass
    instruction: str | None = None  # None: the type's default (see `default_instruction`)
    limit: int | None = None
    max_new_tokens: int | None = None
    set: str = ""  # the speech set it measures: the behaviour headline has one table per set
    where: LineFilter | None = None  # only the manifest lines it keeps are evaluated


@dataclass(frozen=True)
class Suite:
    path: Path
    sha256: str
    name: str
    tasks: tuple[TaskSpec, ...]
    description: str = ""
    asr_model: str | None = None  # the cascade's Whisper; None: the one the adapter's encoder came from
    # the language the cascade's Whisper transcribes (`auto`: the one it hears, as openai/whisper
    # detects it); None: the model's own speech_language, else English
    asr_language: str | None = None
    contrast_model: Path | None = None  # default for representation tasks
    batch_size: int | None = None
    limit: int | None = None


# Keys every task may have, with their kinds (checked like the options' fields).
@dataclass(frozen=True)
class _TaskKeys:
    name: str = ""
    type: str = ""
    manifest: str = ""
    metrics: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()
    instruction: Union[str, None] = None
    limit: Union[int, None] = field(default=None, metadata={"min": 1})
    max_new_tokens: Union[int, None] = field(default=None, metadata={"min": 1})
    set: str = ""
    # `where:` (a mapping of field -> value) is checked by `_line_filter`: _convert knows no mappings


@dataclass(frozen=True)
class _SuiteKeys:
    name: str = ""
    description: str = ""
    tasks: tuple = ()
    asr_model: Union[str, None] = None
    asr_language: Union[str, None] = None
    contrast_model: Union[str, None] = None
    batch_size: Union[int, None] = field(default=None, metadata={"min": 1})
    limit: Union[int, None] = field(default=None, metadata={"min": 1})


# YAML 1.1 (PyYAML) reads these unquoted as booleans: labels and values "yes"/"no" need quotes.
_BARE_BOOL = " (YAML reads a bare yes/no/on/off/true/false as a boolean: quote it, \"yes\")"


# ----------------------------------------------------------------------------------------------
# YAML with line numbers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """A YAML value with the (1-based) line it is on; mappings and sequences keep their children."""

    value: Any
    line: int
    children: Any = None  # dict[str, Node] for a mapping, list[Node] for a sequence


def read_yaml_nodes(path: str | os.PathLike) -> Node:
    """Parse YAML keeping each value's line. Mapping entries carry their key's line, which is
    where a reader looks for them; a duplicate key is an error (PyYAML keeps the last silently)."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("suite file not found", source) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read: {err}", source) from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        return Node({}, 1, {}) if root is None else _located(loader, root, source, root.start_mark.line + 1)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise InputError(f"not valid YAML: {err.problem or err.context}", source,
                         mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()


def _located(loader: yaml.SafeLoader, node: yaml.Node, source: str, line: int) -> Node:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve `<<:` merge keys
        children: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise InputError(f"keys must be names, not {key!r}", source, key_line)
            if key in children:
                raise InputError(f"duplicate key {key!r} (first on line {children[key].line})", source, key_line)
            children[key] = _located(loader, value_node, source, key_line)
        return Node({k: c.value for k, c in children.items()}, line, children)
    if isinstance(node, yaml.SequenceNode):
        items = [_located(loader, item, source, item.start_mark.line + 1) for item in node.value]
        return Node([c.value for c in items], line, items)
    return Node(loader.construct_object(node, deep=True), line)


# ----------------------------------------------------------------------------------------------
# Checking values against a dataclass's fields
# ----------------------------------------------------------------------------------------------
def _kind_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _kind_name(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return "a list of strings" if args and args[0] is str else "a list"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _convert(node: Node, hint: Any, minimum: int | None, source: str, key: str) -> Any:
    """The node's value as the field's type (lists become tuples), or an error at its line."""
    value = node.value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = InputError(f"`{key}` must be {_kind_name(hint)}, not {value!r}", source, node.line)
    if origin is tuple:
        if not isinstance(value, list):
            raise bad
        if args and args[0] is str:
            for item in node.children:
                if not isinstance(item.value, str) or not item.value.strip():
                    raise InputError(f"`{key}`: every item must be a non-empty string, not {item.value!r}"
                                     f"{_BARE_BOOL if isinstance(item.value, bool) else ''}", source, item.line)
        return tuple(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad
    if hint is str and not isinstance(value, str):
        raise bad
    if minimum is not None and value < minimum:
        raise InputError(f"`{key}` must be at least {minimum}, not {value}", source, node.line)
    return value


def _fields_from(node: Node, cls: type, source: str, what: str, extra_keys: tuple[str, ...] = ()) -> dict:
    """Check a mapping node against `cls`'s fields (plus `extra_keys`, checked by the caller):
    unknown keys are errors at their line; returns {field: converted value} for keys present."""
    if not isinstance(node.children, dict):
        raise InputError(f"{what} must be a mapping of settings, not {node.value!r}", source, node.line)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, child in node.children.items():
        if key in extra_keys:
            continue
        if key not in fields:
            known = sorted([*fields, *extra_keys])
            raise InputError(f"unknown {what} setting `{key}` (known: {', '.join(known)})", source, child.line)
        out[key] = _convert(child, hints[key], fields[key].metadata.get("min"), source, key)
    return out


def load_behaviour_instructions(path: str | os.PathLike = BEHAVIOUR_INSTRUCTIONS) -> tuple[BehaviourInstruction, ...]:
    """The instructions file: `name: instruction`, or `name: {instruction: ..., labels: [...]}`;
    a mistake is reported as `FILE:LINE: ...`."""
    source = os.fspath(path)
    if not Path(path).is_file():
        raise InputError("behaviour instructions file not found", source)
    root = read_yaml_nodes(path)
    if not isinstance(root.value, dict) or not root.value:
        raise InputError("expected a mapping of name: instruction", source, root.line)
    out = []
    for name, node in root.children.items():
        value = node.value
        if isinstance(value, str):
            value = {"instruction": value}
        if not isinstance(value, dict) or set(value) - {"instruction", "labels"}:
            raise InputError(f"{name}: give an instruction string, or `instruction:` and `labels:`", source, node.line)
        text, labels = value.get("instruction"), value.get("labels", [])
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{name}: the instruction must be a non-empty string", source, node.line)
        if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels) \
                or len(labels) == 1:
            raise InputError(f"{name}: labels must be a list of two or more strings", source, node.line)
        out.append(BehaviourInstruction(name, text.strip(), tuple(labels)))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------
def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.normpath(base / os.path.expanduser(value)))


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and check a suite file; every error names the suite file and line."""
    source = os.fspath(path)
    root = read_yaml_nodes(path)
    top = _fields_from(root, _SuiteKeys, source, "suite")
    tasks_node = root.children.get("tasks") if isinstance(root.children, dict) else None
    if tasks_node is None or not isinstance(tasks_node.children, list) or not tasks_node.children:
        raise InputError("a suite needs `tasks:`, a list of at least one task", source,
                         tasks_node.line if tasks_node else root.line)
    base = Path(source).resolve().parent
    tasks, names = [], {}
    for task_node in tasks_node.children:
        spec = _task(task_node, base, source)
        if spec.name in names:
            raise InputError(f"two tasks are named {spec.name!r} (the first on line {names[spec.name]}); "
                             "give each a `name:`", source, task_node.line)
        names[spec.name] = task_node.line
        tasks.append(spec)
    contrast = top.get("contrast_model")
    if contrast is not None:
        contrast = _resolve(base, contrast)
        _check_model_dir(contrast, source, root.children["contrast_model"].line)
    return Suite(path=Path(source), sha256=file_sha256(source),
                 name=top.get("name") or Path(source).stem, description=top.get("description", ""),
                 tasks=tuple(tasks), asr_model=top.get("asr_model"), asr_language=top.get("asr_language"),
                 contrast_model=contrast,
                 batch_size=top.get("batch_size"), limit=top.get("limit"))


def _check_model_dir(path: Path, source: str, line: int) -> None:
    if not (path / "config.json").is_file():
        raise InputError(f"`contrast_model`: no adapter checkpoint at {path}", source, line)


def _task(node: Node, base: Path, source: str) -> TaskSpec:
    if not isinstance(node.children, dict):
        raise InputError(f"a task must be a mapping (type, manifest, ...), not {node.value!r}", source, node.line)
    kids = node.children
    type_node = kids.get("type")
    if type_node is None:
        raise InputError(f"a task needs `type:` (one of {', '.join(TASK_TYPES)})", source, node.line)
    if not isinstance(type_node.value, str) or type_node.value not in TASK_TYPES:
        raise InputError(f"unknown task type {type_node.value!r} (known: {', '.join(TASK_TYPES)})",
                         source, type_node.line)
    kind = TASK_TYPES[type_node.value]
    option_names = tuple(f.name for f in dataclasses.fields(kind.options))
    common = _fields_from(node, _TaskKeys, source, f"{type_node.value} task", extra_keys=(*option_names, "where"))
    own = {k: v for k, v in kids.items() if k in option_names}
    options = kind.options(**_fields_from(Node(node.value, node.line, own), kind.options, source, "task"))
    if "manifest" not in kids:
        raise InputError("a task needs `manifest:` (a JSONL manifest, relative to this suite file)", source, node.line)
    manifest = _resolve(base, common["manifest"])
    if not manifest.is_file():
        raise InputError(f"manifest not found: {manifest}", source, kids["manifest"].line)
    for key in ("metrics", "rows"):
        if key in common and not common[key]:
            raise InputError(f"`{key}` must list at least one (or be left out: all of them)", source, kids[key].line)
    metrics = common.get("metrics") or kind.metrics
    for item, metric in zip(kids["metrics"].children if "metrics" in kids else [], metrics):
        if metric not in kind.metrics:
            raise InputError(f"unknown metric {metric!r} for a {type_node.value} task "
                             f"(known: {', '.join(kind.metrics)})", source, item.line)
    rows = common.get("rows")
    if rows is not None and not kind.rows:
        raise InputError(f"a {type_node.value} task has no rows (it compares speech with text inside the LLM)",
                         source, kids["rows"].line)
    for item, row in zip(kids["rows"].children if "rows" in kids else [], rows or ()):
        _check_row(row, type_node.value, source, item.line)
    if type_node.value == "translation" and not options.language:
        raise InputError("a translation task needs `language:` (the target language in words, e.g. German)",
                         source, node.line)
    if isinstance(options, ClassificationOptions) and options.label_keywords:
        _check_label_keywords(options, source, kids["label_keywords"].line)
    if isinstance(options, RepresentationOptions) and options.contrast_model:
        contrast = _resolve(base, options.contrast_model)
        _check_model_dir(contrast, source, kids["contrast_model"].line)
        options = dataclasses.replace(options, contrast_model=str(contrast))
    if isinstance(options, BehaviourOptions):
        found = _resolve(base, options.instructions) if options.instructions else BEHAVIOUR_INSTRUCTIONS
        if not found.is_file():
            raise InputError(f"`instructions`: file not found: {found}", source,
                             kids["instructions"].line if "instructions" in kids else node.line)
        load_behaviour_instructions(found)  # checked now (its own file:line errors), before any model loads
        options = dataclasses.replace(options, instructions=str(found))
    return TaskSpec(name=common.get("name") or type_node.value, type=type_node.value, manifest=manifest,
                    line=node.line, metrics=tuple(dict.fromkeys(metrics)), rows=tuple(dict.fromkeys(rows or kind.rows)),
                    options=options, instruction=common.get("instruction"), limit=common.get("limit"),
                    max_new_tokens=common.get("max_new_tokens"), set=common.get("set", ""),
                    where=_line_filter(kids["where"], source) if "where" in kids else None)


def _check_row(row: str, task_type: str, source: str, line: int) -> None:
    kind = TASK_TYPES[task_type]
    if row in kind.rows or row in kind.optional_rows:
        return
    supported = [name for name, t in TASK_TYPES.items() if row in t.optional_rows]
    why = f"; `{row}` is a row of {' and '.join(supported)} tasks" if supported else ""
    raise InputError(f"unknown row {row!r} for a {task_type} task (known: {', '.join(kind.rows + kind.optional_rows)}"
                     f"{why})", source, line)


def _line_filter(node: Node, source: str) -> LineFilter:
    """`where: {field: value, ...}`: a non-empty mapping of manifest fields to scalar values."""
    if not isinstance(node.children, dict) or not node.children:
        raise InputError(f"`where` must map manifest fields to the values a line needs (e.g. "
                         f"`where: {{voice_seen: false}}`), not {node.value!r}", source, node.line)
    required = []
    for key, child in node.children.items():
        value = child.value
        # a line's value is compared as JSON wrote it; null would match nothing useful. A list: any
        # of its values (`pitch: [low, normal, high]`: the lines that state a pitch)
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, (list, dict)) or v is None for v in values):
            raise InputError(f"`where`: `{key}` must be a string, a number or true/false, or a list of them (any "
                             f"of), not {value!r}", source, child.line)
        required.append((key, tuple(values) if isinstance(value, list) else value))
    return LineFilter(tuple(required), source, node.line)


def _has_value(utt: Utterance, key: str, value: Any) -> bool:
    """Whether the line has `key` equal to `value`. True is not 1 here (Python says it is):
    `voice_seen: true` must not keep a line whose voice_seen is a count. A tuple: any of its values."""
    if isinstance(value, tuple):
        return any(_has_value(utt, key, v) for v in value)
    if key not in ("id", "text") and key not in utt.extra:
        return False
    have = _field(utt, key)
    if isinstance(have, bool) or isinstance(value, bool):
        return isinstance(have, bool) and isinstance(value, bool) and have is value
    return have == value


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, tuple):
        return "|".join(map(_yaml_scalar, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def default_instruction(spec: TaskSpec, labels: tuple[str, ...] = (),
                        continuation: str = CONTINUATION_INSTRUCTION) -> str:
    """The instruction a task asks when the suite gives none."""
    if spec.instruction is not None:
        return spec.instruction
    if spec.type == "transcription":
        return task_instruction("transcribe", spec.options.language)
    if spec.type == "translation":
        return task_instruction("translate", spec.options.language)
    if spec.type == "classification":
        return label_instruction(spec.options.label_field, labels)
    if spec.type == "voice_description":
        return DESCRIBE_QUESTION
    return continuation


# ----------------------------------------------------------------------------------------------
# The data of a task: read and checked before any model is loaded
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskData:
    utterances: tuple[Utterance, ...]  # after the limit
    n_total: int  # lines in the manifest
    manifest_sha256: str
    labels: tuple[str, ...] = ()  # classification: the label set, as spelled in the suite (or manifest)
    gold: tuple[Any, ...] = ()  # per utterance: the reference translation(s), canonical gold label or voice attributes
    asr: dict[str, str] | None = None  # id -> the manifest's `asr` transcript, when every line has one
    n_selected: int | None = None  # lines the task's `where` kept (None: no filter)


def load_task_data(spec: TaskSpec, limit: int | None = None) -> TaskData:
    """Read the task's manifest and check what the task needs of every line (file:line errors)."""
    if spec.type == "continuation":
        from .behavior import read_behavior_data

        utterances, _ = read_behavior_data([spec.manifest])
    else:
        utterances = read_manifest(spec.manifest).utterances
    if not utterances:
        raise InputError("no utterances in this manifest", str(spec.manifest))
    n_total = len(utterances)
    if spec.where is not None:  # before the checks below: a dropped line need not carry the task's fields
        utterances = _selected(spec, utterances)
    labels, gold = (), ()
    if spec.type == "translation":
        gold = tuple(_reference(u, spec.options.reference_field) for u in utterances)
        n_refs = [1 if isinstance(g, str) else len(g) for g in gold]
        for u, n in zip(utterances, n_refs):
            if n != n_refs[0]:
                raise InputError(f"{n} reference(s) here but {n_refs[0]} on the first line: every line needs "
                                 "as many", u.source, u.line)
    elif spec.type == "classification":
        labels, gold = _labels(utterances, spec.options)
    elif spec.type == "voice_description":
        gold = [voice_attributes(u.extra) for u in utterances]
        if not any(gold):
            raise InputError(f"no line states a voice attribute ({', '.join(VOICE_ATTRIBUTES)}): there is nothing "
                             "to score the descriptions against", str(spec.manifest))
    if DESCRIBED in spec.rows and not any(voice_attributes(u.extra) for u in utterances):
        raise InputError(f"row `{DESCRIBED}`: no line states a voice attribute ({', '.join(VOICE_ATTRIBUTES)}), "
                         "so it would read the bare transcripts (the text row again)", str(spec.manifest))
    asr = _asr_field(utterances) if "cascade" in spec.rows else None
    n_limit = min(x for x in (limit, spec.limit, len(utterances)) if x is not None)
    kept = tuple(utterances[:n_limit])
    return TaskData(utterances=kept, n_total=n_total, manifest_sha256=file_sha256(spec.manifest),
                    labels=labels, gold=tuple(gold[:n_limit]),
                    asr={u.id: asr[u.id] for u in kept} if asr is not None else None,
                    n_selected=len(utterances) if spec.where is not None else None)


def _selected(spec: TaskSpec, utterances: list[Utterance]) -> list[Utterance]:
    """The lines the task's `where` keeps; none is an error at the `where:` line of the suite."""
    kept = [u for u in utterances if spec.where.keeps(u)]
    if not kept:
        # a boolean asked where the lines hold strings is most likely an unquoted yes/no
        strings = any(isinstance(v, bool) and isinstance(u.extra.get(k), str)
                      for k, v in spec.where.required for u in utterances)
        raise InputError(f"task {spec.name!r} (line {spec.line}): `where` ({spec.where.describe()}) keeps none of "
                         f"the {len(utterances)} line(s) of {spec.manifest}{_BARE_BOOL if strings else ''}",
                         spec.where.source, spec.where.line)
    return kept


def _field(utt: Utterance, key: str) -> Any:
    """A line's field by name, the parsed ones (id, text) included."""
    return {"id": utt.id, "text": utt.text}[key] if key in ("id", "text") else utt.extra.get(key)


def _reference(utt: Utterance, key: str) -> str | tuple[str, ...]:
    value = _field(utt, key)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    raise InputError(f"missing or empty `{key}` (the reference translation: a string or a list of strings)",
                     utt.source, utt.line)


def _check_label_keywords(options: ClassificationOptions, source: str, line: int) -> None:
    if options.label_keywords != "voice":
        raise InputError(f"label_keywords {options.label_keywords!r}: only \"voice\" (the voice attribute's words)",
                         source, line)
    attribute = VOICE_ATTRIBUTES.get(options.label_field)
    if attribute is None:
        raise InputError(f"label_keywords: voice needs label_field to be a voice attribute "
                         f"({', '.join(VOICE_ATTRIBUTES)}), not {options.label_field!r}", source, line)
    if set(options.labels) != set(attribute.labels):
        raise InputError(f"label_keywords: voice needs labels to be {options.label_field}'s classes "
                         f"({', '.join(attribute.labels)})", source, line)


def _labels(utterances: list[Utterance], options: ClassificationOptions) -> tuple[tuple[str, ...], list[str]]:
    key = options.label_field
    values = [_field(u, key) for u in utterances]
    for u, value in zip(utterances, values):
        if not isinstance(value, str) or not label_words(value):
            raise InputError(f"missing or empty `{key}` (the gold label)", u.source, u.line)
    labels = options.labels
    if not labels:  # the values found, one spelling per label (its first)
        seen: dict[tuple[str, ...], str] = {}
        for value in values:
            seen.setdefault(label_words(value), value.strip())
        labels = tuple(sorted(seen.values(), key=str.lower))
    gold = []
    for u, value in zip(utterances, values):
        label = canonical_label(value, labels)
        if label is None:
            raise InputError(f"gold label {value!r} is not in the task's labels ({', '.join(labels)})",
                             u.source, u.line)
        gold.append(label)
    return tuple(labels), gold


def _asr_field(utterances: list[Utterance]) -> dict[str, str] | None:
    """The manifest's own ASR transcripts, if it has them: all lines or none."""
    have = [isinstance(u.extra.get(ASR_FIELD), str) for u in utterances]
    if not any(have):
        return None
    missing = next((u for u, h in zip(utterances, have) if not h), None)
    if missing is not None:
        raise InputError(f"no `{ASR_FIELD}` transcript, though other lines have one (give it on every line or "
                         "on none; none: the encoder's Whisper transcribes)", missing.source, missing.line)
    return {u.id: u.extra[ASR_FIELD] for u in utterances}
