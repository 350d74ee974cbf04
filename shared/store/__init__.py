"""Durable conversation memory: the store contract and its Table Storage and in-memory backends."""

from ._base import (
    MAX_MESSAGE_CHARS,
    MAX_TURN_BYTES,
    MAX_TURN_MESSAGES,
    ConversationStore,
    ConversationWindow,
    FoldJob,
    check_turn,
)
from ._head import SUMMARY_MAX_CHARS
from ._memory import InMemoryConversationStore
from ._table import TableConversationStore

__all__ = [
    "MAX_MESSAGE_CHARS",
    "MAX_TURN_BYTES",
    "MAX_TURN_MESSAGES",
    "SUMMARY_MAX_CHARS",
    "ConversationStore",
    "ConversationWindow",
    "FoldJob",
    "InMemoryConversationStore",
    "TableConversationStore",
    "check_turn",
]
