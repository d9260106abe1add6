"""Errors a user can act on.

Every error the CLI turns into a one-line message (no traceback) derives from `BlspError`.
Errors tied to an input line carry the file and line so the message can name them.
"""

from __future__ import annotations


class BlspError(Exception):
    """An error caused by the user's input or settings, reported without a traceback."""


class InputError(BlspError):
    """A bad input line: names the file and (1-based) line number."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path, self.line, self.reason = path, line, message
        where = f"{path}:{line}: " if path is not None and line is not None else f"{path}: " if path else ""
        super().__init__(f"{where}{message}")


class CheckpointError(BlspError):
    """A checkpoint that does not fit the models or settings it is used with."""


class SpeechStatesError(BlspError):
    """A model that cannot give the speech states asked for (Whisper's decoder states need its tokenizer)."""
