"""Bot Framework activities: the inbound request checks, and the activities we send in reply."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = ["AI_GENERATED", "MAX_BODY_BYTES", "Activity", "parse_activity"]

MAX_BODY_BYTES = 1_000_000
_MENTION = re.compile(r"<at[^>]*>.*?</at>", re.IGNORECASE | re.DOTALL)
#: The entity that marks a message as AI-generated (Teams shows the "AI generated" label).
AI_GENERATED = {"type": "https://schema.org/Message", "@type": "Message",
                "@context": "https://schema.org", "@id": "", "additionalType": ["AIGeneratedContent"]}


@dataclass(frozen=True, kw_only=True)
class Activity:
    """The fields of an activity the bot uses; `raw` keeps the whole JSON object."""

    raw: dict[str, Any]
    type: str
    id: str
    conversation_id: str
    channel_id: str
    service_url: str
    text: str
    delivery_mode: str

    @property
    def expects_replies(self) -> bool:
        return self.delivery_mode == "expectReplies"

    @property
    def sender(self) -> dict[str, Any]:
        value = self.raw.get("from")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def recipient(self) -> dict[str, Any]:
        value = self.raw.get("recipient")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def in_group(self) -> bool:
        """A group chat or a channel: several people talk to the bot in one conversation."""
        conversation = self.raw.get("conversation")
        if not isinstance(conversation, dict):
            return False
        return conversation.get("isGroup") is True or \
            conversation.get("conversationType") in ("groupChat", "channel")

    @property
    def speaker(self) -> str | None:
        """Who sent the message, by display name, in a group chat (None in a one-to-one chat)."""
        name = self.sender.get("name")
        if not self.in_group or not isinstance(name, str):
            return None
        return name.strip() or None

    def members_added(self) -> list[dict[str, Any]]:
        members = self.raw.get("membersAdded")
        return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []

    def text_for_model(self) -> str:
        """The message text with @mentions removed."""
        return _MENTION.sub("", self.text).strip()

    def reply(self, text: str, *, ai: bool) -> dict[str, Any]:
        """A message answering this activity; `ai` marks it AI-generated."""
        outgoing = {**self._addressed("message"), "text": text}
        locale = self.raw.get("locale")
        if isinstance(locale, str) and locale:
            outgoing["locale"] = locale
        if ai:
            outgoing["entities"] = [dict(AI_GENERATED)]
        return outgoing

    def typing(self) -> dict[str, Any]:
        """A typing indicator in this activity's conversation."""
        return self._addressed("typing")

    def _addressed(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "replyToId": self.id, "conversation": {"id": self.conversation_id},
                "from": self.recipient, "recipient": self.sender, "channelId": self.channel_id}


def parse_activity(body: bytes, headers: Mapping[str, str]) -> Activity:
    """The activity in a POST body, or a `BadRequest` (400/413/415) that says what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body is {len(body):,} bytes; the limit is {MAX_BODY_BYTES:,}")
    content_type = _header(headers, "content-type").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType(f"expected Content-Type application/json, got {content_type!r}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object (an activity)")
    conversation = data.get("conversation")
    conversation_id = conversation.get("id") if isinstance(conversation, dict) else None
    fields = {"type": data.get("type"), "id": data.get("id"), "conversation.id": conversation_id}
    missing = [name for name, value in fields.items() if not isinstance(value, str) or not value]
    if missing:
        raise BadRequest(f"the activity lacks {', '.join(missing)}")
    text = data.get("text")
    return Activity(
        raw=data,
        type=str(data["type"]),
        id=str(data["id"]),
        conversation_id=str(conversation_id),
        channel_id=str(data.get("channelId") or ""),
        service_url=str(data.get("serviceUrl") or ""),
        text=text if isinstance(text, str) else "",
        delivery_mode=str(data.get("deliveryMode") or "normal"),
    )


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return ""
