"""chatstate's core: durable, concurrency-safe conversation memory and the bot turn around it.

The names most code needs are here; each lives in a small module of its own:
settings (`settings`), errors (`errors`), the store (`store`), the prompt (`prompt`),
tools (`tools`), the webhook turn (`bot`) and the composition root (`runtime`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import ChatstateError
    from .messages import ChatMessage, StoredTurn
    from .prompt import ChatPrompt, ConversationMemory, PromptResult
    from .tools import Function, tool

#: Where each name lives: imported on first use, so `import shared.settings` stays light.
_HOMES = {"ChatstateError": "errors", "ChatMessage": "messages", "StoredTurn": "messages",
          "ChatPrompt": "prompt", "ConversationMemory": "prompt", "PromptResult": "prompt",
          "Function": "tools", "tool": "tools"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = [
    "ChatMessage",
    "ChatPrompt",
    "ChatstateError",
    "ConversationMemory",
    "Function",
    "PromptResult",
    "StoredTurn",
    "tool",
]
