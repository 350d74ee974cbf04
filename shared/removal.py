"""A user's removal: their messages still waiting in the inbox first, then what the store keeps.

    the user's kept, unanswered activities → removed (a parked turn of theirs too)
      → each of those conversations' heads touched → the store's removal (`forget_user`)

A turn already running for one of those messages loaded its window before the touch, so its
conditional commit fails; it then finds its inbox rows gone and stores nothing (`TurnRunner`'s
`still_wanted`, checked after every load of the window). A turn that committed before the touch
is found by the store's removal. So no text of theirs is stored after the removal returns.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

from .inbox import Inbox, OrderHead
from .store import ConversationStore, UserData

__all__ = ["forget_user"]

log = logging.getLogger(__name__)


async def forget_user(store: ConversationStore, inbox: Inbox | None, user_id: str) -> UserData:
    """Remove `user_id`'s waiting messages, then their stored data (`ConversationStore.forget_user`)."""
    if inbox is not None:
        waiting = await inbox.kept_of_user(user_id)
        for conversation_id, activity_ids in waiting.items():
            await inbox.remove(conversation_id, activity_ids)
            await inbox.change_head(conversation_id, partial(_unparked, gone=frozenset(activity_ids)))
            await store.touch(conversation_id)
        if waiting:
            log.info("removed a user's waiting messages in %d conversation(s)", len(waiting))
    return await store.forget_user(user_id)


def _unparked(head: OrderHead, *, gone: frozenset[str]) -> OrderHead | None:
    """The head without its parked turn if that turn waits on removed activities."""
    if head.parked is None or not gone.intersection(head.parked.activity_ids):
        return None
    return replace(head, parked=None)
