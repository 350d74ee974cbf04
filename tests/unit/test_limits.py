"""Spend limits: the counters, the check, and a turn over a limit (in-memory store, no I/O)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx2
import pytest

from shared.limits import LIMIT_REPLIES, Spend, over_limit
from shared.messages import utc_day
from shared.settings import DataSettings, load_settings
from shared.store import InMemoryConversationStore
from tests.unit.test_turns import HEADERS, CountingModel, activity, make_bot

NOON = datetime(2026, 12, 2, 12, 0, 30, tzinfo=UTC)


class SpendingModel(CountingModel):
    """Reports 400 tokens of usage per call."""

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().__call__(request)
        body = json.loads(response.content)
        body["usage"] = {"prompt_tokens": 300, "completion_tokens": 100, "total_tokens": 400}
        return httpx2.Response(200, json=body)


def test_the_counters_start_again_each_minute_and_each_day() -> None:
    # GIVEN counters after two turns in one minute that spent 500 tokens
    spend = Spend().after_turn(NOON, tokens=200).after_turn(NOON, tokens=300)
    # WHEN they are read in the same minute, the next minute, and the next day
    # THEN turns count per minute and tokens per UTC day
    assert (spend.turns_in_minute(NOON), spend.tokens_on_day(NOON)) == (2, 500)
    later = NOON + timedelta(minutes=1)
    assert (spend.turns_in_minute(later), spend.tokens_on_day(later)) == (0, 500)
    assert spend.tokens_on_day(NOON + timedelta(days=1)) == 0
    assert spend.after_turn(later, tokens=1).minute_turns == 1


def test_over_limit_names_the_limit_passed_and_none_when_off() -> None:
    # GIVEN counters of 3 turns this minute and 900 tokens today
    spend = Spend().after_turn(NOON, tokens=900).after_turn(NOON, tokens=0) \
        .after_turn(NOON, tokens=0)
    # WHEN they are checked against limits
    # THEN each limit is named when reached, and no limit set means no refusal
    assert over_limit(spend, DataSettings(), NOON) is None
    assert over_limit(spend, DataSettings(max_turns_per_minute=3), NOON) == "turns_per_minute"
    assert over_limit(spend, DataSettings(max_turns_per_minute=4), NOON) is None
    assert over_limit(spend, DataSettings(daily_token_limit=900), NOON) == "daily_tokens"
    assert over_limit(spend, DataSettings(daily_token_limit=901), NOON) is None


def test_the_day_is_the_utc_day() -> None:
    # GIVEN a time just before midnight UTC, written in Tokyo's zone (already the next day there)
    late = datetime(2026, 12, 2, 23, 59, tzinfo=UTC).astimezone(ZoneInfo("Asia/Tokyo"))
    # WHEN its day is taken
    # THEN it is the UTC day, as the index partitions and the token counter name it
    assert utc_day(late) == "2026-12-02"


def test_the_limit_settings_are_read_and_checked() -> None:
    # GIVEN limits set, unset and wrong
    settings = load_settings({"CHAT_MAX_TURNS_PER_MINUTE": "6", "CHAT_DAILY_TOKEN_LIMIT": "50000",
                              "CHAT_RETENTION_DAYS": "30"})
    # WHEN they are read
    # THEN they arrive as numbers, unset is off, and a bad value names its setting
    assert settings.data == DataSettings(retention_days=30, max_turns_per_minute=6,
                                         daily_token_limit=50_000)
    assert load_settings({}).data == DataSettings()
    with pytest.raises(Exception, match="CHAT_RETENTION_DAYS"):
        load_settings({"CHAT_RETENTION_DAYS": "0"})


def frozen_store() -> InMemoryConversationStore:
    """A store whose clock (the turn reads the store's) stands still: no minute turns over
    mid-test."""
    return InMemoryConversationStore(clock=lambda: NOON)


async def test_a_turn_over_the_minute_limit_gets_a_polite_reply_and_no_model_call(
        caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a bot allowing 2 turns a minute per conversation
    store, model = frozen_store(), CountingModel()
    bot = make_bot(store, model, clock=lambda: NOON, CHAT_MAX_TURNS_PER_MINUTE="2")
    # WHEN three messages arrive in one minute (a fourth to another conversation)
    replies = [await bot.handle(body=activity(f"m{i}", "busy"), headers=HEADERS) for i in range(3)]
    other = await bot.handle(body=activity("hello", "calm"), headers=HEADERS)
    # THEN the third is told to wait, not AI-marked, and the model was asked twice for "busy"
    texts = [r.body["activities"][0]["text"] for r in replies if r.body]
    assert texts[:2] == ["echo m0", "echo m1"] and texts[2] == LIMIT_REPLIES["turns_per_minute"]
    third = replies[2].body["activities"][0]  # type: ignore[index]
    assert "entities" not in third
    assert model.calls == 3  # two for "busy", one for "calm"
    assert other.body is not None and other.body["activities"][0]["text"] == "echo hello"
    # AND nothing of the refused turn is stored
    assert [m.content for m in await store.list_messages("busy")] == ["m0", "echo m0", "m1",
                                                                       "echo m1"]
    # AND the log says which limit, with a stable key
    refusals = [r for r in caplog.records if r.getMessage().startswith("spend_limit_reached")]
    assert len(refusals) == 1 and "limit=turns_per_minute" in refusals[0].getMessage()
    assert refusals[0].levelno == logging.WARNING


async def test_a_conversation_past_its_daily_tokens_is_refused() -> None:
    # GIVEN a bot allowing 1,000 tokens a day per conversation, a model spending 400 a turn
    store, model = frozen_store(), SpendingModel()
    bot = make_bot(store, model, clock=lambda: NOON, CHAT_DAILY_TOKEN_LIMIT="1000")
    # WHEN four messages arrive
    replies = [await bot.handle(body=activity(f"t{i}", "daily"), headers=HEADERS) for i in range(4)]
    # THEN three are answered (the third crosses the limit) and the fourth is refused
    texts = [r.body["activities"][0]["text"] for r in replies if r.body]
    assert texts[:3] == ["echo t0", "echo t1", "echo t2"]
    assert texts[3] == LIMIT_REPLIES["daily_tokens"] and model.calls == 3
