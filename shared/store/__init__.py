"""Durable conversation memory: the store contract and its Table Storage and in-memory backends."""

from ._base import (
    CAPABILITIES,
    MAX_MESSAGE_CHARS,
    MAX_TURN_BYTES,
    MAX_TURN_MESSAGES,
    REMOVED_MARKER,
    Capability,
    ConversationStore,
    ConversationWindow,
    FoldJob,
    Indexed,
    PurgeReport,
    UserConversation,
    UserData,
    check_turn,
)
from ._head import SUMMARY_MAX_CHARS
from ._memory import InMemoryConversationStore
from ._table import TableConversationStore
from ._wire import Operation, TableWire, TransactionFailed

__all__ = [
    "CAPABILITIES",
    "MAX_MESSAGE_CHARS",
    "MAX_TURN_BYTES",
    "MAX_TURN_MESSAGES",
    "REMOVED_MARKER",
    "SUMMARY_MAX_CHARS",
    "Capability",
    "ConversationStore",
    "ConversationWindow",
    "FoldJob",
    "InMemoryConversationStore",
    "Indexed",
    "Operation",
    "PurgeReport",
    "TableConversationStore",
    "TableWire",
    "TransactionFailed",
    "UserConversation",
    "UserData",
    "check_turn",
]
