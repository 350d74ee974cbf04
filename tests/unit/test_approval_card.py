"""The approval card: the tool, where it runs and its arguments as plain text, bounded; nothing the
model wrote is formatted or linked; the answered states; the plain-text fallback and its answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.approval_card import (
    APPROVE_VERB,
    DENY_VERB,
    MAX_ARGUMENTS_CHARS,
    ApprovalRequest,
    ShownCall,
    answered_card,
    approval_card,
    fallback_text,
    parse_answer,
)
from shared.messages import ToolCall, ToolDecision
from shared.pause import round_sha256

EXPIRES = datetime(2026, 3, 4, 14, 5, tzinfo=UTC)
#: Arguments a hostile model (or a prompt injection it read) might write.
HOSTILE = {"topic": "**URGENT** [click here](https://evil.example/login) <at>Admin</at>",
           "note": "line one\nline two\u202eevil\u200b",
           "site": "www.evil.example and javascript:alert(1) and mailto://x"}


def request_for(arguments: dict[str, Any], *, requester: str | None = None) -> ApprovalRequest:
    text = json.dumps(arguments)
    return ApprovalRequest(
        decision_id="d-123", calls=(ShownCall(tool="delete_notes", origin="mcp:demo", arguments=text),),
        sha256=round_sha256([ToolCall(id="c1", name="delete_notes", arguments=text)]),
        expires_at=EXPIRES, requester=requester)


def elements(card: dict[str, Any]) -> list[dict[str, Any]]:
    """Every body element and inline of a card."""
    found: list[dict[str, Any]] = []
    for element in card["body"]:
        found.append(element)
        found += element.get("inlines", [])
    return found


def block_texts(card: dict[str, Any]) -> list[str]:
    """The texts a client renders as markdown: TextBlocks (and facts; this card has none)."""
    return [e["text"] for e in elements(card) if e["type"] == "TextBlock"]


def run_texts(card: dict[str, Any]) -> str:
    """The card's text runs, a line per RichTextBlock."""
    return "\n".join("".join(run["text"] for run in e["inlines"]) for e in card["body"]
                     if e["type"] == "RichTextBlock")


def test_the_card_names_the_tool_and_server_and_shows_the_arguments_as_plain_text() -> None:
    # GIVEN a call of delete_notes on the demo server, with hostile arguments
    card = approval_card(request_for(HOSTILE))
    # THEN the card says what would run, where, and with which arguments, in text runs
    runs = run_texts(card)
    assert "delete_notes" in runs and "MCP server demo" in runs
    assert "**URGENT** [click here](https[:]//evil.example/login) <at>Admin</at>" in runs
    # AND no markdown-rendered element holds anything the model wrote
    for text in block_texts(card):
        assert not any(part in text for part in ("URGENT", "evil", "Admin", "line"))
    # AND no link the model wrote survives anywhere, nor a line break, hidden or bidi character
    everything = json.dumps(card, ensure_ascii=False)
    for forbidden in ("https://evil", "www.evil", "mailto://", "\u202e", "\u200b"):
        assert forbidden not in everything
    assert all("\n" not in e["text"] for e in elements(card) if e["type"] == "TextRun")
    assert "www[.]evil.example" in runs and "mailto[:]//x" in runs
    assert "note: line one line two evil" in runs.splitlines()


def test_the_buttons_are_universal_actions_bound_to_the_decision_and_the_arguments() -> None:
    # GIVEN a request WHEN its card is built
    request = request_for({"topic": "drafts"})
    card = approval_card(request)
    # THEN Approve and Deny are Action.Execute with their verbs and the decision's ID and hash,
    # and fall back to Action.Submit carrying the same
    approve, deny = card["actions"]
    assert (approve["type"], approve["title"], approve["verb"]) == ("Action.Execute", "Approve",
                                                                    APPROVE_VERB)
    assert (deny["type"], deny["title"], deny["verb"]) == ("Action.Execute", "Deny", DENY_VERB)
    for action in (approve, deny):
        assert action["data"] == {"decisionId": "d-123", "sha256": request.sha256}
        assert action["fallback"]["type"] == "Action.Submit"
        assert action["fallback"]["data"] == {"verb": action["verb"], **action["data"]}
    assert card["version"] == "1.4" and card["type"] == "AdaptiveCard"
    # AND it says when it expires (Adaptive Cards' TIME shows it in the reader's time zone)
    assert any("{{TIME(2026-03-04T14:05:00Z)}}" in text for text in block_texts(card))


def test_long_and_many_arguments_are_bounded() -> None:
    # GIVEN a call with 40 arguments of 5,000 characters each
    arguments = {f"field_{n}": "x" * 5_000 for n in range(40)}
    # WHEN its card is built
    card = approval_card(request_for(arguments))
    # THEN each value is cut, the whole is bounded, and what was left out is counted
    values = [e["text"] for e in elements(card) if e.get("fontType") == "Monospace"][1:]
    assert all(len(value) <= 300 for value in values)
    assert sum(len(value) for value in values) <= MAX_ARGUMENTS_CHARS + 300
    assert values[0].endswith("…")
    assert "more not shown" in run_texts(card)
    assert len(json.dumps(card)) < 12_000


@pytest.mark.parametrize(("outcome", "by", "shown"), [
    ("approved", "Ada", "Approved by Ada"),
    ("denied", "Ada", "Denied by Ada"),
    ("expired", None, "Expired: nobody answered in time, so it did not run."),
    ("superseded", None, "Not run: you sent a new message."),
])
def test_an_answered_card_says_what_happened_and_has_no_buttons(outcome: str, by: str | None,
                                                               shown: str) -> None:
    # GIVEN a decided request
    decision = ToolDecision(outcome=outcome, at=EXPIRES, by=by)  # type: ignore[arg-type]
    # WHEN its card is refreshed, for the one who decided and for a second click
    card = answered_card(request_for({"topic": "drafts"}), decision)
    again = answered_card(request_for({"topic": "drafts"}), decision, again=True)
    # THEN it says so, keeps the call it was about, and offers nothing to click
    assert shown in run_texts(card) and "delete_notes" in run_texts(card)
    assert "actions" not in card and "actions" not in again
    assert run_texts(again).splitlines() == ["Run delete_notes (MCP server demo)",
                                             f"Already decided: {shown}"]
    assert card["fallbackText"] == shown


def test_an_approvers_name_is_shown_as_plain_text() -> None:
    # GIVEN an approver whose display name is markdown with a link
    decision = ToolDecision(outcome="approved", at=EXPIRES, by="[Ada](https://evil.example)\u202e")
    # WHEN the card is refreshed THEN the name is a text run, its link defanged
    card = answered_card(request_for({"topic": "drafts"}), decision)
    assert "[Ada](https[:]//evil.example)" in run_texts(card)
    assert "https://" not in json.dumps(card) and "\u202e" not in json.dumps(card)


def test_the_plain_text_fallback_says_how_to_answer() -> None:
    # GIVEN a request in a group chat, asked of Ada
    text = fallback_text(request_for(HOSTILE, requester="Ada Lovelace"))
    # THEN it names the tool and its arguments, how to answer, who may, and until when
    assert text.startswith("Approval needed: the assistant wants to run\n- delete_notes "
                           "(MCP server demo), with:")
    assert '    topic: **URGENT** [click here](https[:]//evil.example/login)' in text
    assert 'Reply "approve" to run it, or "deny". Only Ada Lovelace can answer.' in text
    assert text.endswith("expires at 14:05 UTC.")
    assert "https://" not in text and "\u202e" not in text
    # AND the card carries it as its fallbackText
    assert approval_card(request_for(HOSTILE, requester="Ada Lovelace"))["fallbackText"] == text


@pytest.mark.parametrize(("text", "answer"), [
    ("approve", "approve"), ("Approve", "approve"), (" APPROVED. ", "approve"), ("/approve", "approve"),
    ("deny", "deny"), ("Deny!", "deny"), ("denied", "deny"),
    ("yes", None), ("approve it", None), ("please approve", None), ("don't approve", None),
    ("approve deny", None), ("", None), ("approve\nand delete everything", None),
])
def test_a_plain_text_answer_is_approve_or_deny_and_nothing_else(text: str, answer: str | None) -> None:
    # GIVEN a reply to the fallback WHEN it is read THEN only a bare approve or deny counts
    assert parse_answer(text) == answer
