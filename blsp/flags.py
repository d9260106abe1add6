"""Command-line flags shared by several subcommands (`blsp generate`, `chat`, `eval`).

Kept apart from `blsp.cli` so that a stage's module can add its own subcommand's flags without
importing the command line: cli imports the stages, never the other way round.
"""

from __future__ import annotations

import argparse


def add_decoding_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
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
