"""What `make chat` shows of the activities a Teams-like channel receives, as text on a terminal.

Teams shows an informative update ("Thinking…") until the answer starts, then the answer growing
as it streams, then the final message. A terminal cannot take text back, so the view prints only
what is new: the status line is replaced in place on a terminal (printed once per change
elsewhere), streamed text is printed as it grows, and when a part of a long answer ends shorter
than it streamed (the rest moves to the next message) the next message skips what was already
printed. Under a message: its citations as numbered sources, its Adaptive Cards as text, and its
suggested replies and card buttons as numbered choices, picked by typing the number
(`choices`). A card replaced later (a PUT) is shown again. `heard` is called from the channel's
thread; the prompt's thread reads the state under the same lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["Choice", "TerminalView", "card_lines"]

ADAPTIVE_CARD = "application/vnd.microsoft.card.adaptive"
_CLEAR_LINE = "\r\x1b[2K"
_DIM, _PLAIN = "\x1b[2m", "\x1b[0m"


@dataclass(frozen=True, kw_only=True)
class Choice:
    """Something the user can pick by number: a suggested reply or a card's button."""

    label: str
    #: imBack (send `value` as text), Action.Execute (an adaptiveCard/action invoke),
    #: Action.Submit (a message carrying `value`), Action.OpenUrl (show the address).
    kind: str
    value: Any
    #: The message the button is on (the invoke's replyToId).
    reply_to: str | None = None
    verb: str | None = None
    action_id: str | None = None


def card_lines(card: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """An Adaptive Card's text, a line per element, and its actions (those of ActionSets too)."""
    lines: list[str] = []
    actions: list[dict[str, Any]] = []

    def walk(element: Any) -> None:
        if isinstance(element, list):
            for item in element:
                walk(item)
            return
        if not isinstance(element, dict):
            return
        kind = element.get("type")
        if kind == "TextBlock" and isinstance(element.get("text"), str):
            lines.append(element["text"])
        elif kind == "RichTextBlock":
            lines.append("".join(str(run.get("text", "")) for run in element.get("inlines", [])
                                 if isinstance(run, dict)))
        elif kind == "FactSet":
            lines.extend(f"{fact.get('title', '')}: {fact.get('value', '')}"
                         for fact in element.get("facts", []) if isinstance(fact, dict))
        elif kind == "Image":
            lines.append(f"[image{': ' + element['altText'] if element.get('altText') else ''}]")
        elif kind == "ActionSet":
            actions.extend(a for a in element.get("actions", []) if isinstance(a, dict))
        for key in ("body", "items", "columns"):
            walk(element.get(key))

    walk(card)
    if isinstance(card, dict):
        actions.extend(a for a in card.get("actions", []) if isinstance(a, dict))
    return lines, actions


class TerminalView:
    def __init__(self, out: TextIO, *, tty: bool) -> None:
        self._out = out
        self._tty = tty
        self._lock = threading.Lock()
        self._printed: str | None = None  # what is on screen of the message being streamed
        self._carry = ""  # the tail a part streamed that its final left to the next message
        self._status = ""
        self._status_shown = False
        #: What the user can pick by number now (since their last input).
        self.choices: list[Choice] = []
        self.at_prompt = False
        self.messages = 0
        #: An AI reply's last message (feedback buttons or suggestions), or a reply of ours.
        self.finished = 0
        self.last_heard = 0.0

    # -- the channel's side ----------------------------------------------------------------

    def heard(self, event: str, activity: dict[str, Any], activity_id: str | None) -> None:
        """An activity the channel took from the bot ("sent", or "updated" by a PUT)."""
        with self._lock:
            self.last_heard = time.monotonic()
            if self.at_prompt:
                self._write("\n")
            kind = _stream_type(activity)
            if event == "updated":
                self._message(activity, activity_id, updated=True)
            elif activity.get("type") == "typing" and kind == "informative":
                self._show_status(str(activity.get("text") or ""))
            elif activity.get("type") == "typing" and kind == "streaming":
                self._grow(str(activity.get("text") or ""))
            elif activity.get("type") == "message":
                self._message(activity, activity_id)
            if self.at_prompt:
                self._write("you> ")
            self._out.flush()

    def said(self, text: str) -> None:
        """A line of `make chat`'s own (an error, an invoke's answer)."""
        with self._lock:
            self._clear_status()
            self._write(f"{text}\n")
            self._out.flush()

    def user_spoke(self) -> None:
        """The user sent something: the choices shown so far are gone, as in Teams."""
        with self._lock:
            self.choices = []

    # -- what is printed -------------------------------------------------------------------

    def _write(self, text: str) -> None:
        self._out.write(text)

    def _show_status(self, text: str) -> None:
        if self._printed is not None:
            return  # the answer has started: Teams shows no informative text now
        if self._tty:
            self._write(f"{_CLEAR_LINE}bot> {_DIM}{text}{_PLAIN}")
            self._status_shown = True
        elif text != self._status:
            self._write(f"bot> {text}\n")
        self._status = text

    def _clear_status(self) -> None:
        if self._status_shown:
            self._write(_CLEAR_LINE)
            self._status_shown = False
        self._status = ""

    def _begin(self, text: str) -> None:
        """A new message: its prefix, less what the previous part already printed."""
        self._clear_status()
        skip = 0
        if self._carry:
            found = text.find(self._carry, 0, len(self._carry) + 40)
            skip = found + len(self._carry) if found >= 0 else 0
            self._carry = ""
        self._write("bot> ")
        self._printed = text[:skip]

    def _grow(self, text: str) -> None:
        if self._printed is None:
            self._begin(text)
        assert self._printed is not None
        if text.startswith(self._printed):
            self._write(text[len(self._printed):])
            self._printed = text

    def _message(self, activity: dict[str, Any], activity_id: str | None, *,
                 updated: bool = False) -> None:
        text = str(activity.get("text") or "")
        if updated:
            self._clear_status()
            self._write("bot> (updated) " + (text + "\n" if text else ""))
            self.choices = [c for c in self.choices if c.reply_to != activity_id]
        elif self._printed is None:
            self._begin(text)
            assert self._printed is not None
            self._write(text[len(self._printed):] + "\n")
        elif text.startswith(self._printed):
            self._write(text[len(self._printed):] + "\n")
        elif self._printed.startswith(text.rstrip()):
            self._carry = self._printed[len(text.rstrip()):].strip()
            self._write("" if self._printed.endswith("\n") else "\n")
        else:  # the final says something else than what streamed: show it whole
            self._write(f"\nbot> {text}\n")
        self._printed = None
        self._sources(activity)
        self._cards(activity, activity_id)
        self._suggestions(activity)
        if not updated:
            self.messages += 1
            if _last_of_reply(activity):
                self.finished += 1

    def _sources(self, activity: dict[str, Any]) -> None:
        claims = [claim for entity in activity.get("entities") or [] if isinstance(entity, dict)
                  for claim in entity.get("citation") or [] if isinstance(claim, dict)]
        for claim in sorted(claims, key=lambda c: int(c.get("position") or 0)):
            appearance = claim.get("appearance") or {}
            where = f" <{appearance['url']}>" if appearance.get("url") else ""
            self._write(f"  [{claim.get('position')}] {appearance.get('name', '')}{where}\n")

    def _cards(self, activity: dict[str, Any], activity_id: str | None) -> None:
        for attachment in activity.get("attachments") or []:
            if not isinstance(attachment, dict) or attachment.get("contentType") != ADAPTIVE_CARD:
                continue
            lines, actions = card_lines(attachment.get("content"))
            for line in lines:
                self._write(f"  │ {line}\n")
            for action in actions:
                self._offer(_card_choice(action, activity_id))

    def _suggestions(self, activity: dict[str, Any]) -> None:
        suggested = activity.get("suggestedActions") or {}
        for action in suggested.get("actions", []) if isinstance(suggested, dict) else []:
            if isinstance(action, dict) and action.get("type") == "imBack":
                self._offer(Choice(label=str(action.get("title") or action.get("value")),
                                   kind="imBack", value=str(action.get("value") or "")))

    def _offer(self, choice: Choice | None) -> None:
        if choice is None:
            return
        self.choices.append(choice)
        self._write(f"  {len(self.choices)}) {choice.label}\n")


def _card_choice(action: dict[str, Any], reply_to: str | None) -> Choice | None:
    kind = action.get("type")
    title = str(action.get("title") or kind)
    if kind == "Action.Execute":
        return Choice(label=title, kind=kind, value=action.get("data"), reply_to=reply_to,
                      verb=action.get("verb"), action_id=action.get("id"))
    if kind == "Action.Submit":
        return Choice(label=title, kind=kind, value=action.get("data"), reply_to=reply_to)
    if kind == "Action.OpenUrl":
        return Choice(label=f"{title} ({action.get('url')})", kind=kind, value=action.get("url"))
    return None


def _stream_type(activity: dict[str, Any]) -> str | None:
    info = next((e for e in activity.get("entities") or [] if isinstance(e, dict)
                 and e.get("type") == "streaminfo"), None)
    return str(info.get("streamType")) if info else None


def _last_of_reply(activity: dict[str, Any]) -> bool:
    """A message that ends a reply: one of ours (no AI label), or an AI reply's last part, which
    carries the feedback buttons or the suggested replies."""
    ai = any(isinstance(e, dict) and e.get("type") == "https://schema.org/Message"
             for e in activity.get("entities") or [])
    channel_data = activity.get("channelData") or {}
    return not ai or "feedbackLoop" in channel_data or "suggestedActions" in activity
