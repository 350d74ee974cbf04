"""The turn's logging context: every log line names its conversation and activity, and is bounded.

`turn_context(conversation_id, activity_id)` binds the IDs for the current task (a contextvar, so
tasks the turn starts inherit them); every record logged meanwhile, by any logger, ends with
`[conversation=… activity=…]` and carries the IDs as `conversation_id` / `activity_id` attributes.
A message is cut at `MAX_LOG_CHARS`: no input can make a log line unbounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["MAX_LOG_CHARS", "install", "turn_context"]

MAX_LOG_CHARS = 2_000
_MAX_ID_CHARS = 200

_ids: ContextVar[tuple[str, str] | None] = ContextVar("chatstate_turn", default=None)


@contextmanager
def turn_context(conversation_id: str, activity_id: str) -> Iterator[None]:
    token = _ids.set((_short(conversation_id), _short(activity_id)))
    try:
        yield
    finally:
        _ids.reset(token)


class _TurnRecord(logging.LogRecord):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ids = _ids.get()
        self.conversation_id: str | None = ids[0] if ids is not None else None
        self.activity_id: str | None = ids[1] if ids is not None else None

    def getMessage(self) -> str:
        text = super().getMessage()
        if len(text) > MAX_LOG_CHARS:
            text = f"{text[:MAX_LOG_CHARS]}…[{len(text) - MAX_LOG_CHARS:,} more characters]"
        if self.conversation_id is not None:
            text += f" [conversation={self.conversation_id!r} activity={self.activity_id!r}]"
        return text


def install() -> None:
    """Make every logger's records `_TurnRecord`s (idempotent)."""
    if logging.getLogRecordFactory() is not _TurnRecord:
        logging.setLogRecordFactory(_TurnRecord)


def _short(value: str) -> str:
    return value if len(value) <= _MAX_ID_CHARS else f"{value[:_MAX_ID_CHARS]}…"
