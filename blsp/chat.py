"""`blsp chat`: a terminal conversation; text lines, or `/audio PATH [text]` to speak."""

from __future__ import annotations

import shlex
import sys
from typing import Any

from .errors import BlspError
from .inference import ChatSession
from .modeling import BlspModel

HELP = """Type a message, or:
  /audio PATH [text]   send an audio file (and optional text after it)
  /reset               forget the conversation
  /quit                leave"""


def parse_line(line: str) -> list[dict] | str:
    """A user line -> content parts, or a command word ('reset', 'quit', 'help')."""
    if line.startswith("/audio"):
        words = shlex.split(line)
        if len(words) < 2:
            raise BlspError("usage: /audio PATH [text]")
        parts = [{"type": "audio", "audio": words[1]}]
        if len(words) > 2:
            parts.append({"type": "text", "text": " ".join(words[2:])})
        return parts
    if line in ("/reset", "/quit", "/help"):
        return line[1:]
    return [{"type": "text", "text": line}]


def run_chat(model_dir: str, max_new_tokens: int = 128, system_prompt: str | None = None,
             strict: bool = True, **gen: Any) -> int:
    """`gen`: more of `generate`'s options for every reply (the loop guards of `blsp chat`)."""
    model = BlspModel.from_pretrained(model_dir, strict=strict)
    session = ChatSession(model, max_new_tokens=max_new_tokens, system_prompt=system_prompt, **gen)
    print(HELP)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            parsed = parse_line(line)
            if parsed == "quit":
                break
            if parsed == "reset":
                session.history.clear()
                print("(conversation reset)")
                continue
            if parsed == "help":
                print(HELP)
                continue
            print(f"assistant: {session.send(parsed)}", flush=True)
        except (BlspError, ValueError) as err:
            # A bad line (missing audio file, too long) must not end the conversation.
            print(f"error: {err}", file=sys.stderr, flush=True)
    return 0
