"""chatstate's core: durable, concurrency-safe conversation memory and the bot turn around it.

The names most code needs are here; each lives in a small module of its own:
settings (`settings`), errors (`errors`), the store (`store`), the prompt (`prompt`),
tools (`tools`), the webhook turn (`bot`) and the composition root (`runtime`).
"""

from .errors import ChatstateError
from .messages import ChatMessage, StoredTurn
from .prompt import ChatPrompt, ConversationMemory, PromptResult
from .tools import Function, tool

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
