"""The delivery: what a turn shows while it works, the reply it sends, and the delivered mark.

`progress()` opens a turn's progress: a stream with its informative update where the channel
streams (or the stream the webhook opened, resumed), else a typing indicator. `reply()` sends a
committed turn's reply (the stream's final message, or an ordinary message), marks it delivered,
and, when the user pressed Stop before the final message, records what was shown as stopped.
`reply_activity()` is the one place a committed reply becomes an activity (add citations,
suggested actions and attachments there). A reply too long for one message goes out in parts
(`shared/parts.py`): a stream continues in new messages (`shared/streaming.py`), an ordinary
reply is sent as several messages, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .activity import Activity
from .connector import BotConnector
from .errors import ConnectorError, StoreError
from .messages import StoredTurn
from .parts import split_activity
from .settings import Settings
from .store import ConversationStore
from .streaming import ReplyStream, StreamClock, StreamLimits, StreamStart
from .suggestions import suggested_actions

__all__ = ["Delivery", "Progress"]

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a turn shows while it works: a stream, or a typing indicator, or nothing."""

    stream: ReplyStream | None = None
    typing: asyncio.Task[None] | None = None
    #: Told when the stream's last request went out (epoch s), once it is closed.
    on_closed: Callable[[float], None] | None = None

    async def close(self) -> None:
        if self.typing is not None:
            await asyncio.gather(self.typing, return_exceptions=True)
        if self.stream is not None:
            await self.stream.close()
            if self.on_closed is not None and (at := self.stream.last_request_at) is not None:
                self.on_closed(at)


class Delivery:
    def __init__(self, *, settings: Settings, store: ConversationStore, connector: BotConnector,
                 clock: StreamClock | None = None) -> None:
        """`clock`: the time streams count their limits in (a test runs it faster)."""
        self.settings = settings
        self.store = store
        self.connector = connector
        self.clock = clock or StreamClock()
        self.limits = StreamLimits(keepalive_seconds=settings.streaming_keepalive_seconds)
        #: When each chat's latest stream (of this process) sent its last request, so the next
        #: stream keeps Teams' pace of one streaming request a second per chat.
        self._streamed: dict[str, float] = {}

    # -- while the turn works ----------------------------------------------------------------

    def progress(self, activity: Activity, *, resume: StreamStart | None = None,
                 updates: bool = True, paced_after: float = 0.0) -> Progress:
        """A stream with its informative update where the channel streams (`resume`: the one the
        webhook opened); else a typing indicator (none when the reply is the response).
        `paced_after`: when (epoch s) the chat's last stream request went out, as far as
        another process knows (the order head's `streamed_at`)."""
        if self.settings.streaming and activity.can_stream:
            conversation = activity.conversation_id
            stream = self._stream(activity, resume=resume, updates=updates,
                                  paced_after=paced_after)
            if resume is None:
                stream.inform(self.settings.streaming_informative)
            else:  # the stream shows "Thinking…" already: keep it alive while the model thinks
                stream.keep_alive()
            return Progress(stream=stream, on_closed=lambda at: self._paced(conversation, at))
        if activity.expects_replies:
            return Progress()
        return Progress(typing=asyncio.create_task(self._send_typing(activity)))

    def _paced(self, conversation_id: str, at: float) -> None:
        now = time.time()
        for old in [key for key, when in self._streamed.items() if now - when > 5.0]:
            del self._streamed[old]  # past Teams' pace: nothing left to keep
        self._streamed[conversation_id] = at

    async def open_stream(self, activity: Activity, *,
                          paced_after: float = 0.0) -> StreamStart | None:
        """Send the informative update now (the webhook, before it returns; a queued turn
        before it works, to keep the stream's start with its message): the stream's start, or
        None where the channel does not stream."""
        if not (self.settings.streaming and activity.can_stream):
            return None
        stream = self._stream(activity, paced_after=paced_after)
        return await stream.open(self.settings.streaming_informative)

    def _stream(self, activity: Activity, *, resume: StreamStart | None = None,
                updates: bool = True, paced_after: float = 0.0) -> ReplyStream:
        """A stream paced after the chat's previous one (`paced_after`, or this process's)."""
        paced = max(paced_after, self._streamed.get(activity.conversation_id, 0.0)) or None
        return ReplyStream(connector=self.connector, activity=activity, resume=resume,
                           updates=updates, paced_after=paced, limits=self.limits,
                           clock=self.clock)

    # -- replies -----------------------------------------------------------------------------

    def reply_activity(self, activity: Activity, turn: StoredTurn, *,
                       suggestions: Sequence[str] = ()) -> dict[str, Any]:
        """The activity that carries a committed turn's reply (`suggestions`: its buttons)."""
        reply = turn.reply
        outgoing = activity.reply(reply.content if reply is not None and reply.content else "",
                                  ai=True, feedback=self.settings.feedback,
                                  citations=reply.citations if reply is not None else ())
        if suggestions:
            outgoing["suggestedActions"] = suggested_actions(suggestions)
        return outgoing

    async def reply(self, activity: Activity, turn: StoredTurn, *,
                    progress: Progress | None = None,
                    suggestions: Sequence[str] = ()) -> dict[str, Any] | None:
        """Deliver a committed turn's reply and mark it delivered. With expectReplies nothing is
        sent: the activity to put in the response is returned."""
        reply = turn.reply
        if reply is not None and reply.stopped:
            await self._mark_delivered(activity, turn, reply_id=None)  # the user saw all there is
            return None
        outgoing = self.reply_activity(activity, turn, suggestions=suggestions)
        if activity.expects_replies:
            return outgoing
        stream = progress.stream if progress is not None else None
        reply_id = await self.send(activity, outgoing, stream=stream)
        if stream is not None and stream.canceled and reply is not None:
            await self._mark_stopped(activity, shown=stream.shown)
        await self._mark_delivered(activity, turn, reply_id=reply_id)
        return None

    async def text(self, activity: Activity, text: str, *,
                   progress: Progress | None = None) -> dict[str, Any] | None:
        """A fixed reply (welcome, limits, apology): sent, or returned with expectReplies."""
        outgoing = activity.reply(text, ai=False)
        if activity.expects_replies:
            return outgoing
        await self.send(activity, outgoing, stream=progress.stream if progress else None)
        return None

    async def send(self, activity: Activity, outgoing: dict[str, Any], *,
                   stream: ReplyStream | None = None) -> str | None:
        """Send `outgoing`: as the end of `stream` when one is open, else as a message (as
        several, in order, when it is too long for one); the ID of the last."""
        if stream is not None:
            return await stream.finish(outgoing)
        reply_id = None
        for part in split_activity(outgoing):
            reply_id = await self.connector.send(service_url=activity.service_url,
                                                 conversation_id=activity.conversation_id,
                                                 activity=part)
        return reply_id

    async def _mark_delivered(self, activity: Activity, turn: StoredTurn, *,
                              reply_id: str | None) -> None:
        try:  # every activity the turn answered (a burst's), the reply's own last
            await self.store.mark_delivered(activity.conversation_id, activity.id,
                                            reply_id=reply_id,
                                            more_activity_ids=[a for a in turn.answered
                                                               if a != activity.id])
        except StoreError as exc:  # the reply went out: a failure now would get it sent twice
            log.warning("reply delivered but not recorded: %s", exc)

    async def _mark_stopped(self, activity: Activity, *, shown: str) -> None:
        """The user pressed Stop as the final message went out: keep what they saw."""
        try:
            await self.store.mark_stopped(activity.conversation_id, activity.id, shown=shown)
        except StoreError as exc:
            log.warning("the stop was not recorded: %s", exc)
        else:
            log.info("the reply was stopped on its final message; kept what was shown")

    async def _send_typing(self, activity: Activity) -> None:
        try:
            await self.connector.send(service_url=activity.service_url,
                                      conversation_id=activity.conversation_id,
                                      activity=activity.typing())
        except ConnectorError as exc:
            log.info("typing indicator not sent: %s", exc)
