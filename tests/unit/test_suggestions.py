"""Suggested replies read from the end of the model's answer: what is kept, shown and stored."""

from __future__ import annotations

from itertools import pairwise

from shared.suggestions import CLOSE, OPEN, split, suggested_actions, visible

ANSWER = "Oslo is 9 degrees and cloudy."


def test_the_block_comes_off_the_answer_and_gives_at_most_three_suggestions() -> None:
    # GIVEN an answer ending with a block of five lines: bullets, quotes, a repeat, a blank
    text = (f"{ANSWER}\n\n{OPEN}\n- What about Bergen?\n2) \"And tomorrow?\"\n\n"
            f"what about bergen?\n• Will it rain?\nIn Celsius?\n{CLOSE}\n")
    # WHEN it is split
    answer, suggestions = split(text)
    # THEN the answer holds no block, and the first three distinct suggestions are read
    assert answer == ANSWER
    assert suggestions == ("What about Bergen?", "And tomorrow?", "Will it rain?")


def test_a_missing_unclosed_or_empty_block_gives_no_suggestions() -> None:
    # GIVEN an answer without a block, one whose block never closes, and one with an empty block
    # WHEN each is split
    # THEN no suggestions: the unclosed block is not a block, so it stays text; the empty one goes
    assert split(ANSWER) == (ANSWER, ())
    unclosed = f"{ANSWER}\n{OPEN}\nWhat about Ber"
    assert split(unclosed) == (unclosed, ())
    assert split(f"{ANSWER} {OPEN}{CLOSE}") == (ANSWER, ())
    # AND a JSON list in the block is read too
    assert split(f"{ANSWER}{OPEN}[\"Why?\", \"How?\"]{CLOSE}")[1] == ("Why?", "How?")


def test_a_block_written_mid_answer_is_text_and_loses_nothing() -> None:
    # GIVEN an answer with a well-formed block in its middle, and text after it
    text = f"Before.\n{OPEN}\nWhy?\n{CLOSE}\nAfter the block, more answer."
    # WHEN it is split, and as it streams
    # THEN it is all kept as text, with no suggestions, and the stream shows it all by the end
    assert split(text) == (text, ())
    assert visible(text) == text
    # AND only the last block counts when one also ends the answer
    ending = f"{text}\n{OPEN}\nHow?\n{CLOSE}\n"
    assert split(ending) == (text, ("How?",))


def test_a_marker_quoted_in_code_never_cuts_the_answer() -> None:
    # GIVEN an answer that explains the marker in a code span, and one in a fenced block
    span = f"To format, write `{OPEN}` and then each follow-up on a line."
    fenced = f"Like this:\n```\n{OPEN}\nWhy?\n{CLOSE}\n```"
    # WHEN each is split and streamed
    # THEN nothing is cut, on screen or in the store
    assert split(span) == (span, ()) and visible(span) == span
    assert split(fenced) == (fenced, ()) and visible(fenced) == fenced
    # AND a quoted block is not the block even when it ends the answer
    quoted = f"Write `{OPEN}Why?{CLOSE}`"
    assert split(f"Write `{OPEN}Why?{CLOSE}") == (f"Write `{OPEN}Why?{CLOSE}", ())
    assert split(quoted) == (quoted, ())


def test_the_markers_are_matched_whatever_their_case() -> None:
    # GIVEN an answer whose block is written in capitals
    text = f"{ANSWER}\n{OPEN.upper()}\nWhy?\n{CLOSE.title()}"
    # WHEN it is split and streamed
    # THEN the block is read and never shown
    assert split(text) == (ANSWER, ("Why?",))
    assert visible(text) == f"{ANSWER}\n" and visible(f"{ANSWER} <SUGG") == f"{ANSWER} "


def test_button_text_is_one_clean_line_and_never_a_command_of_ours() -> None:
    # GIVEN a block with a right-to-left override, a tab, a zero-width space, and a JSON item with
    # a newline, and our commands in several forms
    block = ("[\"Pay \u202etxt.exe\", \"Two\\tcolumns\", \"zero\u200bwidth\", "
             "\"line\\nbreak\", \"/reset\", \" /RESET\", \"- /signout\"]")
    # WHEN it is read
    _, suggestions = split(f"{ANSWER}\n{OPEN}{block}{CLOSE}")
    # THEN the buttons hold no control or bidi characters, and no command is offered
    assert suggestions == ("Pay txt.exe", "Two columns", "zero width")
    lines = f"{ANSWER}\n{OPEN}\nline\u2028two\n/reset\n{CLOSE}"
    assert split(lines)[1] == ("line", "two")


def test_a_streamed_answer_holds_back_the_block_and_the_start_of_its_marker() -> None:
    # GIVEN the text of an answer as it streams, piece by piece
    full = f"{ANSWER}\n{OPEN}\nWhy?\n{CLOSE}"
    shown = [visible(full[:end]) for end in range(1, len(full) + 1)]
    # THEN nothing of the marker is ever shown, and each text extends the one before
    assert all("<" not in text for text in shown)
    assert all(later.startswith(earlier) for earlier, later in pairwise(shown))
    assert shown[-1] == f"{ANSWER}\n"
    # AND a "<" that turns out not to start the marker is shown once it is clear
    assert visible("1 <") == "1 " and visible("1 < 2") == "1 < 2"


def test_suggestions_become_imback_buttons() -> None:
    # GIVEN two suggestions
    # WHEN they become Teams' suggested actions
    # THEN each is an imBack whose value is the text a tap sends
    assert suggested_actions(["Why?", "How?"]) == {"actions": [
        {"type": "imBack", "title": "Why?", "value": "Why?"},
        {"type": "imBack", "title": "How?", "value": "How?"}]}
