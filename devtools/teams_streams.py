"""Teams' streaming contract, enforced as the Bot Connector enforces it, for the local stand-in.

From the Teams platform docs ("Stream bot messages"): only in personal chats (conversation IDs
that start with `a:`; the Agents Playground also reads the activity's `conversationType`), one
stream per chat at a time, over within 2 minutes; updates are `typing`
activities with a `streaminfo` entity (`informative` or `streaming`, `streamSequence` from 1,
increasing); the first answers 201 with the stream's ID, the others carry it and answer 202;
streamed text is cumulative; informative text holds at most 1,000 characters; at most one
streaming request a second in a chat (across its streams), each after the previous one answered
(429 otherwise); the final `message` carries `streamType: final`, the stream ID and no sequence;
nothing after the final. Refusals are 403 `ContentStreamNotAllowed` with the reason in the message,
as Teams words them.

What the bot must never do is recorded for the tests to assert on: `violations` (a request Teams
would refuse as malformed, or one after the stream's two minutes), `overlapping` (a second stream
begun while one is live in the chat: Teams refuses it) and `throttled` (a request that tripped the
one-a-second limit); `open()` lists the streams that never got their final message (a stream the
user stopped has ended). `clock` is the time the limits are measured in: a test may run it faster
than real time (`shared.streaming.StreamClock`), the bot's streams on the same clock, so a 130 s
answer takes 13 s.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Stream", "StreamContract"]

_ids = itertools.count(1)
MAX_SECONDS = 120.0


@dataclass
class Stream:
    id: str
    conversation_id: str
    started: float
    sequence: int = 0
    text: str = ""
    last_request: float = 0.0
    finished: bool = False
    cancel: bool = False
    #: When the final message was taken, and each update (the stream's clock).
    ended: float | None = None
    update_times: list[float] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    #: Seconds between consecutive requests of the stream, as they arrived.
    gaps: list[float] = field(default_factory=list)


class StreamContract:
    """Checks each streamed activity; `answer()` gives the status and body the connector sends."""

    def __init__(self, *, min_interval: float = 1.0, max_seconds: float = MAX_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval = min_interval
        self.max_seconds = max_seconds
        self.clock = clock
        self.streams: dict[str, Stream] = {}
        self.violations: list[str] = []
        #: Requests refused with 429: our pace broke Teams' one streaming request a second.
        self.throttled: list[str] = []
        #: Chats where a second stream was begun while one was active (refused with 403).
        self.overlapping: list[str] = []
        self._last_request: dict[str, float] = {}
        self._busy: set[str] = set()
        self._cancel_after: dict[str, tuple[int, int]] = {}

    def cancel(self, conversation_id: str, *, after_updates: int = 0, stream: int = 1) -> None:
        """The user presses Stop once a stream of the conversation has taken `after_updates`
        updates: the next request is refused as canceled, and so is everything after it.
        `stream`: which one, counting from the stream live now (or, with none, the next one) as 1
        (2: the one after it, as the second part of a long answer)."""
        streams = self.of(conversation_id)
        live = next((index for index, s in enumerate(streams) if self.live(s)), len(streams))
        self._cancel_after[conversation_id] = (after_updates, live + stream - 1)

    def live(self, stream: Stream) -> bool:
        """Not ended, not stopped by the user, and within its two minutes."""
        return not (stream.finished or stream.cancel or
                    self.clock() - stream.started > self.max_seconds)

    def of(self, conversation_id: str) -> list[Stream]:
        return [s for s in self.streams.values() if s.conversation_id == conversation_id]

    def broken(self, conversation_id: str | None = None) -> list[str]:
        """Every rule of Teams the bot broke (in all chats, or one), once its replies are out:
        malformed requests, overlapping streams, throttled requests, streams never ended."""
        def ours(text: str) -> bool:
            return conversation_id is None or text.startswith(conversation_id)

        return [*(f"violation: {v}" for v in self.violations if conversation_id is None),
                *(f"overlapping stream in {c}" for c in self.overlapping if ours(c)),
                *(f"throttled: {t}" for t in self.throttled if ours(t)),
                *(f"never ended: {s.id} in {s.conversation_id}" for s in self.open(conversation_id))]

    def open(self, conversation_id: str | None = None) -> list[Stream]:
        """Streams that never got their final message (all chats, or one); one the user stopped
        has ended."""
        return [s for s in self.streams.values() if not (s.finished or s.cancel)
                and (conversation_id is None or s.conversation_id == conversation_id)]

    def begin(self, conversation_id: str, activity: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """The answer to a streamed activity, or None if it is not one (an ordinary activity)."""
        info = next((e for e in activity.get("entities") or [] if isinstance(e, dict)
                     and e.get("type") == "streaminfo"), None)
        if info is None:
            return None
        now = self.clock()
        conversation = activity.get("conversation") or {}
        if not conversation_id.startswith("a:") or conversation.get("conversationType") != "personal":
            # Teams knows personal chats by their ID; the Agents Playground reads the activity's
            # conversation.conversationType (and refuses a stream without it).
            return self._refuse(403, "Content stream is not allowed on this conversation type.")
        kind = info.get("streamType")
        stream = self.streams.get(str(info.get("streamId")))
        previous = self._last_request.get(conversation_id)
        self._last_request[conversation_id] = now
        if stream is not None:
            if stream.id in self._busy:
                return self._refuse(400, "the previous update has not been answered yet")
            stream.gaps.append(now - stream.last_request)
            stream.last_request = now
        if previous is not None and now - previous < self.min_interval:
            self.throttled.append(f"{conversation_id}: {now - previous:.3f} s after the last "
                                  f"streaming request ({kind} of {info.get('streamId', 'a new stream')}"
                                  f", replying to {activity.get('replyToId')})")
            return 429, {"error": {"code": "TooManyRequests", "message": "Too many requests."}}
        if stream is not None:
            if stream.finished:
                return self._refuse(403, "Content stream has already completed.")
            if now - stream.started > self.max_seconds:
                self.violations.append(f"a request {now - stream.started:.1f} s into a stream "
                                       f"(at most {self.max_seconds:g} s)")
                return self._refuse(403, "Content stream exceeded streaming time.")
            after, index = self._cancel_after.get(conversation_id, (None, 0))
            if stream.cancel or (after is not None and self.of(conversation_id).index(stream) >= index
                                 and len(stream.updates) >= after):
                self._cancel_after.pop(conversation_id, None)
                stream.cancel = True
                return self._refuse(403, "Content stream was cancelled by user.")
        if kind == "final":
            return self._final(stream, activity, info)
        if activity.get("type") != "typing" or kind not in ("informative", "streaming"):
            return self._refuse(400, "a stream update is a typing activity, informative or streaming")
        sequence = info.get("streamSequence")
        if not isinstance(sequence, int):
            return self._refuse(400, "a stream update needs a streamSequence")
        text = str(activity.get("text") or "")
        if kind == "informative" and len(text) > 1_000:
            return self._refuse(400, "informative text holds at most 1,000 characters")
        if stream is None:
            if "streamId" in info:
                return self._refuse(400, "unknown streamId")
            if any(self.live(s) for s in self.of(conversation_id)):
                self.overlapping.append(conversation_id)
                return self._refuse(403, "Content stream is not allowed: another is in progress.")
            if sequence != 1:
                return self._refuse(400, "the first update's streamSequence must be 1")
            stream = Stream(id=f"stream-{next(_ids)}", conversation_id=conversation_id,
                            started=now, last_request=now)
            self.streams[stream.id] = stream
            status = 201
        else:
            if sequence <= stream.sequence:
                return self._refuse(400, "streamSequence must increase")
            status = 202
        if kind == "streaming":
            if not text.startswith(stream.text):
                return self._refuse(403, "Content stream is not cumulative.")
            stream.text = text
        stream.sequence = sequence
        stream.updates.append(activity)
        stream.update_times.append(now)
        return status, {"id": stream.id}

    def answered(self, stream_id: str | None) -> None:
        if stream_id is not None:
            self._busy.discard(stream_id)

    def busy(self, stream_id: str | None) -> None:
        if stream_id is not None:
            self._busy.add(stream_id)

    def _final(self, stream: Stream | None, activity: dict[str, Any],
               info: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if stream is None:
            return self._refuse(400, "a final message needs the streamId of an open stream")
        if activity.get("type") != "message":
            return self._refuse(400, "the final is a message activity")
        if "streamSequence" in info:
            return self._refuse(400, "the final message carries no streamSequence")
        stream.finished = True
        stream.ended = self.clock()
        return 200, {"id": stream.id}

    def _refuse(self, status: int, message: str) -> tuple[int, dict[str, Any]]:
        if status == 400:
            self.violations.append(message)
        code = "ContentStreamNotAllowed" if status == 403 else "BadArgument"
        return status, {"error": {"code": code, "message": message}}
