"""POST /api/messages end to end over real HTTP: the dev host, Azurite, local model and channel."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from shared import suggestions
from tests.e2e.channel import CLIENT_ID, Bench, bench, event


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string) as running:
        yield running


def new_conversation() -> str:
    return f"a:{uuid.uuid4().hex}"


def test_a_three_turn_conversation_is_remembered_and_replied_to(channel: Bench) -> None:
    # GIVEN a new conversation
    conversation = new_conversation()
    activities = [channel.message(text, conversation_id=conversation) for text in ("one", "two", "three")]
    # WHEN three messages arrive in turn
    statuses = [channel.post(activity).status_code for activity in activities]
    # THEN each is answered, and the model saw the earlier turns on the third
    assert statuses == [200, 200, 200]
    third_request = next(r for r in reversed(channel.model.requests)
                         if r["messages"][-1]["content"] == "three")
    assert [m["content"] for m in third_request["messages"]] == [
        "You are a test bot." + suggestions.INSTRUCTION, "one", "reply to 'one' after 2 messages", "two",
        "reply to 'two' after 4 messages", "three"]
    # AND the connector got three replies, each naming the activity it answers, marked AI-generated
    replies = channel.connector.messages(conversation)
    assert [r["replyToId"] for r in replies] == [a["id"] for a in activities]
    assert replies[2]["text"] == "reply to 'three' after 6 messages"
    assert replies[0]["entities"][0]["additionalType"] == ["AIGeneratedContent"]
    assert replies[0]["recipient"]["id"] == "29:user-1" and replies[0]["from"]["id"] == "28:bot-app-id"
    # AND each reply carried the bot's own token, fetched with the client secret
    sent = [r for r in channel.connector.requests if r["conversation_id"] == conversation]
    assert all(r["authorization"].startswith("Bearer outbound-") for r in sent)
    assert channel.identity.token_requests[0]["scope"] == "https://api.botframework.com/.default"
    # AND a typing indicator went out before the first reply
    kinds = [r["activity"]["type"] for r in sent]
    assert kinds.index("typing") < kinds.index("message")
    # AND the history endpoint shows the six messages, oldest first
    history = channel.history(conversation)
    assert [m["role"] for m in history] == ["user", "assistant"] * 3
    assert history[0]["activityId"] == activities[0]["id"] and history[1]["model"] == "bench-model"


def test_expect_replies_come_back_in_the_response(channel: Bench) -> None:
    conversation = new_conversation()
    activity = channel.message("inline please", conversation_id=conversation,
                               deliveryMode="expectReplies")
    response = channel.post(activity)
    assert response.status_code == 200
    body = response.json()
    assert body["activities"][0]["text"] == "reply to 'inline please' after 2 messages"
    assert body["activities"][0]["replyToId"] == activity["id"]
    assert channel.connector.messages(conversation) == []
    # A retry gets the same stored reply, without a second model call
    calls = channel.model.calls
    assert channel.post(activity).json() == body and channel.model.calls == calls


def test_reset_clears_the_conversation_and_confirms(channel: Bench) -> None:
    conversation = new_conversation()
    channel.post(channel.message("remember me", conversation_id=conversation))
    assert len(channel.history(conversation)) == 2
    assert channel.post(channel.message("/reset", conversation_id=conversation)).status_code == 200
    assert channel.history(conversation) == []
    assert "forgotten" in channel.connector.messages(conversation)[-1]["text"]
    channel.post(channel.message("fresh", conversation_id=conversation))
    assert channel.model.requests[-1]["messages"][1:] == [{"role": "user", "content": "fresh"}]


def test_the_api_clears_a_conversation(channel: Bench) -> None:
    conversation = new_conversation()
    channel.post(channel.message("hello", conversation_id=conversation))
    response = channel.http.delete(f"{channel.host.url}/api/conversations/{quote(conversation, safe='')}")
    assert response.status_code == 204 and channel.history(conversation) == []


def test_the_operator_routes_refuse_a_request_through_a_tunnel(channel: Bench) -> None:
    # GIVEN a stored conversation, and requests whose Host is a tunnel's, not this machine
    conversation = new_conversation()
    assert channel.post(channel.message("keep me", conversation_id=conversation)).status_code == 200
    path = f"{channel.host.url}/api/conversations/{quote(conversation, safe='')}"
    tunnel = {"Host": "chatbot.devtunnels.ms"}
    # WHEN the function-key routes are called through it
    listed = channel.http.get(f"{path}/messages", headers=tunnel)
    cleared = channel.http.delete(path, headers=tunnel)
    # THEN both get 401 with a reason (the dev host checks no keys), and nothing was cleared
    assert (listed.status_code, cleared.status_code) == (401, 401)
    assert "function key" in listed.json()["reason"]
    assert channel.history(conversation)[0]["content"] == "keep me"
    # AND the messaging endpoint (anonymous; its JWT is its guard) still answers through the tunnel
    activity = channel.message("through the tunnel", conversation_id=conversation)
    assert channel.post(activity, headers=tunnel).status_code == 200


def test_a_duplicate_after_delivery_spends_one_model_call_and_sends_one_reply(channel: Bench) -> None:
    conversation = new_conversation()
    activity = channel.message("only once", conversation_id=conversation)
    calls = channel.model.calls
    assert channel.post(activity).status_code == 200
    assert channel.post(activity).status_code == 200
    assert channel.model.calls == calls + 1
    assert len(channel.connector.messages(conversation)) == 1
    assert len(channel.history(conversation)) == 2


def test_a_duplicate_during_delivery_is_acknowledged_at_once(channel: Bench) -> None:
    # GIVEN a slow model
    from devtools.fake_model import Scripted

    conversation = new_conversation()
    activity = channel.message("slow one", conversation_id=conversation)
    channel.model.then(Scripted(content="finally", delay=1.5))
    calls = channel.model.calls
    # WHEN the channel retries while the first delivery is still being answered
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(channel.post, activity)
        time.sleep(0.5)
        started = time.monotonic()
        retry = channel.post(activity)
        retry_seconds = time.monotonic() - started
        assert first.result().status_code == 200
    # THEN the retry got 200 at once, one model call was spent and one reply sent
    assert retry.status_code == 200 and retry_seconds < 0.5
    assert channel.model.calls == calls + 1
    assert [r["text"] for r in channel.connector.messages(conversation)] == ["finally"]


def test_twenty_concurrent_messages_are_all_stored_exactly_once(channel: Bench) -> None:
    conversation = new_conversation()
    activities = [channel.message(f"m{i}", conversation_id=conversation) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda a: channel.post(a).status_code, activities))
    assert statuses == [200] * 20
    history = channel.history(conversation)
    assert sorted(m["content"] for m in history if m["role"] == "user") == sorted(f"m{i}" for i in range(20))
    assert all(history[i]["role"] == "user" and history[i + 1]["role"] == "assistant" and
               history[i]["activityId"] == history[i + 1]["activityId"] for i in range(0, 40, 2))
    assert len(channel.connector.messages(conversation)) == 20


def test_in_a_group_chat_the_bots_mention_is_stripped_and_others_stay_as_names(channel: Bench) -> None:
    # GIVEN a group-chat message that @mentions the bot and a colleague
    conversation = new_conversation()
    activity = channel.message("<at>chatstate</at> what does <at>Grace</at> think?",
                               conversation_id=conversation, entities=[
                                   {"type": "mention", "text": "<at>chatstate</at>",
                                    "mentioned": {"id": "28:bot-app-id", "name": "chatstate"}},
                                   {"type": "mention", "text": "<at>Grace</at>",
                                    "mentioned": {"id": "29:grace", "name": "Grace"}}])
    # WHEN it arrives
    assert channel.post(activity).status_code == 200
    # THEN the model and the history see the question with the colleague's name, not the bot's
    assert channel.model.requests[-1]["messages"][-1]["content"] == "what does Grace think?"
    assert channel.history(conversation)[0]["content"] == "what does Grace think?"


def test_a_welcome_greets_an_added_user_and_other_activities_are_ignored(channel: Bench) -> None:
    conversation = new_conversation()
    update = event("conversation_update", id=uuid.uuid4().hex, conversation_id=conversation,
                   serviceUrl=channel.connector.url)
    assert channel.post(update).status_code == 200
    assert "remembers" in channel.connector.messages(conversation)[0]["text"]
    for kind in ("typing", "messageReaction", "installationUpdate", "invoke"):
        other = channel.message("x", conversation_id=conversation, type=kind)
        assert channel.post(other).status_code == 200
    assert channel.history(conversation) == []


def test_an_entra_token_of_the_bots_own_app_is_accepted(channel: Bench) -> None:
    conversation = new_conversation()
    activity = channel.message("from the playground", conversation_id=conversation)
    response = channel.post(activity, token=channel.identity.entra_token(audience=CLIENT_ID))
    assert response.status_code == 200 and len(channel.history(conversation)) == 2


def test_an_entra_token_of_another_app_in_the_tenant_is_refused(channel: Bench) -> None:
    # GIVEN another app of the tenant, which can get a token for the bot's audience
    conversation = new_conversation()
    activity = channel.message("steal replies", conversation_id=conversation,
                               serviceUrl="https://attacker.example.com/", deliveryMode="expectReplies")
    token = channel.identity.entra_token(audience=CLIENT_ID, caller="some-other-app")
    # WHEN it posts THEN it is refused and nothing happens
    calls = channel.model.calls
    response = channel.post(activity, token=token)
    assert response.status_code == 401 and response.json() == {"error": "caller_not_allowed"}
    assert channel.model.calls == calls and channel.history(conversation) == []


@pytest.mark.parametrize("claims", [{"scp": "access_as_user", "oid": "user-oid", "sub": "user-sub"},
                                    {"idtyp": "user"}])
def test_a_delegated_entra_token_of_the_bots_own_app_is_refused(channel: Bench,
                                                                  claims: dict[str, str]) -> None:
    # GIVEN a user's delegated token minted through the bot's own app registration (azp = bot)
    conversation = new_conversation()
    activity = channel.message("steer me", conversation_id=conversation)
    token = channel.identity.entra_token(audience=CLIENT_ID, **claims)
    # WHEN it posts THEN it is refused: only app-only tokens of the bot's own app are accepted
    calls = channel.model.calls
    response = channel.post(activity, token=token)
    assert response.status_code == 401 and response.json() == {"error": "not_app_only"}
    assert channel.model.calls == calls and channel.history(conversation) == []


@pytest.mark.parametrize("issuer", ["botframework", "entra"])
def test_replies_never_go_to_a_host_off_the_allow_list(channel: Bench, issuer: str) -> None:
    # GIVEN a valid token (its serviceurl claim, for Bot Framework, matching) and a serviceUrl whose
    # host is not on BOT_SERVICE_URL_HOSTS: the bot's own token would go there with the reply
    conversation = new_conversation()
    activity = channel.message("reply over there", conversation_id=conversation,
                               serviceUrl="https://attacker.example.com/")
    token = (channel.token_for(activity) if issuer == "botframework"
             else channel.identity.entra_token(audience=CLIENT_ID))
    calls, sent = channel.model.calls, len(channel.connector.requests)
    # WHEN it posts
    response = channel.post(activity, token=token)
    # THEN it is a 400 that says why, before any model call, reply or stored row
    assert response.status_code == 400, response.text
    assert "BOT_SERVICE_URL_HOSTS" in response.json()["reason"]
    assert channel.model.calls == calls and len(channel.connector.requests) == sent
    assert channel.history(conversation) == []


def test_a_new_instance_accepts_valid_tokens_sent_during_its_first_key_fetch(
        azurite_connection_string: str) -> None:
    # GIVEN a new instance (no signing keys yet) and metadata that takes 0.5 s to answer
    with bench(azurite_connection_string) as fresh:
        fresh.identity.metadata_delay = 0.5
        activities = [fresh.message(f"m{i}", conversation_id=new_conversation(),
                                    deliveryMode="expectReplies") for i in range(10)]
        # WHEN ten valid messages arrive at once
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda a: fresh.post(a).status_code, activities))
        # THEN all ten are answered (a 401 is not retried by the channel: the message would be lost)
        assert statuses == [200] * 10
        assert fresh.identity.metadata_requests == 1


def test_when_no_signing_keys_can_be_had_the_answer_is_503_with_retry_after(
        azurite_connection_string: str) -> None:
    # GIVEN a new instance whose identity provider serves a JWKS document with no usable key
    with bench(azurite_connection_string) as fresh:
        fresh.identity.keys_body = b'{"keys": [{"kid": "bf-key-1", "kty": "RSA"}]}'
        conversation = new_conversation()
        activity = fresh.message("hello", conversation_id=conversation)
        # WHEN a valid message arrives
        response = fresh.post(activity)
        # THEN it is a 503 the channel retries, and nothing was done
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] and response.json()["error"] == "auth_keys_unavailable"
        assert fresh.model.calls == 0 and fresh.history(conversation) == []


def test_made_up_key_ids_cannot_make_the_bot_fetch_keys_again_and_again(channel: Bench) -> None:
    activity = channel.message("x", conversation_id=new_conversation())
    channel.post(activity, token=channel.token_for(activity, kid="warm-up"))
    fetched = channel.identity.metadata_requests
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda i: channel.post(
            activity, token=channel.token_for(activity, kid=f"made-up-{i}")).status_code, range(20)))
    assert statuses == [401] * 20
    assert channel.identity.metadata_requests == fetched


def test_malformed_optional_fields_do_not_break_a_turn(channel: Bench) -> None:
    conversation = new_conversation()
    activity = channel.message("odd sender", conversation_id=conversation, deliveryMode="expectReplies")
    activity["from"] = "not an object"
    activity["recipient"] = ["nor", "this"]
    response = channel.post(activity)
    assert response.status_code == 200 and response.json()["activities"][0]["recipient"] == {}


TOKEN_FAULTS = {
    "no token": None,
    "alg none": {"algorithm": "none"},
    "unknown key": {"kid": "not-a-key"},
    "signed by a stranger": {"key": "stranger"},
    "wrong audience": {"audience": "someone-else"},
    "wrong issuer": {"issuer": "https://evil.example.com"},
    "expired": {"expires_in": -400},
    "serviceurl mismatch": {"service_url": "https://smba.trafficmanager.net/evil/"},
    "channel not endorsed": {"channel": "skype"},
}


@pytest.mark.parametrize("fault", list(TOKEN_FAULTS))
def test_each_token_fault_gets_401_and_touches_nothing(channel: Bench, fault: str) -> None:
    conversation = new_conversation()
    options = TOKEN_FAULTS[fault]
    activity = channel.message("let me in", conversation_id=conversation)
    if options is None:
        token = None
    else:
        options = dict(options)
        if options.pop("channel", None):
            activity["channelId"] = "skype"
        if options.get("key") == "stranger":
            options["key"] = channel.identity.stranger
        token = channel.token_for(activity, **options)
    calls, sent = channel.model.calls, len(channel.connector.requests)
    response = channel.post(activity, token=token)
    assert response.status_code == 401, response.text
    assert set(response.json()) == {"error"}
    assert channel.model.calls == calls and len(channel.connector.requests) == sent
    assert channel.history(conversation) == []


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b"{not json", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (json.dumps({"type": "message", "id": "x"}).encode(), "application/json", 400),
    (json.dumps({"type": "message", "conversation": {"id": "c"}}).encode(), "application/json", 400),
    (json.dumps({"id": "x", "conversation": {"id": "c"}}).encode(), "application/json", 400),
    (b"[" * 200_000 + b"]" * 200_000, "application/json", 400),
    (json.dumps({"type": "message", "id": "x", "conversation": {"id": "c"}, "text": 42}).encode(),
     "application/json", 400),
    (b'{"type": "message"}', "text/plain", 415),
    (b'{"text": "' + b"x" * 1_100_000 + b'"}', "application/json", 413),
])
def test_bad_input_gets_a_4xx_with_a_reason_and_reaches_nothing(
        channel: Bench, body: bytes, content_type: str, status: int) -> None:
    calls = channel.model.calls
    response = channel.post(body, token=None, headers={"Content-Type": content_type})
    assert response.status_code == status
    assert response.json()["reason"]
    assert channel.model.calls == calls


@pytest.mark.parametrize("field", ["text", "from.name", "locale", "conversation.id"])
def test_a_lone_surrogate_gets_a_400_and_nothing_is_done(channel: Bench, field: str) -> None:
    # GIVEN a message with a lone surrogate ("\ud800" in the JSON) in a field the bot stores or
    # echoes, with a valid token
    conversation = new_conversation()
    activity = channel.message("hello", conversation_id=conversation)
    if field == "conversation.id":
        activity["conversation"]["id"] = conversation + "\ud800"
    elif field == "from.name":
        activity["from"]["name"] = "Ada \ud800"
    else:
        activity[field] = "x \ud800"
    calls, sent = channel.model.calls, len(channel.connector.requests)
    # WHEN it arrives, and again as the channel's retry
    responses = [channel.post(activity) for _ in range(2)]
    # THEN each is a 400 naming the field, and no model call, reply or stored row happened
    assert [r.status_code for r in responses] == [400, 400]
    assert f"{field} is not valid Unicode" in responses[0].json()["reason"]
    assert channel.model.calls == calls and len(channel.connector.requests) == sent
    assert channel.history(conversation) == []


def test_health_reports_storage(channel: Bench) -> None:
    response = channel.http.get(f"{channel.host.url}/api/health")
    assert response.status_code == 200 and response.json()["storage"] == "reachable"
    assert (response.json()["status"], response.json()["failing"]) == ("healthy", [])


def test_a_message_over_the_budget_gets_a_clear_refusal(azurite_connection_string: str) -> None:
    with bench(azurite_connection_string, auth=False,
               extra_env={"CHAT_HISTORY_TOKEN_BUDGET": "50"}) as local:
        conversation = new_conversation()
        activity = local.message("word " * 200, conversation_id=conversation,
                                 deliveryMode="expectReplies")
        response = local.post(activity, token=None)
        assert response.status_code == 200
        assert "too long" in response.json()["activities"][0]["text"]
        assert local.model.calls == 0 and local.history(conversation) == []


def test_with_auth_off_replies_go_only_to_loopback(azurite_connection_string: str) -> None:
    with bench(azurite_connection_string, auth=False) as local:
        conversation = new_conversation()
        ok = local.post(local.message("hi", conversation_id=conversation), token=None)
        assert ok.status_code == 200 and len(local.connector.messages(conversation)) == 1
        remote = local.message("hi", conversation_id=conversation,
                               serviceUrl="https://smba.trafficmanager.net/amer/")
        refused = local.post(remote, token=None)
        assert refused.status_code == 400 and "loopback" in refused.json()["reason"]
        # AND a malformed serviceUrl is a 400 too, not a 500 (nor a paid turn that cannot be sent)
        for malformed in ("http://[::1", "http://127.0.0.1:99999/", "http://127.0.0.1:port/"):
            odd = local.post(local.message("hi", conversation_id=conversation, serviceUrl=malformed),
                             token=None)
            assert odd.status_code == 400, (malformed, odd.text)
        assert local.model.calls == 1
