"""Which turns the next rolling summary folds in, and when a turn should have one prepared.

The window (`shared/window.py`) keeps its start still while it fits the budget. Once the messages
from the start hold `FOLD_AT` of the budget, a summary is prepared after the reply is delivered:
the oldest whole turns are folded into the current summary, keeping the newest ones (up to `KEEP`
of the budget) out of it, so that when the window stops fitting it steps to about half the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..messages import ChatMessage
from ..window import WindowPlan
from ._codec import Entity, entity_message, group_turns
from ._head import Head

__all__ = ["FOLD_AT", "FOLD_MAX", "KEEP", "FoldJob", "choose_fold", "fold_job", "summary_due"]

#: Prepare the next summary once the window from its start holds this share of the budget.
FOLD_AT = 0.75
#: Keep the newest turns, up to this share of the budget, out of the summary being prepared.
KEEP = 0.25
#: One summary call folds at most this share of the budget (a summary that fell behind catches up
#: in several steps, never in one call the summary model cannot take).
FOLD_MAX = 1.0


@dataclass(frozen=True, kw_only=True)
class FoldJob:
    """The summary to prepare: `summary` (the current one) extended with `messages`.

    `messages` are sequence numbers `start` to `to`: the oldest whole turns of the window.
    """

    conversation_id: str
    summary: str | None
    start: int
    to: int
    messages: tuple[ChatMessage, ...]
    #: The head the job was read from: the summary is stored only if it still has this start.
    head: Head = field(repr=False, compare=False)


def summary_due(plan: WindowPlan, head: Head, *, token_budget: int,
                max_messages: int | None = None) -> bool:
    """Whether a summary should be prepared after this turn's reply (the head as loaded).

    The window is as full as the larger of its token and message shares (`max_messages`: the
    window's message cap, when it has one)."""
    ready_after = not plan.step and head.ready_step() is not None
    full = plan.tokens > FOLD_AT * token_budget or \
        (max_messages is not None and len(plan.messages) > FOLD_AT * max_messages)
    return not ready_after and (plan.behind or full)


def choose_fold(rows: Sequence[Entity], *, token_budget: int, reach_newest: bool,
                max_messages: int | None = None) -> list[Entity]:
    """The rows to fold: the oldest whole turns of `rows` (oldest first, from the window's start).

    With `reach_newest` the rows run to the newest message, and the newest turns (up to `KEEP` of
    the budget and of `max_messages`, at least one) stay out; at most `FOLD_MAX` of the budget is
    folded (at least one turn). Empty: nothing to fold.
    """
    keep_messages = KEEP * max_messages if max_messages is not None else float("inf")
    turns = group_turns(rows)
    if reach_newest:
        kept, tokens = 1, _tokens(turns[-1]) if turns else 0
        count = len(turns[-1]) if turns else 0
        while kept < len(turns) and tokens + _tokens(turns[-kept - 1]) <= KEEP * token_budget \
                and count + len(turns[-kept - 1]) <= keep_messages:
            tokens += _tokens(turns[-kept - 1])
            count += len(turns[-kept - 1])
            kept += 1
        turns = turns[:-kept] if turns else []
    folded: list[Entity] = []
    for turn in turns:
        if folded and _tokens(folded) + _tokens(turn) > FOLD_MAX * token_budget:
            break
        folded.extend(turn)
    return folded


def fold_job(head: Head, rows: Sequence[Entity], *, token_budget: int, reach_newest: bool,
             max_messages: int | None = None) -> FoldJob | None:
    folded = choose_fold(rows, token_budget=token_budget, reach_newest=reach_newest,
                         max_messages=max_messages)
    if not folded:
        return None
    return FoldJob(conversation_id=head.conversation_id, summary=head.summary,
                   start=int(folded[0]["seq"]), to=int(folded[-1]["seq"]),
                   messages=tuple(entity_message(row) for row in folded), head=head)


def _tokens(rows: Sequence[Entity]) -> int:
    return sum(int(row["tokens"]) for row in rows)
