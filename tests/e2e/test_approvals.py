"""Ask before acting, end to end: the app through the dev host with the turn queue, the demo MCP
server over real HTTP (its destructive `delete_notes` asks first), the model faked at HTTP, and the
connector stand-in that enforces Teams' contract. A paused turn holds no worker; the webhook
records the answer; the resumed turn runs the approved call exactly once."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devtools.background import BackgroundLoop
from devtools.fake_model import Scripted, tool_call
from devtools.mcp_server import DemoMcpServer, demo_servers_setting
from shared.approval_card import APPROVE_VERB, DENY_VERB
from tests.e2e.channel import Bench, bench

CARD = "application/vnd.microsoft.card.adaptive"


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[DemoMcpServer]:
    loop = BackgroundLoop()
    server = loop.run(DemoMcpServer().start())
    try:
        yield server
    finally:
        loop.run(server.stop())
        loop.close()


@pytest.fixture(autouse=True)
def fresh_script(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test scripts its own model answers: none left by another (a failed one) is used."""
    for name in ("channel", "short"):
        if name in request.fixturenames:
            request.getfixturevalue(name).model.script.clear()
    yield


def approval_bench(storage: str, mcp: DemoMcpServer, **env: str) -> Any:
    return bench(storage, answer_mode="queue",
                 extra_env={"CHAT_MCP_SERVERS": demo_servers_setting(mcp.url),
                            "CHAT_SUGGESTED_REPLIES": "off", **env})


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str, mcp_server: DemoMcpServer) -> Iterator[Bench]:
    with approval_bench(azurite_connection_string, mcp_server) as running:
        yield running


def wait_for(condition: Callable[[], Any], *, seconds: float = 30.0, what: str = "it") -> Any:
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        time.sleep(0.05)
    return found


def cards(channel: Bench, conversation: str) -> list[dict[str, Any]]:
    return [a for a in channel.connector.messages(conversation) if a.get("attachments")]


def the_card(channel: Bench, conversation: str) -> tuple[str, dict[str, Any]]:
    """The approval card sent to the conversation: its message ID and its content."""
    (message,) = wait_for(lambda: cards(channel, conversation), what="the card")
    (card_id,) = [i for i, sent in channel.connector.sent.items() if sent is message]
    (attachment,) = message["attachments"]
    assert attachment["contentType"] == CARD
    return card_id, attachment["content"]


def press(channel: Bench, conversation: str, card: dict[str, Any], verb: str, *,
          data: dict[str, Any] | None = None, user: str = "29:user-1", name: str = "Ada",
          chat: str = "personal") -> Any:
    """Press a button of `card` as `user` would in Teams: an adaptiveCard/action invoke."""
    action = next(a for a in card["actions"] if a["verb"] == verb)
    invoke = channel.message("", conversation_id=conversation, type="invoke",
                             value={"action": {"type": "Action.Execute", "verb": verb,
                                               "data": data if data is not None else action["data"]},
                                    "trigger": "manual"},
                             **{"from": {"id": user, "name": name}})
    invoke["name"] = "adaptiveCard/action"
    invoke["conversation"]["conversationType"] = chat
    del invoke["text"]
    return channel.post(invoke)


def ask_to_delete(channel: Bench, conversation: str, *, topic: str = "drafts",
                  chat: str = "personal", user: str = "29:user-1", then: str = "Done.") -> None:
    channel.model.then(Scripted(tool_calls=[tool_call("delete_notes", {"topic": topic},
                                                      f"d-{uuid.uuid4().hex[:6]}")]),
                       Scripted(content=then))
    message = channel.message(f"delete my {topic} notes", conversation_id=conversation,
                              **{"from": {"id": user, "name": "Ada"}})
    message["conversation"]["conversationType"] = chat
    assert channel.post(message).status_code == 200


def personal() -> str:
    return f"a:{uuid.uuid4().hex}"


def test_approve_runs_the_call_once_and_the_turn_goes_on(channel: Bench,
                                                         mcp_server: DemoMcpServer) -> None:
    # GIVEN a model that calls the demo server's delete_notes (it asks first), then answers
    conversation = personal()
    ran_before = len(mcp_server.calls)
    ask_to_delete(channel, conversation, topic="drafts", then="Your drafts are gone.")
    # WHEN the turn pauses, THEN a card asks, and nothing ran
    card_id, card = the_card(channel, conversation)
    assert "drafts" in json.dumps(card) and len(mcp_server.calls) == ran_before
    # WHEN the person presses Approve
    response = press(channel, conversation, card, APPROVE_VERB)
    # THEN the invoke is answered with the card's new state, at once
    assert response.status_code == 200
    body = response.json()
    assert body["statusCode"] == 200 and body["type"] == CARD
    assert "Approved by Ada" in json.dumps(body["value"])
    # AND the call runs once, with the stored arguments, and the model's answer arrives
    wait_for(lambda: [r for r in channel.connector.messages(conversation)
                      if r.get("text") == "Your drafts are gone."], what="the answer")
    assert mcp_server.calls[ran_before:] == [("delete_notes", {"topic": "drafts"})]
    # AND history shows the decision with the call's result
    history = channel.history(conversation)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2]["decision"]["outcome"] == "approved" and history[2]["decision"]["by"] == "Ada"
    # AND everyone's card shows the decision, its buttons gone (the message updated in place)
    (updated,) = [a for a in channel.connector.updates if a["id"] == card_id]
    refreshed = updated["attachments"][0]["content"]
    assert "Approved by Ada" in json.dumps(refreshed) and "actions" not in refreshed
    # AND Teams' rules held: the paused turn's stream ended (with a note), the resumed one too
    assert channel.connector.streams.broken(conversation) == []


def test_an_older_clients_submit_answers_the_card_too(channel: Bench,
                                                      mcp_server: DemoMcpServer) -> None:
    # GIVEN a card, in a client without Universal Actions (Action.Submit: a message with a value)
    conversation = personal()
    ran_before = len(mcp_server.calls)
    ask_to_delete(channel, conversation, topic="submitted", then="Deleted by submit.")
    card_id, card = the_card(channel, conversation)
    fallback = next(a for a in card["actions"] if a["verb"] == APPROVE_VERB)["fallback"]
    # WHEN its Approve is submitted
    submit = channel.message("", conversation_id=conversation, value=fallback["data"],
                             replyToId=card_id)
    assert channel.post(submit).status_code == 200
    # THEN the card is updated in place, and the call runs once
    the_answer(channel, conversation, "Deleted by submit.")
    assert mcp_server.calls[ran_before:] == [("delete_notes", {"topic": "submitted"})]
    assert any(a["id"] == card_id and "Approved by Ada" in json.dumps(a)
               for a in channel.connector.updates)


def the_answer(channel: Bench, conversation: str, text: str) -> dict[str, Any]:
    (found,) = wait_for(lambda: [r for r in channel.connector.messages(conversation)
                                 if r.get("text") == text], what=f"the answer {text!r}")
    return found


def tool_result_sent(channel: Bench, call_name: str) -> str:
    """What the model was told the (last) call of `call_name` returned."""
    for request in reversed(channel.model.requests):
        calls = {c["id"]: c["function"]["name"] for m in request["messages"]
                 for c in m.get("tool_calls") or []}
        results = [m["content"] for m in request["messages"]
                   if m["role"] == "tool" and calls.get(m["tool_call_id"]) == call_name]
        if results:
            return str(results[-1])
    raise AssertionError(f"no result of {call_name} reached the model")


def test_deny_runs_nothing_and_the_model_is_told(channel: Bench, mcp_server: DemoMcpServer) -> None:
    # GIVEN a card asking to delete the "old" notes
    conversation = personal()
    ran_before = len(mcp_server.calls)
    ask_to_delete(channel, conversation, topic="old", then="Understood, I left them.")
    _, card = the_card(channel, conversation)
    # WHEN the person presses Deny
    response = press(channel, conversation, card, DENY_VERB)
    # THEN the card says so, nothing runs, the model reads that it was declined and answers
    assert "Denied by Ada" in json.dumps(response.json()["value"])
    the_answer(channel, conversation, "Understood, I left them.")
    assert len(mcp_server.calls) == ran_before
    assert "denied this call" in tool_result_sent(channel, "delete_notes")
    history = channel.history(conversation)
    assert history[2]["decision"]["outcome"] == "denied"
    assert channel.connector.streams.broken(conversation) == []


def test_a_second_click_is_told_the_decision_and_nothing_runs_twice(
        channel: Bench, mcp_server: DemoMcpServer) -> None:
    # GIVEN a card
    conversation = personal()
    ran_before = len(mcp_server.calls)
    ask_to_delete(channel, conversation, topic="twice", then="Deleted once.")
    _, card = the_card(channel, conversation)
    # WHEN Approve is pressed twice, then Deny
    first = press(channel, conversation, card, APPROVE_VERB)
    second = press(channel, conversation, card, APPROVE_VERB)
    third = press(channel, conversation, card, DENY_VERB)
    the_answer(channel, conversation, "Deleted once.")
    # THEN the first recorded it; the others were told what was decided
    assert "Approved by Ada" in json.dumps(first.json()["value"])
    for later in (second, third):
        assert later.status_code in (200, 404)
        if later.status_code == 200:
            assert "Already decided: " in json.dumps(later.json()["value"])
    # AND the call ran once
    assert mcp_server.calls[ran_before:] == [("delete_notes", {"topic": "twice"})]


def test_forged_answers_are_refused_and_the_real_one_still_counts(
        channel: Bench, mcp_server: DemoMcpServer) -> None:
    # GIVEN a card in one conversation, and another conversation of the same person
    conversation, elsewhere = personal(), personal()
    ran_before = len(mcp_server.calls)
    ask_to_delete(channel, conversation, topic="forged", then="Deleted the forged ones.")
    _, card = the_card(channel, conversation)
    data = next(a for a in card["actions"] if a["verb"] == APPROVE_VERB)["data"]
    # WHEN answers come for other arguments, from another conversation, and from another user
    other_arguments = press(channel, conversation, card, APPROVE_VERB,
                            data={**data, "sha256": "0" * 64})
    other_conversation = press(channel, elsewhere, card, APPROVE_VERB)
    other_user = press(channel, conversation, card, APPROVE_VERB, user="29:mallory",
                       name="Mallory")
    # THEN each is refused with a Universal Actions error, and nothing runs
    assert (other_arguments.status_code, other_arguments.json()["value"]["code"]) == \
        (400, "BadRequest")
    assert (other_conversation.status_code, other_conversation.json()["value"]["code"]) == \
        (404, "NotFound")
    assert (other_user.status_code, other_user.json()["value"]["code"]) == (403, "Forbidden")
    assert "only Ada can answer" in other_user.json()["value"]["message"]
    time.sleep(1.0)
    assert len(mcp_server.calls) == ran_before
    # AND the person asked can still approve it
    assert press(channel, conversation, card, APPROVE_VERB).status_code == 200
    the_answer(channel, conversation, "Deleted the forged ones.")
    assert mcp_server.calls[ran_before:] == [("delete_notes", {"topic": "forged"})]


def test_in_a_group_chat_only_the_requester_may_answer(channel: Bench,
                                                       mcp_server: DemoMcpServer) -> None:
    # GIVEN Ada's request in a group chat
    conversation = f"19:{uuid.uuid4().hex}@thread.v2"
    ran_before = len(mcp_server.calls)
    ask_to_delete(channel, conversation, topic="team", chat="groupChat",
                  then="The team notes are gone.")
    _, card = the_card(channel, conversation)
    assert "Only Ada can answer" in json.dumps(card)
    # WHEN Bob presses Approve, then Ada
    bob = press(channel, conversation, card, APPROVE_VERB, user="29:bob", name="Bob",
                chat="groupChat")
    ada = press(channel, conversation, card, APPROVE_VERB, chat="groupChat")
    # THEN Bob is refused, Ada's counts, and the call runs once
    assert bob.status_code == 403 and ada.status_code == 200
    the_answer(channel, conversation, "The team notes are gone.")
    assert mcp_server.calls[ran_before:] == [("delete_notes", {"topic": "team"})]


def test_a_new_message_supersedes_the_request(channel: Bench, mcp_server: DemoMcpServer) -> None:
    # GIVEN a card waiting
    conversation = personal()
    ran_before = len(mcp_server.calls)
    ask_to_delete(channel, conversation, topic="kept", then="unused")
    card_id, card = the_card(channel, conversation)
    channel.model.script.clear()
    # WHEN the person sends a new message instead of answering
    channel.model.then(Scripted(content="Fine, I kept them."))
    assert channel.post(channel.message("actually, keep them",
                                        conversation_id=conversation)).status_code == 200
    # THEN the new message is answered, the call never runs, and the card says why
    the_answer(channel, conversation, "Fine, I kept them.")
    assert len(mcp_server.calls) == ran_before
    updated = [a for a in channel.connector.updates if a["id"] == card_id]
    assert updated and "Not run: you sent a new message" in json.dumps(updated[-1])
    # AND the model read that the call was not run before the new message
    assert "sent a new message" in tool_result_sent(channel, "delete_notes")
    history = channel.history(conversation)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "user", "assistant"]
    assert history[2]["decision"]["outcome"] == "superseded"
    # AND an Approve pressed now does nothing
    late = press(channel, conversation, card, APPROVE_VERB)
    assert late.status_code == 404
    assert len(mcp_server.calls) == ran_before
    assert channel.connector.streams.broken(conversation) == []


def test_a_channel_without_cards_gets_plain_text_answered_by_a_reply(
        channel: Bench, mcp_server: DemoMcpServer) -> None:
    # GIVEN a channel without Adaptive Cards (the test channel)
    conversation = f"test:{uuid.uuid4().hex}"
    ran_before = len(mcp_server.calls)
    channel.model.then(Scripted(tool_calls=[tool_call("delete_notes", {"topic": "plain"}, "p1")]),
                       Scripted(content="Deleted the plain ones."))
    message = channel.message("delete my plain notes", conversation_id=conversation,
                              channelId="test")
    assert channel.post(message).status_code == 200
    # WHEN the question arrives as text, and the person replies "approve"
    (question,) = wait_for(lambda: [r for r in channel.connector.messages(conversation)
                                    if "Approval needed" in (r.get("text") or "")],
                           what="the question")
    assert question["textFormat"] == "plain" and 'Reply "approve"' in question["text"]
    assert channel.post(channel.message("Approve", conversation_id=conversation,
                                        channelId="test")).status_code == 200
    # THEN the reply is acknowledged, the call runs once, and the answer follows
    the_answer(channel, conversation, "Approved by Ada")
    the_answer(channel, conversation, "Deleted the plain ones.")
    assert mcp_server.calls[ran_before:] == [("delete_notes", {"topic": "plain"})]
    assert [m["role"] for m in channel.history(conversation)] == ["user", "assistant", "tool",
                                                                 "assistant"]


@pytest.fixture(scope="module")
def short(azurite_connection_string: str, mcp_server: DemoMcpServer) -> Iterator[Bench]:
    """Requests expire after 3 s; holds after 5 s; queue leases after 4 s (a killed worker's
    message comes back soon)."""
    with bench(azurite_connection_string, answer_mode="queue",
               host_args=["--queue-lease-seconds", "4"],
               extra_env={"CHAT_MCP_SERVERS": demo_servers_setting(mcp_server.url),
                          "CHAT_SUGGESTED_REPLIES": "off", "CHAT_APPROVAL_MINUTES": "0.05",
                          "CHAT_HOLD_SECONDS": "5"}) as running:
        yield running


def test_an_expired_request_runs_nothing_and_its_card_says_so(
        short: Bench, mcp_server: DemoMcpServer) -> None:
    # GIVEN a card nobody answers
    conversation = personal()
    ran_before = len(mcp_server.calls)
    ask_to_delete(short, conversation, topic="late", then="unused")
    card_id, card = the_card(short, conversation)
    # WHEN it expires (3 s)
    updated = wait_for(lambda: [a for a in short.connector.updates if a["id"] == card_id],
                       what="the card's update")
    # THEN the card says so, nothing ran, and the turn so far is stored with the call declined
    assert "Expired" in json.dumps(updated[-1])
    assert len(mcp_server.calls) == ran_before
    history = wait_for(lambda: short.history(conversation), what="the stored turn")
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert history[2]["decision"]["outcome"] == "expired"
    # AND an Approve pressed now runs nothing
    assert press(short, conversation, card, APPROVE_VERB).status_code == 404
    time.sleep(1.0)
    assert len(mcp_server.calls) == ran_before
    assert short.connector.streams.broken(conversation) == []
    short.model.script.clear()


def test_a_worker_killed_between_the_approval_and_the_result_runs_the_call_once(
        short: Bench, mcp_server: DemoMcpServer) -> None:
    # GIVEN a call the demo server holds once it has started, and longer requests
    conversation = personal()
    ran_before = len(mcp_server.calls)
    mcp_server.hold_deletes()
    try:
        short.model.then(Scripted(tool_calls=[tool_call("delete_notes", {"topic": "crash"}, "k1")]),
                         Scripted(content="It may or may not have run."))
        assert short.post(short.message("delete my crash notes",
                                        conversation_id=conversation)).status_code == 200
        _, card = the_card(short, conversation)
        # WHEN the person approves, and the worker dies while the call runs
        assert press(short, conversation, card, APPROVE_VERB).status_code == 200
        wait_for(lambda: len(mcp_server.calls) > ran_before, what="the call's start")
        assert short.host.pid is not None
        os.kill(short.host.pid, signal.SIGKILL)
        short.host.stop()
        mcp_server.release_deletes()
        short.host.start()
        # THEN, once the hold and the lease run out, the turn goes on without running it again
        the_answer(short, conversation, "It may or may not have run.")
    finally:
        mcp_server.release_deletes()
    assert mcp_server.calls[ran_before:] == [("delete_notes", {"topic": "crash"})]
    assert "not known whether this call ran" in tool_result_sent(short, "delete_notes")
    assert [m["role"] for m in short.history(conversation)] == ["user", "assistant", "tool",
                                                               "assistant"]
    # AND the stream the dead worker opened for the resumed turn was ended by the next one
    assert short.connector.streams.broken(conversation) == []
