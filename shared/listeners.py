"""What a turn tells the ones watching it while it runs: the reply's text so far, and each round's
tool calls (a floor below the model client and the prompt, which both take them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from .messages import ToolCall

__all__ = ["TextListener", "ToolListener"]

#: Called with a streamed reply's text so far.
TextListener = Callable[[str], Awaitable[None]]
#: Called with the tool calls of a round, before they run.
ToolListener = Callable[[Sequence[ToolCall]], Awaitable[None]]
