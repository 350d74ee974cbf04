"""The chat message and stored-turn value types shared by the store, the prompt and the webhook."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["Attachment", "ChatMessage", "Citation", "Feedback", "Outcome", "Role", "Sender", "StoredTurn",
           "ToolCall", "ToolDecision", "Usage", "utc_day", "utc_now"]

Role = Literal["system", "user", "assistant", "tool"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def utc_day(at: datetime) -> str:
    """The UTC day of an aware datetime, as YYYY-MM-DD (sorts as it counts)."""
    return at.astimezone(UTC).date().isoformat()


@dataclass(frozen=True, kw_only=True)
class Sender:
    """Who sent a user message: the channel's user ID (`from.id`) and, in Teams, the user's Entra
    object ID (`from.aadObjectId`). Either may name the user in a data request."""

    id: str | None = None
    aad_id: str | None = None

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value for value in (self.aad_id, self.id) if value))


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """One function call an assistant message asks for; `arguments` is the model's JSON text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    @classmethod
    def from_openai(cls, data: dict[str, Any]) -> ToolCall:
        function = data.get("function") or {}
        return cls(id=str(data["id"]), name=str(function.get("name", "")),
                   arguments=str(function.get("arguments") or "{}"))


@dataclass(frozen=True, kw_only=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Of `prompt_tokens`, those the provider served from its prompt cache (a repeated prefix).
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                     completion_tokens=self.completion_tokens + other.completion_tokens,
                     cached_tokens=self.cached_tokens + other.cached_tokens)


@dataclass(frozen=True, kw_only=True)
class Feedback:
    """A user's rating of a reply (Teams' like / dislike buttons), with their comment."""

    reaction: Literal["like", "dislike"]
    text: str = ""
    at: datetime = field(default_factory=utc_now)


@dataclass(frozen=True, kw_only=True)
class Citation:
    """A source a reply cites as `[position]`: what a tool returned it with (title, URL, snippet)."""

    position: int
    title: str
    url: str | None = None
    snippet: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"position": self.position, "title": self.title, "url": self.url,
                "snippet": self.snippet}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Citation:
        return cls(position=int(data["position"]), title=str(data.get("title") or ""),
                   url=data.get("url") if isinstance(data.get("url"), str) else None,
                   snippet=str(data.get("snippet") or ""))


#: What became of a tool call held back for a person (`shared/pause.py`).
Outcome = Literal["approved", "denied", "expired", "superseded"]


@dataclass(frozen=True, kw_only=True)
class ToolDecision:
    """A person's answer to a held-back tool call (or its lapse), stored with the call's result.

    `arguments_sha256`: the SHA-256 of the exact arguments the person approved; a call runs only
    when its own arguments hash to it. `by` and `by_id`: who answered (display name, channel ID);
    None for an expired or superseded call."""

    outcome: Outcome
    at: datetime
    #: Why the call was held back: `approval` (an `ask` tool).
    reason: str = "approval"
    by: str | None = None
    by_id: str | None = None
    arguments_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "outcome": self.outcome, "at": self.at.isoformat(),
                "by": self.by, "byId": self.by_id, "argumentsSha256": self.arguments_sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ToolDecision:
        """Read back from storage: a wrong outcome or time raises ValueError."""
        outcome = data.get("outcome")
        if outcome not in ("approved", "denied", "expired", "superseded"):
            raise ValueError(f"not a decision outcome: {str(outcome)[:40]!r}")
        at = datetime.fromisoformat(str(data.get("at")))
        if at.tzinfo is None:
            raise ValueError("a decision's time must say its time zone")
        return cls(outcome=outcome, at=at, reason=str(data.get("reason") or "approval"),
                   by=_text_or_none(data.get("by")), by_id=_text_or_none(data.get("byId")),
                   arguments_sha256=_text_or_none(data.get("argumentsSha256")))


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, kw_only=True)
class Attachment:
    """A file or image that came with a user message, as stored: never its bytes (the text the
    model read of a text file is in the message's content)."""

    name: str
    content_type: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "contentType": self.content_type, "size": self.size}


@dataclass(frozen=True, kw_only=True)
class ChatMessage:
    """A message as the model sees it, plus what we keep beside it (activity, time, model, usage)."""

    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    #: Tool messages: the tool's name (kept for the log and the history endpoint). User messages:
    #: the speaker's display name, set in group chats only (the prompt sends it; `speakers.py`).
    name: str | None = None
    activity_id: str | None = None
    timestamp: datetime = field(default_factory=utc_now)
    model: str | None = None
    usage: Usage | None = None
    #: The user stopped this reply while it streamed: `content` is what they had seen.
    stopped: bool = False
    #: The user's rating of this reply, if any (the newest replaces the one before).
    feedback: Feedback | None = None
    #: User messages: who sent it (kept so a user's data can be found and removed on request).
    sender: Sender | None = None
    #: Final replies: the sources the text cites as [1], [2]... (shown by Teams as citations).
    citations: tuple[Citation, ...] = ()
    #: User messages: the files and images that came with it (`shared/attachments.py`).
    attachments: tuple[Attachment, ...] = ()
    #: Tool messages of a call held back for a person: their answer (`shared/pause.py`).
    decision: ToolDecision | None = None

    def to_openai(self) -> dict[str, Any]:
        """The Chat Completions form of this message."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message

    def tool_calls_json(self) -> str | None:
        if not self.tool_calls:
            return None
        return json.dumps([call.to_openai() for call in self.tool_calls], ensure_ascii=False)


@dataclass(frozen=True, kw_only=True)
class StoredTurn:
    """What one committed activity wrote: its messages in order, and whether its reply went out."""

    conversation_id: str
    activity_id: str
    messages: tuple[ChatMessage, ...]
    delivered: bool = False
    #: Every activity the turn answered (a burst has several; `activity_id` is among them).
    activity_ids: tuple[str, ...] = ()

    @property
    def answered(self) -> tuple[str, ...]:
        """The activities this turn answered."""
        return self.activity_ids or (self.activity_id,)

    @property
    def reply(self) -> ChatMessage | None:
        """The turn's final assistant message (the text the user sees)."""
        for message in reversed(self.messages):
            if message.role == "assistant" and not message.tool_calls:
                return message
        return None
