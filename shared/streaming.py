"""A reply streamed into a Teams chat by Teams' rules: informative updates, cumulative text, final;
a long answer continued in new messages instead of cut.

The contract (Teams platform docs, "Stream bot messages"): updates are `typing` activities with a
`streaminfo` entity; the first answers 201 with the stream's ID, later ones carry it; text is
cumulative; at most one request a second, each sent after the previous one answered; the final
`message` holds the whole text and `streamType: final` with no sequence; a stream ends within two
minutes, one stream per chat at a time, and a message holds about 28 KB. 403
`ContentStreamNotAllowed` says why (not allowed, canceled by user, ...), 429 means too fast.

What this class decides: the first update is refused (403, or any 4xx) → `fallback`, and the turn
answers with ordinary messages; the user pressed Stop → `canceled`, the model's stream is closed
(the listener raises `ReplyStopped`) and nothing more is sent; 429 or a failed update → that update
is skipped and the pace halves. While no text flows (the model thinks, tools run) an update goes
out at least every `keepalive_seconds` (Microsoft 365 Copilot wants one within 15 s and then every
45 s). When the stream nears two minutes (`part_seconds`) or its text nears the size a message
holds (`part_bytes`), the stream ends with a final message holding the answer so far, cut where
`shared/parts.py` says, and a new stream goes on with the rest, after that final was answered:
the answer arrives whole, in order, in as many messages as it needs. `shown` is what the user has
seen of the whole answer, across parts (what a Stop keeps).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from .activity import Activity
from .connector import BotConnector
from .errors import ConnectorError
from .parts import MAX_ACTIVITY_BYTES, close, cut, split_activity, wire_size
from .prompt import ReplyStopped

__all__ = ["CLOCK_SLACK", "MAX_STREAM_SECONDS", "ReplyStream", "StreamClock", "StreamLimits",
           "StreamStart"]

log = logging.getLogger(__name__)

#: Teams ends a stream after 2 minutes: a part's stream ends at this age, with room for its final.
MAX_STREAM_SECONDS = 100.0
MAX_INFORMATIVE_CHARS = 1_000
#: The final of a stream that ran out of time before the model wrote a word (not stored).
STILL_WORKING = "Still working on your answer: it follows in a new message."
#: The informative text of a stream that has none of its own.
WORKING = "Working on it…"


@dataclass(frozen=True, kw_only=True)
class StreamStart:
    """A stream opened elsewhere: its ID, the last `streamSequence` sent, and when (epoch s);
    `started_at`: when its first update went out (None: at `sent_at`)."""

    stream_id: str
    sequence: int
    sent_at: float
    started_at: float | None = None


#: Seconds by which a wall-clock time from another process (or instance) may be off: a pace
#: counted from one waits this much longer (the torture saw a request 0.999 s after another).
CLOCK_SLACK = 0.05


@dataclass(frozen=True, kw_only=True)
class StreamLimits:
    """When a stream speaks without being asked, and when a part ends."""

    #: Seconds between requests of one stream (Teams: one a second).
    min_interval: float = 1.0
    #: At most this many seconds without an update, while no text flows.
    keepalive_seconds: float = 30.0
    #: A part's stream ends at this age (Teams allows two minutes).
    part_seconds: float = MAX_STREAM_SECONDS
    #: A part's text holds at most this many bytes, leaving room for its final's entities.
    part_bytes: int = MAX_ACTIVITY_BYTES - 6_000


@dataclass(frozen=True)
class StreamClock:
    """The time a stream's limits are counted in. `scale` > 1 runs it that many times faster than
    real time: tests give it to the bot and to the connector stand-in alike, so a 130 s answer
    takes 13 s at scale 10 and every limit and pace holds as it would."""

    scale: float = 1.0

    def now(self) -> float:
        return time.monotonic() * self.scale

    def since(self, epoch: float) -> float:
        """Stream seconds since `epoch` (a wall-clock time, from another process)."""
        return max(0.0, time.time() - epoch) * self.scale

    def epoch(self, ago: float) -> float:
        """The wall-clock time `ago` stream seconds back."""
        return time.time() - ago / self.scale

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.scale)

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        """Until `event` is set, or `seconds` have passed."""
        try:
            async with asyncio.timeout(max(0.0, seconds) / self.scale):
                await event.wait()
        except TimeoutError:
            pass


def _canceled(exc: ConnectorError) -> bool:
    """Teams' refusal when the user pressed Stop: 403 "Content stream was cancelled by user"."""
    status, detail = exc.answer or (0, "")
    return status == 403 and "cancel" in detail.lower()


class ReplyStream:
    """One turn's stream, in as many parts as the answer needs. `fallback` / `canceled` say how
    it ended early. Updates go out from one background task, so the model is never slowed."""

    def __init__(self, *, connector: BotConnector, activity: Activity, min_interval: float | None = None,
                 limits: StreamLimits | None = None, clock: StreamClock | None = None,
                 resume: StreamStart | None = None, updates: bool = True,
                 paced_after: float | None = None) -> None:
        """`resume`: continue a stream another process opened (the webhook's informative
        update), with the next sequence number and its pace. `updates=False`: send only the
        final message (a retried turn, whose earlier attempt may have used later sequences).
        `paced_after`: when (epoch s) the chat's previous stream sent its last request: Teams
        takes one streaming request a second in a chat, across its streams."""
        self._connector = connector
        self._activity = activity
        self._limits = limits or StreamLimits()
        if min_interval is not None:
            self._limits = replace(self._limits, min_interval=min_interval)
        self._interval = self._limits.min_interval
        self._clock = clock or StreamClock()
        self._stream_id: str | None = None
        self._sequence = 0
        self._started = 0.0  # when the current part's stream took its first update
        self._last_sent = -float("inf")
        slack = CLOCK_SLACK * self._clock.scale  # (wall-clock times, read back: see CLOCK_SLACK)
        if paced_after is not None:
            self._last_sent = self._clock.now() - self._clock.since(paced_after) + slack
        if resume is not None:
            self._stream_id, self._sequence = resume.stream_id, resume.sequence
            self._last_sent = max(self._last_sent,
                                  self._clock.now() - self._clock.since(resume.sent_at) + slack)
            self._started = self._clock.now() - self._clock.since(resume.started_at or
                                                                  resume.sent_at)
        self._prefix = ""  # text shown in earlier rounds of tool calls
        self._display = ""  # the whole answer as shown so far: earlier rounds + this round
        self._offset = 0  # where in `_display` the current part starts
        self._reopen = ""  # the fence line the current part reopens a code block with
        self._part_shown = ""  # what the current part's stream shows
        self._informative = ""
        self._pending_informative: str | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._pump: asyncio.Task[None] | None = None
        self._updates = updates
        #: Messages that ended a part before the last (a long answer's earlier parts).
        self.parts = 0
        self.fallback = False
        self.canceled = False
        self.refused = False  # a later update was refused: send no more updates

    @property
    def shown(self) -> str:
        """The text of the answer the user has seen: the parts sent, and this part's stream."""
        return self._display[:self._offset] + self._part_shown.removeprefix(self._reopen)

    @property
    def start(self) -> StreamStart | None:
        """Where the stream stands (its ID, the last sequence sent), for `resume` elsewhere."""
        if self._stream_id is None or not self.streaming:
            return None
        now = self._clock.now()
        return StreamStart(stream_id=self._stream_id, sequence=self._sequence,
                           sent_at=self._clock.epoch(now - self._last_sent),
                           started_at=self._clock.epoch(now - self._started))

    async def open(self, text: str) -> StreamStart | None:
        """Send the informative update `text` now, and wait for its answer: the stream's start,
        or None when the channel refused to stream (`fallback`)."""
        if self.streaming and self._stream_id is None:
            self._informative = text[:MAX_INFORMATIVE_CHARS]
            await self._pace()  # the chat's previous stream may have sent a moment ago
            await self._update("informative", self._informative)
        return self.start

    @property
    def last_request_at(self) -> float | None:
        """When (epoch s) this stream last sent a request; None: it sent none."""
        if self._last_sent == -float("inf"):
            return None
        return self._clock.epoch(self._clock.now() - self._last_sent)

    @property
    def streaming(self) -> bool:
        """Still a live stream (not fallen back, canceled or refused)."""
        return not (self.fallback or self.canceled or self.refused)

    def inform(self, text: str) -> None:
        """An informative update ("Looking that up…"), while this part has shown no text."""
        if self.streaming and not self._part_shown:
            self._pending_informative = self._informative = text[:MAX_INFORMATIVE_CHARS]
            self._kick()

    def keep_alive(self) -> None:
        """Keep the stream (one opened elsewhere) alive while no text flows."""
        if self.streaming:
            self._kick()

    def new_round(self) -> None:
        """The model called tools: its next text continues after what was shown (cumulative)."""
        self._prefix = f"{self._display}\n\n" if self._display else ""

    async def on_text(self, text: str) -> None:
        """The model's text so far (this round). Raises `ReplyStopped` to stop the model."""
        if self.canceled:
            raise ReplyStopped(self.shown, stopped=True)
        self._display = self._prefix + text
        if self.streaming:
            self._kick()

    async def finish(self, final: dict[str, Any]) -> str | None:
        """Send `final` (a message activity) as the end of the answer: what no part has held
        yet, as the stream's final message (and more messages if it is too long for one); the
        ID of the reply's last message. When the stream never started or was refused, it goes
        out as ordinary messages."""
        await self._stop_pump()
        if self.canceled:
            return None
        rest = {**final, "text": self._rest(str(final.get("text") or ""))}
        first, *more = split_activity(rest, claims="last" if self.parts else "each")
        if self._stream_id is None or self.refused or self.fallback:
            reply_id = await self._send(first)
        else:
            reply_id = await self._final(first)
        for part in more:
            if self.canceled:
                break
            reply_id = await self._send(part)
        return None if self.canceled else reply_id

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
            await self._clock.wait(self._wake, self._next_due())
            self._wake.clear()
            if self._closed or not self.streaming:
                return
            await self._pace()
            if self._closed:
                return  # the final message carries the whole text
            try:
                await self._step()
            except ConnectorError as exc:  # a part's final not delivered: the finish sends it
                log.warning("a part of the answer was not delivered (%s); no more updates", exc)
                self.refused = True
            if self._pending():
                self._wake.set()  # more to send: at the next pace, not at the next kick

    def _pending(self) -> bool:
        """Something is waiting to be shown: an informative update, or new text."""
        part = self._reopen + self._display[self._offset:]
        return (self._pending_informative is not None and not self._part_shown) or \
            (len(part) > len(self._reopen) and part != self._part_shown)

    def _next_due(self) -> float:
        """Stream seconds until the pump must act unasked: a keep-alive, or the part's end."""
        now = self._clock.now()
        due = self._last_sent + self._limits.keepalive_seconds
        if self._stream_id is not None:
            due = min(due, self._started + self._limits.part_seconds)
        return due - now

    async def _step(self) -> None:
        """The one request this turn of the pump sends, if any."""
        now = self._clock.now()
        part = self._reopen + self._display[self._offset:]
        if self._stream_id is not None and (now - self._started >= self._limits.part_seconds or
                                            wire_size(part) > self._limits.part_bytes):
            await self._end_part(part, for_time=now - self._started >= self._limits.part_seconds)
        elif self._pending_informative is not None and not self._part_shown:
            text, self._pending_informative = self._pending_informative, None
            await self._update("informative", text)
        elif len(part) > len(self._reopen) and part != self._part_shown:
            await self._update("streaming", self._fitting(part))
        elif now - self._last_sent >= self._limits.keepalive_seconds:
            await self._keep_alive(now)

    def _fitting(self, part: str) -> str:
        """`part`, or as much of it as one update may hold (the rest ends the part next)."""
        if wire_size(part) <= self._limits.part_bytes:
            return part
        return part[:cut(part, limit=self._limits.part_bytes).end]

    async def _keep_alive(self, now: float) -> None:
        """Nothing new to show: say again what was said, so the stream does not fall silent."""
        if self._part_shown:
            await self._update("streaming", self._part_shown)
        else:
            waited = now - self._started if self._stream_id is not None else 0.0
            text = self._informative or WORKING
            if waited >= 1:  # how long, within the 1,000 characters an informative text holds
                text = f"{text[:MAX_INFORMATIVE_CHARS - 16]} ({waited:.0f} s)"
            await self._update("informative", text)

    async def _end_part(self, part: str, *, for_time: bool) -> None:
        """End this part's stream with a final holding the answer so far, cut where
        `shared/parts.py` says (some text always left for the next part, which opens at once),
        and go on in a new stream when the pump next runs."""
        limit = min(self._limits.part_bytes, wire_size(part) - 1)
        place = cut(part, limit=limit, floor=0.75 if for_time else 0.5)
        if not place.clean:  # nothing to end at near the end: anywhere rather than mid-word
            place = cut(part, limit=limit, floor=0.0)
        if place.end <= len(self._reopen):  # no text in this part yet
            text, advance, reopen = STILL_WORKING, 0, self._reopen
            self._pending_informative = self._informative or WORKING
        else:
            text, reopen = close(part, place)
            advance = place.start - len(self._reopen)
        log.info("the answer goes on in a new message (%s; part %d)",
                 "two minutes" if for_time else "size", self.parts + 1)
        await self._final(self._activity.reply(text, ai=True))
        if self.canceled:
            return
        self.parts += 1
        self._offset += advance
        self._reopen = reopen
        self._stream_id, self._sequence, self._part_shown = None, 0, ""
        self._wake.set()  # the next stream starts at the next turn of the pump, paced

    async def _final(self, final: dict[str, Any]) -> str | None:
        """Send `final` as this stream's end; as an ordinary message if the stream refuses it."""
        assert self._stream_id is not None
        info = {"type": "streaminfo", "streamId": self._stream_id, "streamType": "final"}
        channel_data = {**final.get("channelData", {}), "streamId": self._stream_id,
                        "streamType": "final"}
        streamed = {**final, "entities": [*final.get("entities", []), info],
                    "channelData": channel_data}
        for attempt in range(3):
            await self._pace()
            try:
                reply_id = await self._send(streamed) or self._stream_id
                self._last_sent = self._clock.now()
                return reply_id
            except ConnectorError as exc:
                self._last_sent = self._clock.now()
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
        return await self._send(final)

    async def _pace(self) -> None:
        await self._clock.sleep(self._last_sent + self._interval - self._clock.now())

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
            self._last_sent = self._clock.now()
        if self._stream_id is None:
            self._stream_id, self._started = reply_id, self._last_sent
        self._interval = self._limits.min_interval
        if kind == "streaming":
            self._part_shown = text

    def _refused(self, exc: ConnectorError, kind: str) -> None:
        status, detail = exc.answer or (0, "")
        if _canceled(exc):
            log.info("the user stopped the stream")
            self.canceled = True
        elif self._stream_id is None and not self.parts and 400 <= status < 500 and status != 429:
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

    def _rest(self, text: str) -> str:
        """What of the reply's `text` no part has held yet (all of it when no part ended)."""
        if not self._offset and not self._reopen:
            return text
        whole = self._prefix + text
        delivered = self._display[:self._offset]
        if whole.startswith(delivered.rstrip()):
            return self._reopen + whole[min(self._offset, len(whole)):]
        log.warning("the reply is not what the parts began (%d parts sent); sending it whole",
                    self.parts)
        return text

    async def _send(self, activity: dict[str, Any]) -> str | None:
        return await self._connector.send(service_url=self._activity.service_url,
                                          conversation_id=self._activity.conversation_id,
                                          activity=activity)
