"""The approval card: what a person sees and answers before an `ask` tool runs.

`approval_card(request)` is an Adaptive Card (1.4) naming the tool and where it runs, with the
arguments the model wants to use as plain text, and **Approve** / **Deny** as `Action.Execute`
(verbs `APPROVE_VERB` / `DENY_VERB`, data: the decision's ID and the SHA-256 of the exact
arguments; an `Action.Submit` fallback for older clients). `answered_card` is the card once decided
(the tool and where it runs, then "Approved by Ada", "Denied by Ada", "Expired", "Not run: you
sent a new message", or "Already decided …" for a second click), without buttons or arguments
(those rest with the turn, not with the record the webhook reads). `fallback_text` says the same in plain
text for channels without Adaptive Cards; the person answers it with a message that
`parse_answer` reads ("approve" or "deny", nothing else).

Everything the model or a person wrote (arguments, display names) goes into `TextRun`s, which
render no markdown; it is cleaned of control and bidi characters, cut to bounds, and its links
are defanged (`https[:]//…`), so nothing on the card is formatted or opens a page the model
chose. Only our own fixed text sits in `TextBlock`s.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .messages import ToolDecision

__all__ = ["APPROVE_VERB", "DENY_VERB", "MAX_ARGUMENTS_CHARS", "MAX_ARGUMENT_CHARS",
           "ApprovalRequest", "ShownCall", "answered_card", "approval_card", "fallback_text",
           "parse_answer", "shown_text"]

APPROVE_VERB = "toolApproval.approve"
DENY_VERB = "toolApproval.deny"
#: One argument's value is shown up to this many characters; all of a call's, up to the second.
MAX_ARGUMENT_CHARS = 300
MAX_ARGUMENTS_CHARS = 1_500
#: At most this many arguments of a call are shown (the rest are counted).
MAX_ARGUMENTS_SHOWN = 12
_CUT = "…"
#: Characters that would change how text reads without showing: controls, bidi and other format
#: characters, line and paragraph separators, private use, surrogates, unassigned.
_HIDDEN = ("Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?=//)")
_WWW = re.compile(r"\bwww\.", re.IGNORECASE)
_ANSWERS = {"approve": "approve", "approved": "approve", "deny": "deny", "denied": "deny"}


@dataclass(frozen=True, kw_only=True)
class ShownCall:
    """A held call as the card shows it: the tool, where it runs, its exact arguments (JSON)."""

    tool: str
    #: `python` (this app) or `mcp:<server>`.
    origin: str
    arguments: str


@dataclass(frozen=True, kw_only=True)
class ApprovalRequest:
    """What a card asks: the decision's ID, the calls, and what binds an answer to them."""

    decision_id: str
    calls: tuple[ShownCall, ...]
    #: The SHA-256 of the calls' exact arguments (`shared/pause.py`'s `round_sha256`).
    sha256: str
    expires_at: datetime
    #: In a group chat, the one person who may answer (display name); None: whoever was asked.
    requester: str | None = None


def approval_card(request: ApprovalRequest) -> dict[str, Any]:
    """The Adaptive Card asking for a decision."""
    data = {"decisionId": request.decision_id, "sha256": request.sha256}
    actions = [_action("Approve", APPROVE_VERB, data, style="positive"),
               _action("Deny", DENY_VERB, data, style="destructive")]
    body: list[dict[str, Any]] = [
        _heading("Approve this action?"),
        *_calls(request.calls),
        _subtle(f"Nothing runs until {'you answer' if request.requester is None else 'they answer'}"
                f". This request expires at {{{{TIME({_iso(request.expires_at)})}}}}."),
    ]
    if request.requester is not None:
        body.append(_rich(("Only ", {}), (shown_text(request.requester, 64), {"weight": "Bolder"}),
                          (" can answer.", {})))
    return _card(body, actions=actions, fallback=fallback_text(request))


def answered_card(request: ApprovalRequest, decision: ToolDecision, *,
                  again: bool = False) -> dict[str, Any]:
    """The card once decided (no buttons); `again`: for a click on a card already decided."""
    outcome = _outcome_line(decision)
    if again:
        outcome = [("Already decided: ", {}), *outcome]
    return _card([_heading("Approval request"), *_calls(request.calls, arguments=False),
                  _rich(*outcome)], fallback=_outcome_text(decision, again=again))


def fallback_text(request: ApprovalRequest) -> str:
    """The request in plain text, for a channel without Adaptive Cards (and a card's
    `fallbackText`): the person replies "approve" or "deny"."""
    lines = ["Approval needed: the assistant wants to run"]
    for call in request.calls:
        lines.append(f"- {call.tool} ({_where(call.origin)}), with:")
        lines += [f"    {name}: {value}" for name, value in _arguments(call.arguments)]
    only = "" if request.requester is None else \
        f" Only {shown_text(request.requester, 64)} can answer."
    lines.append(f'Reply "approve" to run it, or "deny".{only} Nothing runs until then; this '
                 f"request expires at {_clock(request.expires_at)}.")
    return "\n".join(lines)


def parse_answer(text: str) -> Literal["approve", "deny"] | None:
    """A plain-text answer to `fallback_text`: "approve" or "deny" (any case, with or without a
    slash or a closing full stop or exclamation mark, "approved" and "denied" too); anything else
    is None, an ordinary message."""
    word = text.strip().lstrip("/").rstrip(".!").strip().casefold()
    answer = _ANSWERS.get(word)
    return "approve" if answer == "approve" else "deny" if answer == "deny" else None


def shown_text(text: str, limit: int) -> str:
    """`text` as a card or fallback shows text from outside: on one line (hidden characters and
    runs of white space as one space), links defanged, cut to `limit` characters (marked …)."""
    flat = " ".join("".join(" " if unicodedata.category(c) in _HIDDEN else c
                            for c in text[:limit * 2]).split())
    flat = _WWW.sub(lambda m: m.group()[:-1] + "[.]", _SCHEME.sub(r"\1[:]", flat))
    return flat if len(flat) <= limit else flat[:limit - 1] + _CUT


# -- the parts ------------------------------------------------------------------------------------


def _calls(calls: Sequence[ShownCall], *, arguments: bool = True) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for call in calls:
        shows = arguments and call.arguments.strip() not in ("", "{}")
        parts.append(_rich(("Run ", {}), (shown_text(call.tool, 64),
                                          {"fontType": "Monospace", "weight": "Bolder"}),
                           (f" ({_where(call.origin)})", {}), (" with:" if shows else "", {})))
        if not shows:
            continue
        for name, value in _arguments(call.arguments):
            parts.append(_rich((f"{name}: ", {"weight": "Bolder"}),
                               (value, {"fontType": "Monospace"})))
    return parts


def _arguments(arguments: str) -> list[tuple[str, str]]:
    """A call's arguments as (name, value) lines, cleaned and bounded."""
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return [("arguments (not JSON)", shown_text(arguments, MAX_ARGUMENT_CHARS))]
    if not isinstance(parsed, dict):
        return [("arguments", shown_text(json.dumps(parsed, ensure_ascii=False),
                                         MAX_ARGUMENT_CHARS))]
    lines: list[tuple[str, str]] = []
    room = MAX_ARGUMENTS_CHARS
    for index, (name, value) in enumerate(parsed.items()):
        if index == MAX_ARGUMENTS_SHOWN or room <= len(_CUT):
            lines.append(("…", f"{len(parsed) - index} more not shown"))
            break
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        shown = shown_text(text, min(MAX_ARGUMENT_CHARS, room))
        lines.append((shown_text(str(name), 64), shown))
        room -= len(shown)
    return lines


def _outcome_line(decision: ToolDecision) -> list[tuple[str, dict[str, Any]]]:
    by = shown_text(decision.by or "someone", 64)
    if decision.outcome == "approved":
        return [("Approved by ", {"color": "Good"}), (by, {"weight": "Bolder", "color": "Good"})]
    if decision.outcome == "denied":
        return [("Denied by ", {"color": "Attention"}),
                (by, {"weight": "Bolder", "color": "Attention"})]
    if decision.outcome == "expired":
        return [("Expired: nobody answered in time, so it did not run.", {"isSubtle": True})]
    return [("Not run: you sent a new message.", {"isSubtle": True})]


def _outcome_text(decision: ToolDecision, *, again: bool) -> str:
    text = "".join(part for part, _ in _outcome_line(decision))
    return f"Already decided: {text}" if again else text


def _card(body: list[dict[str, Any]], *, actions: list[dict[str, Any]] | None = None,
          fallback: str) -> dict[str, Any]:
    card: dict[str, Any] = {"type": "AdaptiveCard",
                            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                            "version": "1.4", "fallbackText": fallback, "body": body}
    if actions:
        card["actions"] = actions
    return card


def _action(title: str, verb: str, data: dict[str, str], *, style: str) -> dict[str, Any]:
    """`Action.Execute` (Universal Actions), with `Action.Submit` for clients without them."""
    return {"type": "Action.Execute", "title": title, "verb": verb, "data": data, "style": style,
            "fallback": {"type": "Action.Submit", "title": title, "data": {"verb": verb, **data}}}


def _heading(text: str) -> dict[str, Any]:
    return {"type": "TextBlock", "text": text, "weight": "Bolder", "size": "Medium", "wrap": True}


def _subtle(text: str) -> dict[str, Any]:
    return {"type": "TextBlock", "text": text, "isSubtle": True, "size": "Small", "wrap": True}


def _rich(*runs: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """A `RichTextBlock` of `TextRun`s: no markdown is rendered in them."""
    return {"type": "RichTextBlock",
            "inlines": [{"type": "TextRun", "text": text, **style} for text, style in runs if text]}


def _where(origin: str) -> str:
    server = origin.removeprefix("mcp:")
    return f"MCP server {server}" if origin.startswith("mcp:") else "in this app"


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M UTC")
