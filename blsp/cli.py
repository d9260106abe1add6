"""The `blsp` command: one subcommand per pipeline stage.

Every user error (bad input line, missing file, mismatched checkpoint) is a `BlspError`, printed
as one line naming the file and line, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Sequence

from .errors import BlspError

EXIT_USER_ERROR = 2


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------
def cmd_continue(args: argparse.Namespace) -> int:
    from .continuation import ContinueOptions, read_instruction_set, run_continue

    options = ContinueOptions(
        llm=args.llm, instruction=args.instruction, system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, max_prompt_tokens=args.max_prompt_tokens, normalize=not args.no_normalize,
        batch_size=args.batch_size, seed=args.seed,
        instruction_set=read_instruction_set(args.instruction_set) if args.instruction_set else (),
        backend=args.backend, save_topk=args.save_topk,
    )
    summary = run_continue(args.manifest, args.output, options, skip_bad=args.skip_bad, limit=args.limit,
                           skip=args.skip)
    report_skipped(summary.skipped_bad)
    print(f"step 1: wrote {summary.written} continuation(s) to {summary.output} "
          f"({summary.already_done} already there, {len(summary.dropped_long)} dropped as too long)")
    return 0


def train_options(args: argparse.Namespace):
    """Every TrainOptions field has the flag of the same name (--max-steps -> max_steps); the flags
    a recipe sets default to None: "the recipe's"."""
    from .training import RECIPE_OPTIONS, TrainOptions

    given = {f.name: getattr(args, f.name) for f in fields(TrainOptions)}
    return TrainOptions.from_recipe(args.recipe, **{k: v for k, v in given.items()
                                                    if not (k in RECIPE_OPTIONS and v is None)})


def cmd_train(args: argparse.Namespace) -> int:
    from .training import run_train

    options = train_options(args)
    result = run_train(args.data, args.output_dir, options, resume=args.resume, skip_bad=args.skip_bad)
    report_skipped(result["skipped_bad"])
    print(f"step 2: trained {result['steps']} step(s); adapter saved in {result['output_dir']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import run_generate
    from .prompts import task_instruction

    instruction = args.instruction if args.instruction is not None else task_instruction(args.task, args.language)
    summary = run_generate(
        args.model, args.manifest, args.output, instruction, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, skip_bad=args.skip_bad, strict=not args.no_strict, seed=args.seed,
        generate_kwargs=repetition_kwargs(args),
    )
    report_skipped(summary["skipped_bad"])
    print(f"generate: wrote {summary['written']} answer(s) to {args.output} ({summary['already_done']} already there)")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    return run_chat(args.model, max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt,
                    strict=not args.no_strict, **repetition_kwargs(args))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serving import ServeOptions, run_server
    except ImportError as err:
        raise BlspError(f"serving needs the `serve` extra ({err.name} is missing): pip install 'blsp[serve]'") from None

    options = ServeOptions(
        model_name=args.served_model_name, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, request_timeout_s=args.timeout, default_max_tokens=args.max_new_tokens,
    )
    return run_server(args.model, options, host=args.host, port=args.port, strict=not args.no_strict)


def cmd_models(args: argparse.Namespace) -> int:
    from .packaged import list_models, resolve

    for name in args.convert or []:
        print(f"{name}: {resolve(name)}")
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':24} {'kind':8} {'installed':10} {'converted':10} path")
    for r in rows:
        print(f"{r['name']:24} {r['kind']:8} {str(r['installed']):10} {str(r['cached']):10} {r['path']}")
    return 0


def report_skipped(skipped: Sequence[str]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} bad line(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def _add_decoding(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def add_repetition_flags(p: argparse.ArgumentParser) -> None:
    """The answers' loop guards (`blsp.inference.repetition_guard`); off unless given."""
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                   help="no N-gram twice in an answer (e.g. 3: stops a small LLM's loops; 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                   help="P > 1 makes tokens already in the prompt or answer less likely (1: off)")


def repetition_kwargs(args: argparse.Namespace) -> dict:
    from .inference import repetition_guard

    return repetition_guard(args.no_repeat_ngram_size, args.repetition_penalty)


def option_flags(options: dict) -> list[str]:
    """A recipe's options as flags: {"max_steps": 200, "drop_copies": True} -> ["--max-steps", "200",
    "--drop-copies"] (recipes keep their settings in YAML, and run the commands with them)."""
    from dataclasses import fields

    from .training import TrainOptions

    # Switches that are on (or unset) by default have a --no-X flag (argparse.BooleanOptionalAction).
    on_by_default = {f.name for f in fields(TrainOptions) if "bool" in str(f.type) and f.default is not False}
    out = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            out.append(flag)
        elif value is False and key in on_by_default:
            out.append(f"--no-{key.replace('_', '-')}")
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def recipe_defaults(train: argparse.ArgumentParser) -> None:
    """The flags a recipe sets default to None ("the recipe's"); their help says each recipe's value."""
    from .training import RECIPE_OPTIONS, RECIPES, TrainOptions

    for action in train._actions:
        if action.dest in RECIPE_OPTIONS:
            values = ", ".join(f"{name} {spec.get(action.dest, TrainOptions.__dataclass_fields__[action.dest].default)}"
                               for name, spec in RECIPES.items())
            action.help = f"{action.help or ''} [recipe: {values}]".strip()
            action.default = None


def build_parser() -> argparse.ArgumentParser:
    from .corpus import add_data_parser
    from .evaluation import add_eval_parser
    from .prompts import CONTINUATION_INSTRUCTION, TASK_INSTRUCTIONS
    from .training import DEFAULT_RECIPE, RECIPES

    parser = argparse.ArgumentParser(prog="blsp", description="BLSP: teach a text LLM to listen.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("continue", help="step 1: the LLM continues each transcript (behavior data)")
    p.add_argument("--manifest", required=True, help="JSONL: {\"audio\": ..., \"text\": ...} per line")
    p.add_argument("--llm", default="smollm2-135m-instruct")
    p.add_argument("--output", required=True, help="behavior data JSONL (appended to; resumable)")
    p.add_argument("--instruction", default=CONTINUATION_INSTRUCTION)
    p.add_argument("--instruction-set", default=None, metavar="FILE",
                   help="YAML of task: instruction (e.g. recipes/instructions.yaml): each line also gets the "
                        "LLM's answer to every one (`responses`), for `blsp train --mix TASK=SHARE`")
    p.add_argument("--system-prompt", default=None, help="default: the chat template's own")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=192,
                   help="utterances whose prompt is longer are dropped; with --instruction-set, whose prompt "
                        "under any of its instructions is (each line answers them all)")
    p.add_argument("--no-normalize", action="store_true", help="feed transcripts as written")
    p.add_argument("--save-topk", type=int, default=0, metavar="K",
                   help="also save the LLM's top-K log-probabilities at each continuation token, so `blsp train "
                        "--loss kl|ce+kl` distils from them without running the teacher (K of 10-50)")
    p.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                   help="hf: transformers (batched greedy with early exit); vllm: vLLM (pip install vllm; a CUDA "
                        "GPU, one process); auto (default): vLLM when installed beside a GPU, else hf (hf too with "
                        "--save-topk, or where the LLM has no local safetensors weights)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the manifest's first N utterances (e.g. behaviour data for step 2's steps, while "
                        "the warm start hears the whole manifest through `blsp train --warm-start-data`)")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="leave out the manifest's first N utterances: with --limit, a window (`--skip 5600 --limit "
                        "5600`: behaviour data for a further round of step 2, from clips the first did not use)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines and report them")
    _add_decoding(p, 64)
    p.set_defaults(func=cmd_continue)

    p = sub.add_parser("train", help="step 2: train the adapter on behavior data")
    p.add_argument("--data", required=True, nargs="+",
                   help="behavior data JSONL from `blsp continue`, or one directory of tar shards from "
                        "`blsp data shard` (streamed: each rank reads only its own shards)")
    p.add_argument("--encoder", default="whisper-base")
    p.add_argument("--llm", default="smollm2-135m-instruct")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                   help="the defaults of the flags marked [recipe]: decoder (default), the step-2 ablation's "
                        "winner on held-out speech (docs/ablation.md), reads Whisper's decoder states through "
                        "the token bridge; fast is the best recipe over the encoder's frames (what the LLM reads "
                        "beyond the words, any language at once); paper the original's")
    p.add_argument("--speech-states", default="encoder", choices=["encoder", "decoder"],
                   help="what the adapter reads: encoder, the Whisper encoder's frames (the paper); decoder, the "
                        "hidden states of Whisper's decoder along its greedy transcript, one per token (the words "
                        "as Whisper heard them; Whisper's decoding runs for every clip)")
    p.add_argument("--speech-language", default="en", metavar="CODE",
                   help="with --speech-states decoder: the language Whisper transcribes (en, fr, ...), or auto: "
                        "Whisper's guess for each clip (multilingual Whispers)")
    p.add_argument("--adapter", default="conv", choices=["conv", "stack"])
    p.add_argument("--adapter-downsample", type=int, default=8, metavar="N",
                   help="encoder frames (50 Hz) per speech vector: 8 is the paper's 6.25 Hz; conv needs a power of 2")
    p.add_argument("--instruction", default=CONTINUATION_INSTRUCTION)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr-schedule", default="cosine", help="linear, cosine, constant_with_warmup, ...")
    p.add_argument("--batch-size", type=int, default=8, help="per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--llm-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the frozen LLM's weights in memory; auto: bf16 when the step runs in bf16 (half the memory, "
                        "no per-step weight casts), else as loaded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--feature-cache", default=None, help="default: $BLSP_CACHE/features")
    p.add_argument("--feature-memory-mb", type=float, default=None,
                   help="keep up to this many MB of cached features in memory after their first read (0: read "
                        "every clip from disk on every step); default 1024 on a GPU, 0 on a CPU")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="go on training a saved model (a `blsp train` output directory) on --data: its adapter, CTC "
                        "head and LoRA, a fresh optimizer and schedule, no warm start; the backbones and adapter "
                        "settings must be the saved ones")
    p.add_argument("--skip-bad", action="store_true")
    g = p.add_argument_group("what the adapter learns from")
    g.add_argument("--loss", default="ce", choices=["ce", "kl", "ce+kl"],
                   help="ce: cross-entropy on the continuation (the paper); kl: KL(LLM on transcript || "
                        "LLM on speech) over the continuation (BLSP-KD); ce+kl: both")
    g.add_argument("--kl-temperature", type=float, default=1.0)
    g.add_argument("--kl-weight", type=float, default=1.0)
    g.add_argument("--mix-transcribe", type=float, default=0.0, metavar="SHARE",
                   help="share of utterances trained to transcribe instead of continue (the paper's 9:1 is 0.1)")
    g.add_argument("--mix", default="", metavar="TASK=SHARE,...",
                   help="shares of utterances trained on other tasks instead of the continuation: transcribe, or a "
                        "task of step 1's --instruction-set (e.g. transcribe=0.1,summarize=0.2)")
    g.add_argument("--drop-copies", action="store_true",
                   help="leave out continuations that merely repeat the transcript")
    g.add_argument("--max-target-tokens", type=int, default=None, metavar="N",
                   help="train on each continuation's first N tokens only (its end-of-turn token goes if cut)")
    g.add_argument("--warm-start", default="none", choices=["none", "ctc", "embed"],
                   help="ctc: first train the adapter with CTC through the LLM's frozen embeddings, on cached "
                        "features alone (no LLM forward), then step 2; embed: the same, and pull each speech "
                        "vector CTC aligns to a token onto that token's embedding")
    g.add_argument("--warm-start-steps", type=int, default=0)
    g.add_argument("--warm-start-lr", type=float, default=2e-3)
    g.add_argument("--warm-start-batch-size", type=int, default=32)
    g.add_argument("--warm-start-data", nargs="+", default=(), metavar="MANIFEST",
                   help="more utterances (audio + transcript; no step 1 needed) for the warm start only")
    g.add_argument("--embed-weight", type=float, default=1.0, help="weight of the pull of --warm-start embed")
    g.add_argument("--warm-start-time-masks", type=int, default=0, metavar="N",
                   help="SpecAugment in the warm start: N time spans of up to 0.2 s zeroed in each clip's features")
    g.add_argument("--warm-start-feature-masks", type=int, default=0, metavar="N",
                   help="SpecAugment in the warm start: N bands of up to 1/16 of the feature channels zeroed")
    g.add_argument("--compress-speech", default="none", choices=["none", "ctc"],
                   help="ctc: the LLM reads one speech vector per token the CTC head hears (blank frames "
                        "dropped, repeats merged); needs --warm-start ctc|embed; the head is saved")
    g.add_argument("--ctc-weight", type=float, default=0.5,
                   help="with --compress-speech ctc: weight of CTC on the transcript beside step 2's loss")
    g.add_argument("--ctc-min-count", type=int, default=1, metavar="N",
                   help="the CTC head's tokens (warm start and compression): the transcripts' tokens seen at least N "
                        "times and every single byte; a rarer token is spelled with them by undoing its BPE merges, "
                        "so unheard words can be emitted and the head is smaller (1: every token seen)")
    g.add_argument("--speech-vectors", default="adapter", choices=["adapter", "tokens"],
                   help="with --compress-speech ctc: adapter: the LLM reads the adapter's vector of each token run; "
                        "tokens: the mix of the LLM's own token embeddings the CTC head hears there. With "
                        "--speech-states decoder: adapter: the adapter's vector of each decoder state; tokens: the "
                        "LLM embeddings of Whisper's likeliest tokens there, plus the adapter's vector as a correction")
    g = p.add_argument_group("training more than the adapter")
    g.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="LoRA of rank R on the LLM's projections (peft), trained with the adapter and saved in its "
                        "checkpoint; 0: the LLM stays frozen, as in the paper")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA's scale is alpha / rank")
    g.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                   help="dropout on LoRA's input while training (peft's lora_dropout); 0: none")
    g.add_argument("--lora-where", default="speech", choices=["speech", "all"],
                   help="speech: LoRA acts at speech positions only, so text-only prompts get the frozen LLM's "
                        "answers; all: at every position")
    g.add_argument("--lora-modules", default="attention", metavar="NAMES",
                   help="attention (q,k,v,o), mlp (gate,up,down), all, or comma-separated module names")
    g.add_argument("--unfreeze-encoder-layers", type=int, default=0, metavar="N",
                   help="train the Whisper encoder's top N layers (and its final norm) too, saved in the checkpoint; "
                        "features are cached below them and the N layers run in every step")
    g.add_argument("--encoder-lr", type=float, default=None, metavar="LR",
                   help="the unfrozen encoder layers' peak learning rate, in the warm start and step 2 (default: "
                        "each stage's own; pretrained layers want ~10x less than a fresh adapter)")
    g.add_argument("--lora-lr", type=float, default=None, metavar="LR",
                   help="LoRA's peak learning rate (default: --lr, the adapter's)")
    g = p.add_argument_group(
        "scale", "several processes or machines: launch with torchrun, e.g. `torchrun --nnodes=2 --nproc_per_node=8 "
                 "--rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=blsp -m blsp.cli train ... --fsdp "
                 "--recipe paper` on each machine (README \"Scale\"); the decoder and fast recipes' LoRA cannot run under "
                 "--fsdp, nor the fast recipe's warm start on --data DIR of shards: add --recipe paper there")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the frozen LLM's decoder layers across ranks (PyTorch FSDP2), for an LLM too "
                        "large for one GPU; the adapter stays replicated; NCCL on GPU, gloo on CPU")
    g.add_argument("--shuffle-buffer", type=int, default=1000, metavar="N",
                   help="with --data DIR of shards: items mixed within each rank's stream (shards are "
                        "shuffled per epoch too)")
    g = p.add_argument_group("speed and memory (benchmarks/train_step.py)")
    g.add_argument("--bucket-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch sequences of similar length together (less padding), in step 2 and in the warm "
                        "start; still deterministic from the step and seed, the same on every rank and on resume")
    g.add_argument("--warm-start-bucket-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="the warm start's batches alone (default: as --bucket-by-length)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the frozen LLM's layers in the backward pass: less memory, more time")
    recipe_defaults(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="any instruction over the speech of a manifest")
    p.add_argument("--model", required=True, help="a trained adapter directory")
    p.add_argument("--manifest", required=True)
    p.add_argument("--output", required=True)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--instruction", default=None)
    what.add_argument("--task", default="transcribe", choices=sorted(TASK_INSTRUCTIONS))
    p.add_argument("--language", default="English", help="target language of --task translate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--no-strict", action="store_true", help="allow backbones other than the trained ones")
    _add_decoding(p, 64)
    add_repetition_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to the model: type text, or /audio PATH [text]")
    p.add_argument("--model", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--no-strict", action="store_true")
    add_repetition_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible speech chat API and a web page (needs the `serve` extra)")
    p.add_argument("--model", required=True, help="a trained adapter directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="blsp", help="the `model` clients ask for")
    p.add_argument("--max-batch-size", type=int, default=8, help="1 serves one request at a time")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests; more are answered 503")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request, queueing included")
    p.add_argument("--max-new-tokens", type=int, default=256, help="when a request gives no max_tokens")
    p.add_argument("--no-strict", action="store_true")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list the packaged models; --convert NAME converts and caches one")
    p.add_argument("--convert", nargs="*", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    add_data_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .cpu import flush_denormals

    flush_denormals()  # before torch starts its threads, so that they all inherit it
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BlspError as err:
        print(f"blsp: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("blsp: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
    finally:
        from .distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
