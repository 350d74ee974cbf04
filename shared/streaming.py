"""A reply streamed into a Teams chat by Teams' rules: informative updates, cumulative text, final.

The contract (Teams platform docs, "Stream bot messages"): updates are `typing` activities with a
`streaminfo` entity; the first answers 201 with the stream's ID, later ones carry it; text is
cumulative; at most one request a second, each sent after the previous one answered; the final
`message` holds the whole text and `streamType: final` with no sequence; a stream ends within two
minutes. 403 `ContentStreamNotAllowed` says why (not allowed, canceled by user, ...), 429 means
too fast.

What this class decides: the first update is refused (403, or any 4xx) → `fallback`, and the turn
answers with one ordinary message; the user pressed Stop → `canceled`, the model's stream is
closed (the listener raises `ReplyStopped`) and nothing more is sent; 429 or a failed update →
that update is skipped and the pace halves; a reply that would pass the size or time limit ends
with what fits and a note that says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .activity import Activity
from .connector import BotConnector
from .errors import ConnectorError
from .prompt import ReplyStopped

__all__ = ["MAX_STREAM_CHARS", "MAX_STREAM_SECONDS", "ReplyStream", "StreamStart"]

log = logging.getLogger(__name__)

#: Teams refuses a message over about 28 KB; keep the text well inside it.
MAX_STREAM_CHARS = 20_000
#: Teams ends a stream after 2 minutes; leave room for the final message.
MAX_STREAM_SECONDS = 100.0
MAX_INFORMATIVE_CHARS = 1_000
CUT_FOR_SIZE = "\n\n[The answer stops here: it was too long for one message.]"
CUT_FOR_TIME = "\n\n[The answer stops here: it took too long to write.]"


@dataclass(frozen=True, kw_only=True)
class StreamStart:
    """A stream opened elsewhere: its ID, the last `streamSequence` sent, and when (epoch s)."""

    stream_id: str
    sequence: int
    sent_at: float


def _canceled(exc: ConnectorError) -> bool:
    """Teams' refusal when the user pressed Stop: 403 "Content stream was cancelled by user"."""
    status, detail = exc.answer or (0, "")
    return status == 403 and "cancel" in detail.lower()


class ReplyStream:
    """One turn's stream. `shown` is the text the user has seen; `fallback` / `canceled` say how
    it ended early. Updates go out from one background task, so the model is never slowed."""

    def __init__(self, *, connector: BotConnector, activity: Activity, min_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 resume: StreamStart | None = None, updates: bool = True,
                 paced_after: float | None = None) -> None:
        """`resume`: continue a stream another process opened (the webhook's informative
        update), with the next sequence number and its pace. `updates=False`: send only the
        final message (a retried turn, whose earlier attempt may have used later sequences).
        `paced_after`: when (epoch s) the chat's previous stream sent its last request: Teams
        takes one streaming request a second in a chat, across its streams."""
        self._connector = connector
        self._activity = activity
        self._min_interval = min_interval
        self._interval = min_interval
        self._clock = clock
        self._started = clock()
        self._stream_id: str | None = None
        self._sequence = 0
        self._last_sent = -float("inf")
        if paced_after is not None:
            self._last_sent = clock() - max(0.0, time.time() - paced_after)
        if resume is not None:
            self._stream_id, self._sequence = resume.stream_id, resume.sequence
            since = max(0.0, time.time() - resume.sent_at)
            self._started = clock() - since
            self._last_sent = max(self._last_sent, clock() - since)
        self._prefix = ""  # text shown in earlier rounds of tool calls
        self._latest = ""
        self._pending_informative: str | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._pump: asyncio.Task[None] | None = None
        self._updates = updates
        self.shown = ""
        self.fallback = False
        self.canceled = False
        self.refused = False  # a later update was refused: send no more updates

    @property
    def start(self) -> StreamStart | None:
        """Where the stream stands (its ID, the last sequence sent), for `resume` elsewhere."""
        if self._stream_id is None or not self.streaming:
            return None
        return StreamStart(stream_id=self._stream_id, sequence=self._sequence,
                           sent_at=time.time() - (self._clock() - self._last_sent))

    async def open(self, text: str) -> StreamStart | None:
        """Send the informative update `text` now, and wait for its answer: the stream's start,
        or None when the channel refused to stream (`fallback`)."""
        if self.streaming and self._stream_id is None:
            await self._pace()  # the chat's previous stream may have sent a moment ago
            await self._update("informative", text[:MAX_INFORMATIVE_CHARS])
        return self.start

    @property
    def last_request_at(self) -> float | None:
        """When (epoch s) this stream last sent a request; None: it sent none."""
        if self._last_sent == -float("inf"):
            return None
        return time.time() - (self._clock() - self._last_sent)

    @property
    def streaming(self) -> bool:
        """Still a live stream (not fallen back, canceled or refused)."""
        return not (self.fallback or self.canceled or self.refused)

    def inform(self, text: str) -> None:
        """An informative update ("Looking that up…"), while no reply text has been shown."""
        if self.streaming and not self.shown:
            self._pending_informative = text[:MAX_INFORMATIVE_CHARS]
            self._kick()

    def new_round(self) -> None:
        """The model called tools: its next text continues after what was shown (cumulative)."""
        self._prefix = f"{self._latest}\n\n" if self._latest else ""

    async def on_text(self, text: str) -> None:
        """The model's text so far (this round). Raises `ReplyStopped` to stop the model."""
        if self.canceled:
            raise ReplyStopped(self.shown, stopped=True)
        full = self._prefix + text
        if len(full) > MAX_STREAM_CHARS:
            raise ReplyStopped(full[:MAX_STREAM_CHARS - len(CUT_FOR_SIZE)] + CUT_FOR_SIZE)
        if self._clock() - self._started > MAX_STREAM_SECONDS:
            raise ReplyStopped(full + CUT_FOR_TIME)
        self._latest = full
        if self.streaming:
            self._kick()

    async def finish(self, final: dict[str, Any]) -> str | None:
        """Send `final` (a message activity) as the stream's end; the reply's activity ID.

        When the stream never started or was refused, `final` goes out as an ordinary message."""
        await self._stop_pump()
        if self.canceled:
            return None
        if self._stream_id is None or self.refused or self.fallback:
            return await self._send(final)
        info = {"type": "streaminfo", "streamId": self._stream_id, "streamType": "final"}
        channel_data = {**final.get("channelData", {}), "streamId": self._stream_id,
                        "streamType": "final"}
        streamed = {**final, "entities": [*final.get("entities", []), info],
                    "channelData": channel_data}
        for attempt in range(3):
            await self._pace()
            try:
                return await self._send(streamed) or self._stream_id
            except ConnectorError as exc:
                status = exc.answer[0] if exc.answer else 0
                if status == 429 and attempt < 2:
                    self._interval *= 2
                    continue
                if not 400 <= status < 500:
                    raise
                if _canceled(exc):
                    log.info("the user stopped the stream before its final message")
                    self.canceled = True
                    return None
                log.warning("the stream's final message was refused (%s); sending it as a "
                            "message", status)
                break
            finally:  # the chat's next stream request keeps Teams' pace after this one
                self._last_sent = self._clock()
        return await self._send(final)

    async def close(self) -> None:
        """Stop sending (a turn that ends without a final message)."""
        await self._stop_pump()

    # -- the updates -------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self._updates:
            return
        if self._pump is None:
            self._pump = asyncio.create_task(self._run())
        self._wake.set()

    async def _stop_pump(self) -> None:
        self._closed = True
        self._wake.set()
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)

    async def _run(self) -> None:
        while not self._closed and self.streaming:
            await self._wake.wait()
            self._wake.clear()
            if self._closed or not self.streaming:
                return
            await self._pace()
            if self._closed:
                return  # the final message carries the whole text
            if self._pending_informative is not None and not self.shown:
                text, self._pending_informative = self._pending_informative, None
                await self._update("informative", text)
            elif self._latest and self._latest != self.shown:
                await self._update("streaming", self._latest)

    async def _pace(self) -> None:
        wait = self._last_sent + self._interval - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _update(self, kind: str, text: str) -> None:
        self._sequence += 1
        info: dict[str, Any] = {"type": "streaminfo", "streamType": kind,
                                "streamSequence": self._sequence}
        channel_data: dict[str, Any] = {"streamType": kind, "streamSequence": self._sequence}
        if self._stream_id is not None:
            info["streamId"] = channel_data["streamId"] = self._stream_id
        update = {**self._activity.typing(), "text": text, "entities": [info],
                  "channelData": channel_data}
        try:
            reply_id = await self._send(update)
        except ConnectorError as exc:
            self._refused(exc, kind)
            return
        finally:
            self._last_sent = self._clock()
        if self._stream_id is None:
            self._stream_id = reply_id
        self._interval = self._min_interval
        if kind == "streaming":
            self.shown = text

    def _refused(self, exc: ConnectorError, kind: str) -> None:
        status, detail = exc.answer or (0, "")
        if _canceled(exc):
            log.info("the user stopped the stream")
            self.canceled = True
        elif self._stream_id is None and 400 <= status < 500 and status != 429:
            log.info("streaming refused (%s %s); answering with one message", status, detail[:200])
            self.fallback = True
        elif status == 403 or (400 <= status < 500 and status != 429):
            log.warning("a stream update was refused (%s %s); no more updates", status, detail[:200])
            self.refused = True
        else:  # 429, 5xx, unreachable: skip this update, slow down
            self._interval = min(self._interval * 2, 8.0)
            self._sequence -= 1  # the next update takes this number again
            log.info("a %s update was not taken (%s); slowing to one per %.0f s", kind,
                     status or "unreachable", self._interval)

    async def _send(self, activity: dict[str, Any]) -> str | None:
        return await self._connector.send(service_url=self._activity.service_url,
                                          conversation_id=self._activity.conversation_id,
                                          activity=activity)
