"""Rows of the conversations table: key layout, and messages to and from entities.

One partition per conversation (`encode_key(conversation_id)`), three kinds of row in it:

    h                 the head (`_head.py`): original conversation ID, last sequence number, the
                      recent activity IDs, and a copy of the newest turns; its ETag guards
                      every commit
    m<13 digits>      one message; the digits are 9999999999999 - seq, so newest sorts first and
                      one range query returns the head followed by the newest messages
    t<activity key>   the marker of a committed activity: its messages' seq range, delivered flag

Index partitions sit beside the conversations (`~idx-day-<YYYY-MM-DD>`, `~idx-user-<user key>`, one
row per conversation, row key = the conversation's partition key). `encode_key` writes a `~` only
as `~XX` (two hex digits) or `~~<hash>`, so no conversation's partition key starts with `~i`.

Text longer than `CHUNK_CHARS` is split over `name`, `name_1`, `name_2`... because a string
property holds at most 64 KiB (32,768 UTF-16 code units; `CHUNK_CHARS` code points never exceed it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from ..keys import encode_key
from ..messages import Attachment, ChatMessage, Citation, Feedback, Sender, ToolCall, ToolDecision, Usage

HEAD = "h"
MESSAGE_PREFIX = "m"
MESSAGES_END = "n"  # every message row key is below this
MARKER_PREFIX = "t"
MARKERS_END = "u"  # every marker row key is below this
DAY_INDEX = "~idx-day-"
USER_INDEX = "~idx-user-"
CHUNK_CHARS = 16_000
_MAX_SEQ = 9_999_999_999_999

Entity = dict[str, Any]


def message_row_key(seq: int) -> str:
    return f"{MESSAGE_PREFIX}{_MAX_SEQ - seq:013d}"


def day_index_key(day: str) -> str:
    """The partition listing the conversations last active on `day` (YYYY-MM-DD)."""
    return DAY_INDEX + day


def user_index_key(user_id: str) -> str:
    """The partition listing the conversations `user_id` spoke in."""
    return USER_INDEX + encode_key(user_id)


def marker_row_key(activity_id: str) -> str:
    return MARKER_PREFIX + encode_key(activity_id)


def group_turns(rows: Iterable[Entity]) -> list[list[Entity]]:
    """Message rows (oldest first) as turns: a turn is a user message and what follows it (the
    replies, tool calls and results); rows before the first user message make a turn of their
    own. The one place that says what a turn is, for the copy, the fold and the row reads."""
    turns: list[list[Entity]] = []
    for row in rows:
        if row["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(row)
    return turns


def whole_turns_newest_first(rows: list[Entity]) -> list[Entity]:
    """`rows` (newest first) without the oldest turn when it was cut short (its user message
    missing): whole turns only."""
    end = len(rows)
    while end and rows[end - 1]["role"] != "user":
        end -= 1
    return rows[:end]


def put_text(entity: Entity, name: str, text: str | None) -> None:
    if text is None:
        return
    parts = [text[start:start + CHUNK_CHARS] for start in range(0, len(text), CHUNK_CHARS)] or [""]
    entity[name] = parts[0]
    for index, part in enumerate(parts[1:], start=1):
        entity[f"{name}_{index}"] = part
    if len(parts) > 1:
        entity[f"{name}_parts"] = len(parts)


def get_text(entity: Entity, name: str) -> str | None:
    if name not in entity:
        return None
    parts = int(entity.get(f"{name}_parts", 1))
    return str(entity[name]) + "".join(str(entity[f"{name}_{index}"]) for index in range(1, parts))


def message_entity(pk: str, seq: int, message: ChatMessage, *, tokens: int, turn_seq: int,
                   activity_id: str) -> Entity:
    entity: Entity = {
        "PartitionKey": pk,
        "RowKey": message_row_key(seq),
        "seq": seq,
        "turn_seq": turn_seq,
        "role": message.role,
        "tokens": tokens,
        # A burst's user messages keep their own activity's ID; the rest, the turn's.
        "activity_id": message.activity_id or activity_id,
        "timestamp": message.timestamp,
    }
    put_text(entity, "content", message.content)
    put_text(entity, "tool_calls", message.tool_calls_json())
    for name in ("tool_call_id", "name", "model"):
        if (value := getattr(message, name)) is not None:
            entity[name] = value
    if message.stopped:
        entity["stopped"] = True
    if message.sender is not None:
        if message.sender.id:
            entity["from_id"] = message.sender.id
        if message.sender.aad_id:
            entity["from_aad"] = message.sender.aad_id
    if message.attachments:
        put_text(entity, "attachments", json.dumps([a.to_json() for a in message.attachments],
                                                   ensure_ascii=False))
    if message.usage is not None:
        entity["prompt_tokens"] = message.usage.prompt_tokens
        entity["completion_tokens"] = message.usage.completion_tokens
        entity["cached_tokens"] = message.usage.cached_tokens
    if message.citations:
        put_text(entity, "citations", json.dumps([c.to_json() for c in message.citations],
                                                 ensure_ascii=False))
    if message.decision is not None:
        put_text(entity, "decision", json.dumps(message.decision.to_json(), ensure_ascii=False))
    return entity


def entity_message(entity: Entity) -> ChatMessage:
    tool_calls_json = get_text(entity, "tool_calls")
    calls = tuple(ToolCall.from_openai(call) for call in json.loads(tool_calls_json)) \
        if tool_calls_json else ()
    usage = None
    if "prompt_tokens" in entity:
        usage = Usage(prompt_tokens=int(entity["prompt_tokens"]),
                      completion_tokens=int(entity.get("completion_tokens", 0)),
                      cached_tokens=int(entity.get("cached_tokens", 0)))
    timestamp = entity.get("timestamp")
    if isinstance(timestamp, datetime) and timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return ChatMessage(
        role=entity["role"],
        content=get_text(entity, "content"),
        tool_calls=calls,
        tool_call_id=entity.get("tool_call_id"),
        name=entity.get("name"),
        activity_id=entity.get("activity_id"),
        timestamp=timestamp if isinstance(timestamp, datetime) else datetime.now(UTC),
        model=entity.get("model"),
        usage=usage,
        stopped=bool(entity.get("stopped", False)),
        feedback=entity_feedback(entity),
        sender=Sender(id=entity.get("from_id"), aad_id=entity.get("from_aad"))
        if "from_id" in entity or "from_aad" in entity else None,
        citations=tuple(Citation.from_json(item) for item in json.loads(
            get_text(entity, "citations") or "[]")),
        attachments=tuple(Attachment(name=a["name"], content_type=a["contentType"], size=a["size"])
                          for a in json.loads(get_text(entity, "attachments") or "[]")),
        decision=_decision(get_text(entity, "decision")),
    )


def _decision(text: str | None) -> ToolDecision | None:
    """A stored decision; one that cannot be read is dropped (the tool result says what happened)."""
    if not text:
        return None
    try:
        return ToolDecision.from_json(json.loads(text))
    except (ValueError, TypeError, AttributeError):
        return None


def feedback_properties(feedback: Feedback) -> Entity:
    """The properties a rating adds to its reply's message row."""
    properties: Entity = {"feedback_reaction": feedback.reaction, "feedback_at": feedback.at}
    put_text(properties, "feedback_text", feedback.text)
    return properties


def entity_feedback(entity: Entity) -> Feedback | None:
    reaction = entity.get("feedback_reaction")
    if reaction not in ("like", "dislike"):
        return None
    at = entity.get("feedback_at")
    return Feedback(reaction=reaction, text=get_text(entity, "feedback_text") or "",
                    at=at if isinstance(at, datetime) else datetime.now(UTC))
