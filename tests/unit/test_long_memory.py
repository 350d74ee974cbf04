"""The rolling summary's pure parts: the window planner, the head's step, the fold, speakers."""

from __future__ import annotations

from typing import Any

from devtools.fake_model import PrefixCache
from shared.messages import ChatMessage
from shared.speakers import name_field, wire_message
from shared.store._fold import choose_fold, summary_due
from shared.store._head import Basis, Head
from shared.summary import fit_summary, summary_request, transcript_line
from shared.window import WindowPlanner

TURN_TOKENS = 10  # a user message and a reply of 5 tokens each


def rows(first_turn: int, last_turn: int) -> list[dict[str, Any]]:
    """Message rows of turns `first_turn`..`last_turn` (seq 2t+1, 2t+2), oldest first."""
    return [{"seq": 2 * t + 1 + k, "role": role, "content": f"{role} {t}", "tokens": 5,
             "timestamp": "2026-01-01T00:00:00+00:00"}
            for t in range(first_turn, last_turn + 1) for k, role in enumerate(("user", "assistant"))]


def plan(planner: WindowPlanner, stored: list[dict[str, Any]]) -> Any:
    for row in reversed(stored):
        if not planner.offer(row["seq"], ChatMessage(role=row["role"], content=row["content"]),
                             row["tokens"]):
            break
    planner.reached(1)
    return planner.plan()


def test_the_window_start_stays_still_while_the_window_fits() -> None:
    # GIVEN 8 turns (80 tokens) and a start at turn 2 (seq 5), budget 100
    stored = rows(0, 7)
    # WHEN the window is planned
    window = plan(WindowPlanner(token_budget=100, max_messages=200, start=5), stored)
    # THEN it holds every message from the start, not the newest that fit
    assert window.first_seq == 5 and window.tokens == 60 and not window.step and not window.behind


def test_the_window_steps_to_a_ready_summary_when_it_no_longer_fits() -> None:
    # GIVEN 12 turns (120 tokens) over a budget of 100, start at 1, a summary ready up to seq 14
    stored = rows(0, 11)
    # WHEN the window is planned
    window = plan(WindowPlanner(token_budget=100, max_messages=200, start=1, step_to=15), stored)
    # THEN it starts right after the summary, in one step
    assert window.first_seq == 15 and window.step and not window.behind


def test_with_no_summary_ready_the_window_slides_and_says_it_is_behind() -> None:
    # GIVEN 12 turns over a budget of 100, and no summary ready
    stored = rows(0, 11)
    # WHEN the window is planned
    window = plan(WindowPlanner(token_budget=100, max_messages=200, start=1), stored)
    # THEN it is the newest turns that fit, marked behind (the start does not move)
    assert window.first_seq == 5 and window.tokens == 100 and window.behind and not window.step


def test_with_summaries_off_the_window_is_the_newest_that_fit() -> None:
    # GIVEN 12 turns over a budget of 100 and no start (summaries off)
    # WHEN the window is planned
    window = plan(WindowPlanner(token_budget=100, max_messages=200), rows(0, 11))
    # THEN it is today's window
    assert window.first_seq == 5 and not window.behind and not window.step


def test_a_commit_makes_the_pending_summary_current_as_the_start_steps() -> None:
    # GIVEN a head with a summary up to seq 4 and one prepared up to seq 14
    head = Head(conversation_id="c", last_seq=24, start=5, summary="old", pending="new",
                pending_from=5, pending_to=14, copy=tuple(rows(0, 11)), copy_from=1)
    turn = [row | {"seq": 25 + i} for i, row in enumerate(rows(0, 0))]
    # WHEN a turn commits with a window that stepped
    after = head.after(Basis(head=head, summaries=True, step=True, first_seq=15), turn,
                       activity_ids=["a"], token_budget=100, max_messages=200)
    # THEN the start and the summary moved together, and nothing is pending
    assert (after.start, after.summary, after.pending) == (15, "new", None)
    # AND a commit that did not step changes neither
    still = head.after(Basis(head=head, summaries=True, first_seq=5), turn, activity_ids=["a"],
                       token_budget=100, max_messages=200)
    assert (still.start, still.summary, still.pending) == (5, "old", "new")


def test_a_pending_summary_for_another_start_is_never_used() -> None:
    # GIVEN a summary prepared for start 5, and a head whose start is 7
    head = Head(conversation_id="c", last_seq=24, start=7, pending="x", pending_from=5, pending_to=14)
    # WHEN it is asked for a step  THEN there is none
    assert head.ready_step() is None


def test_a_clear_forgets_the_summary() -> None:
    # GIVEN a head with a summary and a pending one
    head = Head(conversation_id="c", last_seq=24, start=15, summary="s", pending="p",
                pending_from=15, pending_to=20)
    # WHEN it is cleared
    cleared = head.cleared()
    # THEN neither summary is left and the start is past every message
    assert cleared.summary is None and cleared.pending is None and cleared.start == 25
    assert Head.read({**cleared.entity("pk"), "conversation_id": "c"}, etag="e").summary is None


def test_the_fold_keeps_the_newest_quarter_and_takes_whole_turns() -> None:
    # GIVEN a window of 8 turns (80 tokens) from the start, budget 100
    # WHEN the fold is chosen
    folded = choose_fold(rows(0, 7), token_budget=100, reach_newest=True)
    # THEN the newest turns within 25 tokens (2 turns) stay out; whole turns are folded
    assert [r["seq"] for r in folded] == list(range(1, 13))
    # AND one call folds at most a budget's worth
    behind = choose_fold(rows(0, 29), token_budget=100, reach_newest=False)
    assert len(behind) == 20


def test_a_summary_is_due_past_three_quarters_unless_one_is_ready() -> None:
    # GIVEN windows of 70 and 80 tokens at a budget of 100
    head = Head(conversation_id="c", last_seq=16, start=1)
    small = plan(WindowPlanner(token_budget=100, max_messages=200, start=1), rows(0, 6))
    large = plan(WindowPlanner(token_budget=100, max_messages=200, start=1), rows(0, 7))
    # WHEN each is checked  THEN only the larger is due
    assert not summary_due(small, head, token_budget=100)
    assert summary_due(large, head, token_budget=100)
    # AND not when a summary is ready for this start already
    ready = Head(conversation_id="c", last_seq=16, start=1, pending="p", pending_from=1, pending_to=4)
    assert not summary_due(large, ready, token_budget=100)


def test_a_window_capped_by_messages_folds_and_steps_by_its_cap() -> None:
    # GIVEN a window capped at 8 messages with a large token budget: 3 turns (6 messages) from
    # the start, then 4 turns (8 messages)
    head = Head(conversation_id="c", last_seq=16, start=1)
    three = plan(WindowPlanner(token_budget=10_000, max_messages=8, start=1), rows(0, 2))
    four = plan(WindowPlanner(token_budget=10_000, max_messages=8, start=1), rows(0, 3))
    # WHEN each is checked  THEN a summary is due past three quarters of the cap, not before
    assert not summary_due(three, head, token_budget=10_000, max_messages=8)
    assert summary_due(four, head, token_budget=10_000, max_messages=8)
    # AND the fold keeps the newest quarter of the cap (one turn, 2 messages) out of it, so the
    # window can step to fewer than half its cap
    folded = choose_fold(rows(0, 3), token_budget=10_000, reach_newest=True, max_messages=8)
    assert [r["seq"] for r in folded] == list(range(1, 7))


def test_tool_messages_reach_the_summary_as_their_gist() -> None:
    # GIVEN a long tool result and a named speaker
    tool = ChatMessage(role="tool", content="x" * 5_000, name="lookup", tool_call_id="c1")
    user = ChatMessage(role="user", content="hi  there", name="Ada")
    # WHEN they are written for the summary model
    # THEN the result is cut to its gist and the speaker is named
    assert len(transcript_line(tool)) < 400 and transcript_line(tool).startswith("(tool lookup")
    assert transcript_line(user) == "Ada: hi there"
    request = summary_request("before", [user], token_budget=100)
    assert "before" in request[1]["content"] and "Ada: hi there" in request[1]["content"]


def test_a_summary_is_cut_to_its_budget() -> None:
    # GIVEN a summary far over a 64-token budget
    # WHEN it is fitted  THEN it is within the budget
    from shared.tokens import count_text_tokens
    assert count_text_tokens(fit_summary("word " * 1_000, token_budget=64)) <= 64


def test_speaker_names_are_sanitized_or_become_a_prefix() -> None:
    # GIVEN display names with spaces, accents and no Latin letters
    # WHEN they are made into OpenAI names
    # THEN they match ^[a-zA-Z0-9_-]{1,64}$, or there is none
    assert name_field("José Núñez") == "Jose_Nunez"
    assert name_field("张伟") is None
    assert name_field("a" * 100) == "a" * 64
    # AND a user message carries its speaker as `name`, or as a prefix when asked or needed
    message = ChatMessage(role="user", content="hello", name="Ada Lovelace")
    assert wire_message(message, style="name") == {"role": "user", "content": "hello",
                                                   "name": "Ada_Lovelace"}
    assert wire_message(message, style="prefix")["content"] == "Ada Lovelace: hello"
    chinese = ChatMessage(role="user", content="你好", name="张伟")
    assert wire_message(chinese, style="name")["content"] == "张伟: 你好"
    assert "name" not in wire_message(ChatMessage(role="user", content="x"), style="name")


def test_the_prefix_cache_counts_from_1024_tokens_in_blocks_of_128() -> None:
    # GIVEN a prefix cache and a long prompt
    cache = PrefixCache()
    long = "word " * 3_000
    # WHEN the prompt is seen, then again with more at its end, then a short one twice
    first = cache.lookup(long)
    second = cache.lookup(long + "more words at the end")
    cache.lookup("short")
    short = cache.lookup("short")
    # THEN nothing is cached the first time; then a multiple of 128 of the shared prefix
    assert first[1] == 0
    assert second[1] > 1_024 and second[1] % 128 == 0 and second[1] <= first[0]
    # AND a prompt under 1,024 tokens is never cached
    assert short[1] == 0
