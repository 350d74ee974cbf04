"""Bot Framework activities: the inbound request checks, the text, and the activities we send.

`parse_activity` refuses, with a `BadRequest` naming the problem, anything a later step could not
use or send back: a body over 1 MB, JSON nested deeper than `MAX_DEPTH`, a lone surrogate in any
string (it cannot be stored or sent as UTF-8), a required field missing, a field the bot reads of
the wrong type. So a turn that starts can finish. `Activity.message_text` is the text as the bot
reads it: its own @mention removed, other people's mentions as their names, in linear time.
`Activity.reply()` and `Activity.typing()` build what goes back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from .messages import Citation, Feedback, Sender
from .speakers import clean_name

__all__ = ["AI_GENERATED", "MAX_BODY_BYTES", "MAX_DEPTH", "Activity", "ai_entity",
           "parse_activity"]

MAX_BODY_BYTES = 1_000_000
#: A message carries at most this many citations (a reply citing more keeps the first ones).
MAX_CITATIONS = 20
MAX_FEEDBACK_CHARS = 5_000
_CONVERSATION_REFERENCE = ("conversationType", "tenantId", "isGroup")
#: The entity that marks a message as AI-generated (Teams shows the "AI generated" label).
AI_GENERATED = {"type": "https://schema.org/Message", "@type": "Message",
                "@context": "https://schema.org", "@id": "", "additionalType": ["AIGeneratedContent"]}
#: Nesting deeper than this is refused: what we echo back (from, recipient) must re-encode safely.
MAX_DEPTH = 64
#: Optional top-level fields the bot reads as text: when given (not null), they must be strings.
_TEXT_FIELDS = ("text", "locale", "serviceUrl", "channelId", "deliveryMode")
#: A sender ID names a user-index partition (the store keeps at most this many characters of it):
#: a longer one is refused when the activity is read, before any model call is paid for.
MAX_SENDER_ID_CHARS = 1_024
_SENDER_IDS = ("id", "aadObjectId")
#: An opening `<at>` (attributes allowed) or a closing `</at>`. `[^<>]*` stops at the next tag, so
#: a scan never runs past it: linear in the text, unlike `<at[^>]*>.*?</at>` (quadratic when
#: the tags never close: 224 KB of `<at>` held a worker for 46 s).
_MENTION_TAG = re.compile(r"<at(?:\s[^<>]*)?>|</at\s*>", re.IGNORECASE)


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
    def user(self) -> Sender:
        """The sender's IDs: the channel's (`from.id`) and, in Teams, the Entra object ID."""
        sender = self.sender
        ids = [sender.get(name) for name in ("id", "aadObjectId")]
        return Sender(id=ids[0] if isinstance(ids[0], str) and ids[0] else None,
                      aad_id=ids[1] if isinstance(ids[1], str) and ids[1] else None)

    @property
    def tenant_id(self) -> str | None:
        """The Entra tenant of the conversation (`conversation.tenantId`, else Teams'
        `channelData.tenant.id`); None when the channel names none (or one no key can hold)."""
        conversation, channel = self.raw.get("conversation"), self.raw.get("channelData")
        tenant = channel.get("tenant") if isinstance(channel, dict) else None
        for value in (conversation.get("tenantId") if isinstance(conversation, dict) else None,
                      tenant.get("id") if isinstance(tenant, dict) else None):
            if isinstance(value, str) and 0 < len(value) <= MAX_SENDER_ID_CHARS:
                return value
        return None

    @property
    def time_zone(self) -> str | None:
        """The sender's IANA time zone as the channel gives it (`localTimezone`), if any."""
        zone = self.raw.get("localTimezone")
        return zone if isinstance(zone, str) and 0 < len(zone) <= 64 else None

    @property
    def recipient(self) -> dict[str, Any]:
        value = self.raw.get("recipient")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def message_text(self) -> str:
        """The text as the bot reads it: its own `<at>` mention removed, other people's mentions as
        their names (`<at>Ada</at>` → `Ada`), trimmed. Unpaired tags stay as written.

        The bot's mention is one whose `mention` entity names `recipient.id`, or whose name is the
        bot's (`recipient.name`, or the name in such an entity).
        """
        text = self.text
        if "<" not in text:
            return text.strip()
        bot_texts, bot_names = self._bot_mentions()
        pieces: list[str] = []
        done = 0
        opened: re.Match[str] | None = None
        for tag in _MENTION_TAG.finditer(text):
            if not tag.group().startswith("</"):
                opened = tag  # a later opening tag replaces an unclosed one
                continue
            if opened is None:
                continue
            pieces.append(text[done:opened.start()])
            name = text[opened.end():tag.start()]
            whole = text[opened.start():tag.end()]
            if whole not in bot_texts and name.strip().casefold() not in bot_names:
                pieces.append(name)
            done, opened = tag.end(), None
        pieces.append(text[done:])
        return "".join(pieces).strip()

    def _bot_mentions(self) -> tuple[set[str], set[str]]:
        """The bot's mention texts (from entities) and names (casefolded)."""
        recipient = self.recipient
        bot_id = recipient.get("id")
        texts: set[str] = set()
        names = {recipient["name"].strip().casefold()} if isinstance(recipient.get("name"), str) else set()
        entities = self.raw.get("entities")
        for entity in entities if isinstance(entities, list) and bot_id else []:
            if not isinstance(entity, dict) or entity.get("type") != "mention":
                continue
            mentioned = entity.get("mentioned")
            if not isinstance(mentioned, dict) or mentioned.get("id") != bot_id:
                continue
            if isinstance(entity.get("text"), str):
                texts.add(entity["text"])
            if isinstance(mentioned.get("name"), str):
                names.add(mentioned["name"].strip().casefold())
        names.discard("")
        return texts, names

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
        """Who sent the message, by display name, in a group chat (None in a one-to-one chat):
        on one line and bounded (`clean_name`), as it reaches the model and the transcript."""
        name = self.sender.get("name")
        if not self.in_group or not isinstance(name, str):
            return None
        return clean_name(name)

    def members_added(self) -> list[dict[str, Any]]:
        members = self.raw.get("membersAdded")
        return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []

    @property
    def conversation_type(self) -> str:
        conversation = self.raw.get("conversation")
        kind = conversation.get("conversationType") if isinstance(conversation, dict) else None
        return kind if isinstance(kind, str) else ""

    @property
    def can_stream(self) -> bool:
        """Teams (and the Agents Playground, which speaks as Teams) streams in personal chats only."""
        return (self.channel_id == "msteams" and self.conversation_type == "personal"
                and not self.expects_replies)

    def feedback(self) -> Feedback | None:
        """The rating in a Teams feedback invoke (`message/submitAction`, `actionName` feedback)."""
        value = self.raw.get("value")
        if self.type != "invoke" or self.raw.get("name") != "message/submitAction" or \
                not isinstance(value, dict) or value.get("actionName") != "feedback":
            return None
        action = value.get("actionValue")
        if not isinstance(action, dict) or action.get("reaction") not in ("like", "dislike"):
            raise BadRequest("a feedback invoke needs actionValue.reaction like or dislike")
        text = ""
        try:
            details = json.loads(action.get("feedback") or "{}")
            if isinstance(details, dict) and isinstance(details.get("feedbackText"), str):
                text = details["feedbackText"][:MAX_FEEDBACK_CHARS]
        except (TypeError, ValueError):
            pass  # a comment we cannot read is no reason to lose the reaction
        return Feedback(reaction=action["reaction"], text=text)

    def reply(self, text: str, *, ai: bool, feedback: bool = False,
              citations: Sequence[Citation] = ()) -> dict[str, Any]:
        """A message answering this activity; `ai` marks it AI-generated, `feedback` shows Teams'
        like / dislike buttons under it, `citations` the sources its [n] markers cite (Teams'
        `citation` claims on the AI entity)."""
        outgoing = {**self._addressed("message"), "text": text}
        if feedback:
            outgoing["channelData"] = {"feedbackLoop": {"type": "default"}}
        locale = self.raw.get("locale")
        if isinstance(locale, str) and locale:
            outgoing["locale"] = locale
        if ai:
            outgoing["entities"] = [ai_entity(citations)]
        return outgoing

    def typing(self) -> dict[str, Any]:
        """A typing indicator in this activity's conversation."""
        return self._addressed("typing")

    def _addressed(self, kind: str) -> dict[str, Any]:
        """An activity back into this conversation: its reference as the SDKs copy it (the
        conversation's ID, type, tenant and group flag; from and recipient swapped)."""
        inbound = self.raw.get("conversation")
        conversation = {name: inbound[name] for name in _CONVERSATION_REFERENCE
                        if isinstance(inbound, dict) and name in inbound}
        return {"type": kind, "replyToId": self.id,
                "conversation": {**conversation, "id": self.conversation_id},
                "from": self.recipient, "recipient": self.sender, "channelId": self.channel_id}


def ai_entity(citations: Sequence[Citation] = ()) -> dict[str, Any]:
    """The AI label entity, with Teams' citations (schema.org `Claim`s) when the text cites any.

    The shape is Teams' "Bot messages with AI-generated content": each claim's `position` is the
    n of an [n] in the text; its appearance is a `DigitalDocument` (name at most 80 characters,
    abstract at most 160; we send at most `MAX_CITATIONS` claims).
    """
    entity: dict[str, Any] = dict(AI_GENERATED)
    claims = []
    for citation in list(citations)[:MAX_CITATIONS]:
        appearance: dict[str, Any] = {"@type": "DigitalDocument", "name": citation.title[:80],
                                      "abstract": citation.snippet[:160] or citation.title[:160]}
        if citation.url:
            appearance["url"] = citation.url
        claims.append({"@type": "Claim", "position": citation.position, "appearance": appearance})
    if claims:
        entity["citation"] = claims
    return entity


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
    except RecursionError:
        raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object (an activity)")
    _check_tree(data)
    conversation = data.get("conversation")
    conversation_id = conversation.get("id") if isinstance(conversation, dict) else None
    fields = {"type": data.get("type"), "id": data.get("id"), "conversation.id": conversation_id}
    missing = [name for name, value in fields.items() if not isinstance(value, str) or not value]
    if missing:
        raise BadRequest(f"the activity lacks {', '.join(missing)}")
    wrong = [name for name in _TEXT_FIELDS if data.get(name) is not None
             and not isinstance(data[name], str)]
    if wrong:
        raise BadRequest(f"{', '.join(wrong)} must be a string")
    _check_sender_ids(data.get("from"))
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


def _check_sender_ids(sender: object) -> None:
    """Refuse a sender ID the store could not keep (`MAX_SENDER_ID_CHARS`), naming the field."""
    if not isinstance(sender, dict):
        return
    for name in _SENDER_IDS:
        value = sender.get(name)
        if isinstance(value, str) and len(value) > MAX_SENDER_ID_CHARS:
            raise BadRequest(f"from.{name} must have at most {MAX_SENDER_ID_CHARS} characters, "
                             f"got {len(value):,}")


def _check_tree(data: dict[str, Any]) -> None:
    """Refuse nesting deeper than `MAX_DEPTH` and any string (or key) holding a lone surrogate.

    Iterative, so depth costs no stack; a surrogate is named by its path (`from.name`).
    """
    stack: list[tuple[dict[str, Any] | list[Any], tuple[str | int, ...]]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise BadRequest(f"the activity nests deeper than {MAX_DEPTH} levels")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and not _is_unicode(key):
                raise BadRequest(f"a field name in {_dotted(path) or 'the activity'} is not valid "
                                 "Unicode (a lone surrogate)")
            if isinstance(value, str):
                if not _is_unicode(value):
                    raise BadRequest(f"{_dotted((*path, key))} is not valid Unicode (a lone "
                                     "surrogate)")
            elif isinstance(value, dict | list):
                stack.append((value, (*path, key)))


def _is_unicode(value: str) -> bool:
    """False for a string with a lone surrogate (JSON "\\ud800"): UTF-8 cannot encode it."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dotted(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return ""
