"""The `blsp` command: one subcommand per pipeline stage.

Every user error (bad input line, missing file, mismatched checkpoint) is a `BlspError`, printed
as one line naming the file and line, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import BlspError
from .flags import add_decoding_flags, add_repetition_flags, repetition_kwargs

EXIT_USER_ERROR = 2


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------
def cmd_continue(args: argparse.Namespace) -> int:
    from .continuation import ContinueOptions, read_instruction_set, run_continue

    options = ContinueOptions(
        llm=args.llm, instruction=args.instruction, system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, max_prompt_tokens=args.max_prompt_tokens, normalize=args.normalize,
        batch_size=args.batch_size, seed=args.seed,
        instruction_set=read_instruction_set(args.instruction_set) if args.instruction_set else (),
        backend=args.backend, save_topk=args.save_topk, voice_questions=args.voice_questions,
    )
    summary = run_continue(args.manifest, args.output, options, skip_bad=args.skip_bad, limit=args.limit,
                           skip=args.skip)
    report_skipped(summary.skipped_bad)
    print(f"step 1: wrote {summary.written} continuation(s) to {summary.output} "
          f"({summary.already_done} already there, {len(summary.dropped_long)} dropped as too long)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .options import options_from_args
    from .training import run_train

    options = options_from_args(args)
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
        from .serving import ServeOptions, api_key_from, default_allowed_hosts, run_server
    except ImportError as err:
        raise BlspError(f"serving needs the `serve` extra ({err.name} is missing): pip install 'blsp[serve]'") from None

    options = ServeOptions(
        model_name=args.served_model_name, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, request_timeout_s=args.timeout, default_max_tokens=args.max_new_tokens,
        body_timeout_s=args.body_timeout, max_audio_seconds=args.max_audio_seconds,
        max_request_audio_seconds=args.max_request_audio_seconds, max_prompt_tokens=args.max_prompt_tokens,
        api_key=api_key_from(args.api_key), cors_origins=tuple(_listed(args.cors_origins)), docs=args.docs,
        allowed_hosts=tuple(_listed(args.allowed_hosts)) or default_allowed_hosts(args.host),
    )
    return run_server(args.model, options, host=args.host, port=args.port, strict=not args.no_strict)


def _listed(value: str | None) -> list[str]:
    """A comma-separated flag's items."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


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
def build_parser() -> argparse.ArgumentParser:
    from .corpus import add_data_parser
    from .evaluation import add_eval_parser
    from .prompts import CONTINUATION_INSTRUCTION, TASK_INSTRUCTIONS
    from .options import DEFAULT_PRESET, PRESETS, add_option_flags

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
    p.add_argument("--voice-questions", type=int, default=0, metavar="N",
                   help="lines that state their voice (gender, rate, pitch, whispered, noisy: `blsp data synth` with "
                        "voice_attributes) are also asked N questions about it (drawn per line; 6: all), the LLM "
                        "reading a description of the voice beside the transcript; a wrong answer is replaced by "
                        "the plain fact (`responses` voice_*), for `blsp train --mix voice=SHARE`")
    p.add_argument("--system-prompt", default=None, help="default: the chat template's own")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=192,
                   help="utterances whose prompt is longer are dropped; with --instruction-set, whose prompt "
                        "under any of its instructions is (each line answers them all)")
    normalize = p.add_mutually_exclusive_group()
    normalize.add_argument("--normalize", action="store_true",
                           help="feed transcripts through Whisper's English normaliser (lower case, no punctuation), "
                                "as the paper's code did; default: as written, as Whisper writes them")
    normalize.add_argument("--no-normalize", action="store_true", help="feed transcripts as written (the default)")
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
    add_decoding_flags(p, 64)
    p.set_defaults(func=cmd_continue)

    p = sub.add_parser("train", help="step 2: train the adapter on behavior data")
    p.add_argument("--data", required=True, nargs="+",
                   help="behavior data JSONL from `blsp continue`, or one directory of tar shards from "
                        "`blsp data shard` (streamed: each rank reads only its own shards)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--preset", "--recipe", dest="preset", default=DEFAULT_PRESET, metavar="NAME|FILE",
                   help=f"the values of the flags marked [preset] (a flag typed here wins): {', '.join(PRESETS)}, "
                        "as in blsp/presets/NAME.yaml, or your own YAML file of option: value. decoder (default): "
                        "the step-2 ablation's winner (docs/ablation.md), reads Whisper's decoder states through the "
                        "token bridge; fast: the best over the encoder's frames (the voice beyond the words, any "
                        "language at once); paper: the original's")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--skip-bad", action="store_true")
    add_option_flags(p, scale_help=(
        "several processes or machines: launch with torchrun, e.g. `torchrun --nnodes=2 --nproc_per_node=8 "
        "--rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=blsp -m blsp.cli train ... --fsdp --preset paper` "
        "on each machine (docs/scale.md); the decoder and fast presets' LoRA cannot run under --fsdp, nor the fast "
        "preset's warm start on --data DIR of shards: add --preset paper there"))
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
    add_decoding_flags(p, 64)
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
    p.add_argument("--max-audio-seconds", type=float, default=300.0, help="per clip (read from its header)")
    p.add_argument("--max-request-audio-seconds", type=float, default=300.0, help="all the clips of one request")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="text and speech vectors of one request (default: the LLM's context window)")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds to receive a request's body (408)")
    p.add_argument("--api-key", default=None,
                   help="clients must send `Authorization: Bearer KEY` (default: $BLSP_API_KEY; unset: no key)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAME,...",
                   help="Host header names answered, `*.example.com` patterns or `*` (default: localhost, "
                        "127.0.0.1, ::1 and --host; any with --host 0.0.0.0)")
    p.add_argument("--cors-origins", default=None, metavar="ORIGIN,...",
                   help="web pages of these origins (https://app.example.com, or `*`) may call the API; "
                        "default: none but the server's own page")
    p.add_argument("--docs", action="store_true", help="serve the API's /docs, /redoc and /openapi.json")
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
