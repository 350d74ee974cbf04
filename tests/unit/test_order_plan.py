"""The drain's one decision (`shared.order.plan`): the next unit of a conversation's waiting
messages, on its own (no I/O)."""

from __future__ import annotations

from shared.inbox import Kept, OrderHead
from shared.order import Unit, plan

HEAD = OrderHead(conversation_id="a:c", last_seq=3)


def kept(seq: int, **fields: object) -> Kept:
    return Kept(activity_id=f"m{seq}", seq=seq, sender="29:u", **fields)  # type: ignore[arg-type]


def test_messages_of_one_sender_waiting_together_are_one_unit() -> None:
    # GIVEN three messages of one sender waiting
    # WHEN the drain plans
    step = plan([kept(1), kept(2), kept(3)], HEAD, now=10.0, burst=True, max_burst=8)
    # THEN they are one burst
    assert isinstance(step, Unit) and step.activity_ids == ("m1", "m2", "m3")


def test_a_given_up_message_is_forgotten_apart_from_the_messages_behind_it() -> None:
    # GIVEN a message whose last attempt failed and was apologised for (its removal failed),
    # and a newer message of the same sender behind it
    waiting = [kept(1, attempts=4, given_up=True), kept(2)]
    # WHEN the drain plans, twice (the first unit done)
    first = plan(waiting, HEAD, now=10.0, burst=True, max_burst=8)
    then = plan(waiting[1:], HEAD, now=10.0, burst=True, max_burst=8)
    # THEN the given-up one is a unit of its own, and the newer one is answered after it
    assert isinstance(first, Unit) and first.activity_ids == ("m1",)
    assert isinstance(then, Unit) and then.activity_ids == ("m2",)
