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


def test_a_missing_or_malformed_block_gives_no_suggestions_and_never_shows() -> None:
    # GIVEN an answer without a block, one whose block never closes, and one with an empty block
    # WHEN each is split
    # THEN the answer is kept as written, or cut before the block, with no suggestions
    assert split(ANSWER) == (ANSWER, ())
    assert split(f"{ANSWER}\n{OPEN}\nWhat about Ber") == (ANSWER, ())
    assert split(f"{ANSWER} {OPEN}{CLOSE}") == (ANSWER, ())
    # AND a JSON list in the block is read too
    assert split(f"{ANSWER}{OPEN}[\"Why?\", \"How?\"]{CLOSE}")[1] == ("Why?", "How?")


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
