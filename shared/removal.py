"""A user's removal: their messages still waiting in the inbox first, then what the store keeps.

    the user's kept, unanswered activities → withdrawn: text-free stubs (a parked turn of theirs
      dropped) → each of those conversations' heads touched → the store's removal (`forget_user`)

A turn already running for one of those messages loaded its window before the touch, so its
conditional commit fails; it then finds its messages withdrawn and stores nothing (`TurnRunner`'s
`still_wanted`, checked after every load of the window). A turn that committed before the touch
is found by the store's removal. So no text of theirs is stored after the removal returns. A stub
keeps only what ends a stream opened for its message ("Thinking…"): the drain ends it saying the
message was removed at the sender's request, then forgets the stub.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import partial

from .activity import parse_activity
from .errors import BadRequest
from .inbox import Inbox, OrderHead
from .store import ConversationStore, UserData

__all__ = ["forget_user"]

log = logging.getLogger(__name__)

_HEADERS = {"Content-Type": "application/json"}


async def forget_user(store: ConversationStore, inbox: Inbox | None, user_id: str) -> UserData:
    """Remove `user_id`'s waiting messages, then their stored data (`ConversationStore.forget_user`)."""
    if inbox is not None:
        waiting = await inbox.kept_of_user(user_id)
        for conversation_id, activity_ids in waiting.items():
            for activity_id in activity_ids:
                await _withdraw(inbox, conversation_id, activity_id)
            await inbox.change_head(conversation_id, partial(_unparked, gone=frozenset(activity_ids)))
            await store.touch(conversation_id)
        if waiting:
            log.info("removed a user's waiting messages in %d conversation(s)", len(waiting))
    return await store.forget_user(user_id)


async def _withdraw(inbox: Inbox, conversation_id: str, activity_id: str) -> None:
    body = await inbox.load(conversation_id, activity_id)
    if body is None:
        return  # answered meanwhile (the store's removal finds it), or withdrawn already
    try:
        reference = parse_activity(body, _HEADERS).reference()
    except BadRequest:
        reference = {}
    await inbox.withdraw(conversation_id, activity_id, json.dumps(reference).encode())


def _unparked(head: OrderHead, *, gone: frozenset[str]) -> OrderHead | None:
    """The head without its parked turn if that turn waits on removed activities."""
    if head.parked is None or not gone.intersection(head.parked.activity_ids):
        return None
    return replace(head, parked=None)
