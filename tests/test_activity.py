"""The activity type: request checks at parse, and the text the bot reads (mentions). No I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.activity import Activity, parse_activity
from tests.channel import event

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

