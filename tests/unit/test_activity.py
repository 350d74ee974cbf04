"""The activity type: request checks at parse, and the text the bot reads (mentions). No I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.activity import MAX_DEPTH, Activity, parse_activity
from shared.errors import BadRequest
from tests.e2e.channel import event

JSON = {"Content-Type": "application/json"}


def message(text: Any, **fields: Any) -> dict[str, Any]:
    return event("message", text=text, id="a-1", conversation_id="c-1",
                 serviceUrl="https://smba.trafficmanager.net/amer/", **fields)


def parsed(data: dict[str, Any]) -> Activity:
    return parse_activity(json.dumps(data).encode(), JSON)


def mention(user_id: str, name: str) -> dict[str, Any]:
    return {"type": "mention", "mentioned": {"id": user_id, "name": name}, "text": f"<at>{name}</at>"}


# -- mentions ---------------------------------------------------------------------------------


def test_the_bots_own_mention_is_stripped_and_other_mentions_become_names() -> None:
    # GIVEN a group-chat message that mentions the bot and two people
    text = "<at>chatstate</at> ask <at>Grace Hopper</at> and <AT>Alan</AT> about it"
    activity = parsed(message(text, entities=[
        mention("28:bot-app-id", "chatstate"), mention("29:grace", "Grace Hopper"),
        mention("29:alan", "Alan")]))
    # WHEN the bot reads it
    # THEN its own mention is gone and the people's mentions read as their names
    assert activity.message_text == "ask Grace Hopper and Alan about it"


def test_the_bots_mention_is_found_by_its_entity_when_its_name_differs() -> None:
    # GIVEN a mention whose text is not the bot's current name, but whose entity names the bot
    activity = parsed(message("<at>Old Bot Name</at> hello", entities=[
        {"type": "mention", "mentioned": {"id": "28:bot-app-id"}, "text": "<at>Old Bot Name</at>"}]))
    # WHEN the bot reads it THEN the mention is stripped
    assert activity.message_text == "hello"


def test_the_bots_mention_is_found_by_its_name_without_entities() -> None:
    # GIVEN a mention of the bot by name (recipient.name), no entities, and attributes on the tag
    activity = parsed(message('<at id="0">chatstate</at> what time is it?'))
    # WHEN the bot reads it THEN the mention is stripped
    assert activity.message_text == "what time is it?"


@pytest.mark.parametrize(("text", "expected"), [
    ("<at>Ada", "<at>Ada"),                        # never closed: left as written
    ("hi </at> there", "hi </at> there"),          # a stray close tag
    ("<attachment>x</attachment>", "<attachment>x</attachment>"),  # not a mention tag
    ("<at><at>Ada</at>", "<at>Ada"),               # the inner pair is the mention
    ("  plain text  ", "plain text"),
    ("", ""),
])
def test_malformed_mention_markup_is_left_as_written(text: str, expected: str) -> None:
    assert parsed(message(text)).message_text == expected


@pytest.mark.timeout(30)
def test_224_kb_of_mention_tags_is_read_in_linear_time() -> None:
    # GIVEN the message that held a worker for 46 s: 224 KB of `<at>` never closed, after a mention
    text = "<at>chatstate</at> x" + "<at>" * 56_000
    activity = parsed(message(text))
    # WHEN the bot reads it (pytest-timeout fails the test if this is quadratic again)
    result = activity.message_text
    # THEN the unclosed tags are kept as written and the bot's mention is gone
    assert result == "x" + "<at>" * 56_000


# -- request checks ---------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_not_a_recursion_error() -> None:
    # GIVEN a body of 100,000 nested arrays (well under the 1 MB cap)
    body = b"[" * 100_000 + b"]" * 100_000
    # WHEN it is parsed THEN it is refused as a bad request
    with pytest.raises(BadRequest, match="nests deeper"):
        parse_activity(body, JSON)


def test_an_activity_nested_deeper_than_the_limit_is_refused() -> None:
    # GIVEN a valid activity whose sender carries 200 levels of nesting (parseable, but echoed back
    # in the reply's recipient, where re-encoding it deep in a turn could fail after the commit)
    nested: Any = "deep"
    for _ in range(200):
        nested = {"x": nested}
    data = message("hi")
    data["from"]["extra"] = nested
    # WHEN it is parsed THEN it is refused before anything runs
    with pytest.raises(BadRequest, match=f"deeper than {MAX_DEPTH}"):
        parsed(data)


@pytest.mark.parametrize("field", ["text", "conversation.id", "locale", "from.name", "from.id",
                                   "recipient.name", "id", "serviceUrl", "channelId",
                                   "entities[0].text"])
def test_a_lone_surrogate_is_refused_naming_the_field(field: str) -> None:
    # GIVEN an activity with a lone surrogate ("\ud800" in the JSON) in one string
    data = message("hello", entities=[{"type": "mention", "text": "x"}])
    target: Any = data
    *parents, last = field.replace("[0]", ".0").split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = "bad \ud800 value"
    body = json.dumps(data).encode()  # ensure_ascii: the body holds the escape "\ud800", as sent
    assert b"\\ud800" in body
    # WHEN it is parsed THEN it is a 400 that names the field
    with pytest.raises(BadRequest) as refused:
        parse_activity(body, JSON)
    assert f"{field} is not valid Unicode" in str(refused.value)


def test_a_surrogate_pair_is_valid_text() -> None:
    # GIVEN an emoji written as a JSON surrogate pair WHEN parsed THEN it is the emoji
    body = json.dumps(message("smile \U0001F600")).encode()
    assert b"\\ud83d\\ude00" in body
    assert parse_activity(body, JSON).text == "smile \U0001F600"


@pytest.mark.parametrize(("field", "value"), [
    ("text", 42), ("text", ["a"]), ("text", {"a": 1}), ("locale", 7), ("serviceUrl", ["x"]),
    ("channelId", 1), ("deliveryMode", True),
])
def test_a_field_the_bot_reads_as_text_must_be_a_string(field: str, value: Any) -> None:
    # GIVEN a message whose field is not a string (it used to be ignored silently: a 200, no answer)
    data = message("hello")
    data[field] = value
    # WHEN it is parsed THEN it is a 400 naming the field
    with pytest.raises(BadRequest, match=f"{field} must be a string"):
        parsed(data)


def test_absent_or_null_optional_fields_are_fine() -> None:
    data = message("hello")
    del data["locale"]
    data["text"] = None
    activity = parsed(data)
    assert activity.text == "" and activity.message_text == ""


@pytest.mark.parametrize("field", ["id", "aadObjectId"])
def test_a_sender_id_the_store_cannot_keep_is_refused_before_any_model_call(field: str) -> None:
    # GIVEN a message whose sender ID has 40,000 characters (a user index row key holds 1,024)
    data = message("hello")
    data["from"] = {**data.get("from", {}), field: "x" * 40_000}
    # WHEN it is parsed THEN it is a 400 naming the field, before any model call
    with pytest.raises(BadRequest, match=f"from.{field} must have at most 1024 characters"):
        parsed(data)
    # AND one at the bound is taken
    data["from"][field] = "x" * 1_024
    assert parsed(data).user.ids
