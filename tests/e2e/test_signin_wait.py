"""A turn that waits for its user to sign in, end to end: the dev host with the turn queue, the
token service and identity stand-ins, the demo MCP server's `whoami` (it checks the bearer
token), the contract-enforcing Bot Connector stand-in. The turn parks holding no worker; however
the user signs in (Teams' silent exchange, the button's code, a typed code), it resumes once,
through the queue, and the tool gets their token."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from devtools.fake_model import Scripted, tool_call
from devtools.fake_token_service import FakeTokenService
from shared.signin import OAUTH_CARD, SIGNED_IN, SIGNED_IN_GOING_ON
from tests.e2e.channel import SSO_CONNECTION, Bench, bench, in_group, invoke, stored_text

ANSWER = "Here is who you are."


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string, signin=True, answer_mode="queue", extra_env={
            "CHAT_STREAMING": "off", "CHAT_SUGGESTED_REPLIES": "off"}) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_script(channel: Bench) -> Iterator[None]:
    """Each test scripts its own model answers: none left by another (a failed one) is used."""
    channel.model.script.clear()
    yield


def tokens_of(channel: Bench) -> FakeTokenService:
    assert channel.tokens is not None
    return channel.tokens


def wait_for(condition: Callable[[], Any], *, seconds: float = 30.0, what: str = "it") -> Any:
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {seconds} s")
        time.sleep(0.05)
    return found


def cards(channel: Bench, conversation: str) -> list[dict[str, Any]]:
    return [a for a in channel.connector.messages(conversation)
            if any(x.get("contentType") == OAUTH_CARD for x in a.get("attachments", []))]


def texts(channel: Bench, conversation: str) -> list[str]:
    return [str(a.get("text") or "") for a in channel.connector.messages(conversation)]


def whoami_asked(channel: Bench, *, group: bool = False) -> tuple[str, str, dict[str, Any]]:
    """A new user asks; the model calls whoami: (user, conversation, the card they got)."""
    user = f"29:{uuid.uuid4().hex[:12]}"
    tokens_of(channel).user(user, "Ada Lovelace")
    conversation = f"19:{uuid.uuid4().hex}@thread.v2" if group else f"a:{uuid.uuid4().hex}"
    channel.model.then(Scripted(tool_calls=[tool_call("whoami", {}, f"w-{uuid.uuid4().hex[:6]}")]),
                       Scripted(content=ANSWER))
    activity = channel.message("who am I?", conversation_id=conversation)
    activity["from"] = {"id": user, "name": "Ada"}
    if group:
        in_group(activity, user=user, name="Ada")
    assert channel.post(activity).status_code == 200
    where = (lambda: channel.connector.personal.get(user)) if group else (lambda: conversation)
    card = wait_for(lambda: where() and cards(channel, where()), what="card")[0]
    return user, conversation, card


def from_user(channel: Bench, user: str, name: str, value: dict[str, Any], *,
              conversation: str) -> dict[str, Any]:
    activity = invoke(name, value, conversation_id=conversation, serviceUrl=channel.connector.url)
    activity["from"] = {"id": user, "name": "Ada"}
    return activity


def exchange(channel: Bench, user: str, card: dict[str, Any], *,
             conversation: str) -> dict[str, Any]:
    return from_user(channel, user, "signin/tokenExchange", {
        "id": card["attachments"][0]["content"]["tokenExchangeResource"]["id"],
        "connectionName": SSO_CONNECTION, "token": tokens_of(channel).sso_token(user)},
        conversation=conversation)


def link_of(card: dict[str, Any]) -> str:
    return str(card["attachments"][0]["content"]["buttons"][0]["value"])


def answered(channel: Bench, conversation: str) -> list[str]:
    return [text for text in texts(channel, conversation) if text == ANSWER]


def test_not_signed_in_the_turn_waits_then_resumes_once_with_the_users_token(
        channel: Bench) -> None:
    # GIVEN Ada, not signed in, asking a question whose tool acts as her
    user, conversation, card = whoami_asked(channel)
    calls = channel.model.calls
    # THEN the turn paused before the call: the card went out, whoami never ran, no answer yet
    assert channel.mcp is not None and all(name != "whoami" for name, _ in channel.mcp.calls)
    assert answered(channel, conversation) == [] and calls == len(channel.model.requests)
    # WHEN she presses the card's button, signs in, and Teams sends verifyState with the code
    code = tokens_of(channel).open_sign_in_link(link_of(card))
    response = channel.post(from_user(channel, user, "signin/verifyState", {"state": code},
                                      conversation=conversation))
    # THEN the invoke is answered at once, she is told the request goes on, and the turn resumes
    # through the queue: whoami ran with her token, the model answered, once
    assert response.status_code == 200
    wait_for(lambda: answered(channel, conversation), what="resumed answer")
    assert SIGNED_IN_GOING_ON.format(connection=SSO_CONNECTION) in texts(channel, conversation)
    tool_result = next(m["content"] for m in channel.model.requests[-1]["messages"]
                       if m["role"] == "tool")
    assert "You are Ada Lovelace" in tool_result
    time.sleep(1.0)  # a second resumed answer would have come by now
    assert len(answered(channel, conversation)) == 1
    assert [name for name, _ in channel.mcp.calls].count("whoami") >= 1
    # AND history holds one turn: the question, the call (decided: signed in), its result, the answer
    history = channel.history(conversation)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2]["decision"]["reason"] == "signin"


def test_teams_silent_sign_in_resumes_the_turn(channel: Bench) -> None:
    # GIVEN Ada's turn waiting for her sign-in
    user, conversation, card = whoami_asked(channel)
    # WHEN her Teams client exchanges its SSO token silently
    response = channel.post(exchange(channel, user, card, conversation=conversation))
    # THEN 200, and the turn resumes and is answered
    assert response.status_code == 200
    wait_for(lambda: answered(channel, conversation), what="resumed answer")


def test_a_refused_exchange_answers_412_and_the_button_then_resumes_the_turn(
        channel: Bench) -> None:
    # GIVEN Ada, who has not consented, with her turn waiting
    user, conversation, card = whoami_asked(channel)
    tokens_of(channel).consent_required.add(user)
    # WHEN Teams' silent exchange is refused THEN 412, and nothing resumes
    assert channel.post(exchange(channel, user, card, conversation=conversation)).status_code == 412
    time.sleep(1.0)
    assert answered(channel, conversation) == []
    # WHEN she uses the button instead THEN the turn resumes
    code = tokens_of(channel).open_sign_in_link(link_of(card))
    assert channel.post(from_user(channel, user, "signin/verifyState", {"state": code},
                                  conversation=conversation)).status_code == 200
    wait_for(lambda: answered(channel, conversation), what="resumed answer")


def test_duplicate_exchange_invokes_make_one_exchange_and_one_resumed_turn(
        channel: Bench) -> None:
    # GIVEN Ada's turn waiting, and Teams open on three devices
    user, conversation, card = whoami_asked(channel)
    exchanges, requests = len(tokens_of(channel).exchanges), len(channel.model.requests)
    invokes = [exchange(channel, user, card, conversation=conversation) for _ in range(3)]
    # WHEN the three clients' invokes arrive at once
    with ThreadPoolExecutor(3) as pool:
        statuses = [r.status_code for r in pool.map(channel.post, invokes)]
    # THEN all are answered 200, one exchange was made, and the turn resumed once
    assert statuses == [200, 200, 200]
    assert len(tokens_of(channel).exchanges) - exchanges == 1
    wait_for(lambda: answered(channel, conversation), what="resumed answer")
    time.sleep(1.0)
    assert len(answered(channel, conversation)) == 1
    assert len(channel.model.requests) - requests == 1  # the resumed turn's one model call


def test_a_typed_magic_code_resumes_the_turn_and_is_no_message(channel: Bench) -> None:
    # GIVEN Ada's turn waiting, and the code the sign-in page showed her
    user, conversation, card = whoami_asked(channel)
    code = tokens_of(channel).open_sign_in_link(link_of(card))
    # WHEN she types it in the chat
    activity = channel.message(code, conversation_id=conversation)
    activity["from"] = {"id": user, "name": "Ada"}
    assert channel.post(activity).status_code == 200
    # THEN the turn resumes, and the code was neither answered nor stored as a message
    wait_for(lambda: answered(channel, conversation), what="resumed answer")
    assert all(m["content"] != code for m in channel.history(conversation))


def test_in_a_group_chat_the_sign_in_in_her_own_chat_resumes_the_groups_turn(
        channel: Bench) -> None:
    # GIVEN Ada's question in a group chat; her card went to her one-to-one chat
    user, group, card = whoami_asked(channel, group=True)
    personal = channel.connector.personal[user]
    assert cards(channel, group) == []
    # WHEN she signs in there (Teams' silent exchange in her own chat)
    assert channel.post(exchange(channel, user, card, conversation=personal)).status_code == 200
    # THEN the group's turn resumes and is answered in the group
    wait_for(lambda: answered(channel, group), what="resumed answer in the group")
    assert answered(channel, personal) == []


def test_a_new_message_supersedes_the_wait_and_a_later_sign_in_asks_again(
        channel: Bench) -> None:
    # GIVEN Ada's turn waiting for her sign-in
    user, conversation, card = whoami_asked(channel)
    # WHEN she sends something else instead
    channel.model.script.clear()  # the paused turn's own answer would have come next
    channel.model.then(Scripted(content="Something else, answered."))
    other = channel.message("never mind, what is 2+2?", conversation_id=conversation)
    other["from"] = {"id": user, "name": "Ada"}
    assert channel.post(other).status_code == 200
    # THEN the new message is answered, and the waiting turn was closed: whoami never ran
    wait_for(lambda: "Something else, answered." in texts(channel, conversation), what="answer")
    history = channel.history(conversation)
    declined = [m for m in history if m["role"] == "tool"]
    assert declined and "instead of signing in" in declined[0]["content"]
    # WHEN she signs in afterwards THEN she is asked to send the question again; nothing resumes
    code = tokens_of(channel).open_sign_in_link(link_of(card))
    assert channel.post(from_user(channel, user, "signin/verifyState", {"state": code},
                                  conversation=conversation)).status_code == 200
    assert texts(channel, conversation)[-1] == SIGNED_IN.format(connection=SSO_CONNECTION)
    time.sleep(1.0)
    assert answered(channel, conversation) == []


def test_the_canary_no_token_or_code_in_the_parked_turn_the_log_or_storage(channel: Bench) -> None:
    # GIVEN a turn parked for a sign-in, one Teams exchange refused, then a code typed, the turn
    # resumed with the user's token exchanged for the tool's audience
    user, conversation, card = whoami_asked(channel)
    parked = stored_text(channel)  # the paused turn and its record, as they rest
    tokens_of(channel).consent_required.add(user)
    assert channel.post(exchange(channel, user, card, conversation=conversation)).status_code == 412
    code = tokens_of(channel).open_sign_in_link(link_of(card))
    activity = channel.message(code, conversation_id=conversation)
    activity["from"] = {"id": user, "name": "Ada"}
    channel.post(activity)
    wait_for(lambda: answered(channel, conversation), what="resumed answer")
    assert channel.identity.issued  # the tool's token was exchanged on-behalf-of
    secrets = [*tokens_of(channel).issued, *channel.identity.issued, code]
    # WHEN what the bot kept (before and after) and logged is read
    places = {"parked": parked, "storage": stored_text(channel), "log": channel.host.log_text(),
              "history": str(channel.history(conversation))}
    # THEN no token and no code is in any of it, though the turn is
    for place, text in places.items():
        assert not [secret for secret in secrets if secret in text], f"a secret in the {place}"
    assert "who am I?" in places["parked"] and "who am I?" in places["storage"]


def test_a_card_that_cannot_be_sent_leaves_the_turn_waiting_and_the_chat_working(
        channel: Bench) -> None:
    # GIVEN a token service that fails to make the card's sign-in resource, once
    user = f"29:{uuid.uuid4().hex[:12]}"
    conversation = f"a:{uuid.uuid4().hex}"
    tokens_of(channel).fail_on["GetSignInResource"] = deque([503])
    assert channel.mcp is not None
    ran = channel.mcp.calls.count(("whoami", {}))
    channel.model.then(Scripted(tool_calls=[tool_call("whoami", {}, "w-fail")]))
    activity = channel.message("who am I?", conversation_id=conversation)
    activity["from"] = {"id": user, "name": "Ada"}
    # WHEN the user asks, the turn pauses, and its card cannot be made
    assert channel.post(activity).status_code == 200
    wait_for(lambda: not tokens_of(channel).fail_on["GetSignInResource"], what="the card tried")
    # THEN no card went out, and whoami did not run
    assert cards(channel, conversation) == []
    # WHEN the user goes on with another message
    channel.model.then(Scripted(content="Answered anyway."))
    other = channel.message("fine, something else", conversation_id=conversation)
    other["from"] = {"id": user, "name": "Ada"}
    assert channel.post(other).status_code == 200
    # THEN it is answered: the waiting turn was closed first, nothing ran
    wait_for(lambda: "Answered anyway." in texts(channel, conversation), what="answer")
    assert channel.mcp.calls.count(("whoami", {})) == ran
