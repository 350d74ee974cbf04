"""A turn paused at a tool call: the calls held back and why, the turn so far, and its decisions.

When the model calls a tool that must wait for a person (an `ask` tool waits for an approval),
the prompt stops before it runs any call of that round and raises `ToolCallsHeld` with a
`PausedTurn`: the user's message(s), the earlier rounds (tool calls and results), the assistant
message asking for this round's calls, what the model calls cost so far, and which calls are
held and why. It is plain JSON (`to_json` / `from_json`), so it can rest in storage while no
worker waits, and `ChatPrompt.resume` continues it on any instance with a `ToolDecision` per held
call:

- an approved call runs with the exact arguments stored here, and only if they hash to the
  SHA-256 the person approved (`arguments_sha256`, checked again where the call is made);
- a denied, expired or superseded call does not run: the model reads a tool result saying so
  (`declined_reason`), and the stored result keeps the decision (who, when);
- the round's other calls run as they would have.

`from_json` checks what it reads back (roles, types, that every held call is in the round), and
raises ValueError for anything else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .messages import Attachment, ChatMessage, Citation, Sender, ToolCall, ToolDecision, Usage
from .tools import Source

__all__ = [
    "FORMAT",
    "HeldCall",
    "PausedTurn",
    "ToolCallsHeld",
    "arguments_sha256",
    "decisions_for",
    "declined_reason",
    "round_sha256",
]

#: The version of the JSON form (a later change of form bumps it; an unknown one is refused).
FORMAT = 1
_ROLES = ("system", "user", "assistant", "tool")


def arguments_sha256(arguments: str) -> str:
    """The SHA-256 (hex) of a call's arguments exactly as the model wrote them."""
    return hashlib.sha256(arguments.encode("utf-8", "surrogatepass")).hexdigest()


def round_sha256(calls: Sequence[ToolCall]) -> str:
    """The SHA-256 (hex) of several calls' names and exact arguments, in order: what one answer
    to one card approves."""
    canonical = json.dumps([[call.name, arguments_sha256(call.arguments)] for call in calls])
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class HeldCall:
    """A tool call of the round that may not run yet, and why: `approval` (an `ask` tool)."""

    call_id: str
    reason: str = "approval"


@dataclass(frozen=True, kw_only=True)
class PausedTurn:
    """The turn so far; its last message is the assistant message asking for the held round."""

    messages: tuple[ChatMessage, ...]
    held: tuple[HeldCall, ...]
    #: What the turn's model calls cost so far (billed, whatever happens next).
    usage: Usage
    model: str
    #: The turn's sources so far, numbered from 1 as the model cites them.
    sources: tuple[Source, ...] = ()
    #: Tool rounds run before the held one.
    rounds: int = 0

    def __post_init__(self) -> None:
        if not self.messages or not self.messages[-1].tool_calls:
            raise ValueError("a paused turn ends with the assistant message asking for tool calls")
        ids = {call.id for call in self.messages[-1].tool_calls}
        if not self.held or any(held.call_id not in ids for held in self.held):
            raise ValueError("every held call must be a call of the paused round")

    @property
    def round(self) -> tuple[ToolCall, ...]:
        """The calls of the held round, in the model's order."""
        return self.messages[-1].tool_calls

    def held_calls(self) -> list[tuple[ToolCall, HeldCall]]:
        """The held calls with their reasons, in the model's order."""
        reasons = {held.call_id: held for held in self.held}
        return [(call, reasons[call.id]) for call in self.round if call.id in reasons]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "rounds": self.rounds,
                "usage": _usage_json(self.usage),
                "held": [{"callId": held.call_id, "reason": held.reason} for held in self.held],
                "sources": [{"title": s.title, "url": s.url, "snippet": s.snippet}
                            for s in self.sources],
                "messages": [_message_json(message) for message in self.messages]}

    @classmethod
    def from_json(cls, data: Any) -> PausedTurn:
        """The paused turn in `data` (read back from storage); ValueError if it is not one."""
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("not a paused turn of a known format")
            return cls(messages=tuple(_message(item) for item in _list(data, "messages")),
                       held=tuple(HeldCall(call_id=_str(item, "callId"), reason=_str(item, "reason"))
                                  for item in _list(data, "held")),
                       usage=_usage(data.get("usage")), model=_str(data, "model"),
                       sources=tuple(Source(title=_str(item, "title"), url=_opt(item, "url"),
                                            snippet=_opt(item, "snippet") or "")
                                     for item in _list(data, "sources")),
                       rounds=_int(data, "rounds"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a paused turn: {type(exc).__name__}") from None


class ToolCallsHeld(Exception):
    """Raised by the prompt when a round holds calls back: `paused` is the turn so far."""

    def __init__(self, paused: PausedTurn) -> None:
        super().__init__("the turn waits for a decision on a tool call")
        self.paused = paused


def declined_reason(decision: ToolDecision | None, call: ToolCall) -> str | None:
    """Why a held call may not run (what the model reads), or None: it was approved, for exactly
    these arguments."""
    if decision is None:
        return "not run: nobody has answered for this call"
    if decision.outcome == "approved":
        if decision.arguments_sha256 != arguments_sha256(call.arguments):
            return "not run: the approval was for other arguments"
        return None
    return {"denied": "not approved: the person asked denied this call, so it did not run; do not "
                      "try it again unless they ask",
            "expired": "not approved: nobody answered in time, so it did not run",
            "superseded": "not run: the user sent a new message instead of answering"
            }[decision.outcome]


def decisions_for(paused: PausedTurn, decision: ToolDecision) -> Mapping[str, ToolDecision]:
    """One decision for every held call of the round (one card answers them all)."""
    return {held.call_id: decision for held in paused.held}


# -- the JSON form of a message -------------------------------------------------------------------


def _message_json(message: ChatMessage) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content,
                            "timestamp": message.timestamp.isoformat()}
    if message.tool_calls:
        data["toolCalls"] = [call.to_openai() for call in message.tool_calls]
    for key, value in (("toolCallId", message.tool_call_id), ("name", message.name),
                       ("activityId", message.activity_id), ("model", message.model)):
        if value is not None:
            data[key] = value
    if message.usage is not None:
        data["usage"] = _usage_json(message.usage)
    if message.sender is not None:
        data["sender"] = {"id": message.sender.id, "aadId": message.sender.aad_id}
    if message.citations:
        data["citations"] = [citation.to_json() for citation in message.citations]
    if message.attachments:
        data["attachments"] = [attachment.to_json() for attachment in message.attachments]
    if message.decision is not None:
        data["decision"] = message.decision.to_json()
    return data


def _message(data: Any) -> ChatMessage:
    if not isinstance(data, dict) or data.get("role") not in _ROLES:
        raise ValueError("a stored message needs a known role")
    timestamp = datetime.fromisoformat(_str(data, "timestamp"))
    sender = data.get("sender")
    return ChatMessage(
        role=data["role"], content=_opt(data, "content"),
        tool_calls=tuple(ToolCall.from_openai(call) for call in _list(data, "toolCalls")),
        tool_call_id=_opt(data, "toolCallId"), name=_opt(data, "name"),
        activity_id=_opt(data, "activityId"), model=_opt(data, "model"),
        timestamp=timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC),
        usage=_usage(data["usage"]) if "usage" in data else None,
        sender=Sender(id=_opt(sender, "id"), aad_id=_opt(sender, "aadId"))
        if isinstance(sender, dict) else None,
        citations=tuple(Citation.from_json(item) for item in _list(data, "citations")),
        attachments=tuple(Attachment(name=_str(item, "name"), content_type=_str(item, "contentType"),
                                     size=_int(item, "size")) for item in _list(data, "attachments")),
        decision=ToolDecision.from_json(data["decision"]) if "decision" in data else None)


def _usage_json(usage: Usage) -> dict[str, int]:
    return {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens,
            "cached": usage.cached_tokens}


def _usage(data: Any) -> Usage:
    return Usage(prompt_tokens=_int(data, "prompt"), completion_tokens=_int(data, "completion"),
                 cached_tokens=_int(data, "cached"))


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    return value


def _str(data: Any, key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be text")
    return value


def _opt(data: Any, key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be text")
    return value


def _int(data: Any, key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a whole number")
    return value
