"""Budgets per user and per tenant on Azurite: the promise under parallel turns on several
instances, a dead worker's reservation, failing calls counted, the usage report and its CSV,
retention (shared/budgets.py, shared/store/_table_budgets.py, devtools/usage.py)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import pytest

from devtools import usage
from shared.answer import APOLOGY
from shared.bot import ChatBot
from shared.ledger import Account, Reservation
from shared.messages import utc_day
from shared.store import TableConversationStore
from shared.tokens import count_request_tokens
from shared.tools import tool
from tests.unit.test_turns import HEADERS, make_bot

MAX_REPLY = 200
TODAY = datetime.now(UTC)


class Clock:
    """A clock a test moves (the budgets' and the store's)."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


class HonestModel:
    """A model at the transport that bills each call at most its worst case, as a provider
    would: the prompt as the estimate counts it, and up to `MAX_REPLY` reply tokens; it notes
    what it billed by user. A `fail` message gets a tool call, then a 500."""

    def __init__(self, *, seed: int = 1, latency: float = 0.02, full: bool = False) -> None:
        """`full`: every reply bills the reply's maximum."""
        self.full = full
        self.rng = random.Random(seed)
        self.latency = latency
        self.billed: dict[str, int] = {}
        self.calls = 0
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        body = json.loads(request.content)
        self.requests.append(body)
        await asyncio.sleep(self.rng.uniform(0, self.latency))
        text = str([m for m in body["messages"] if m["role"] == "user"][-1]["content"])
        user = text.split("|")[0]
        if text.endswith("|fail") and body["messages"][-1]["role"] == "tool":
            return httpx2.Response(500, json={"error": {"message": "down"}})
        prompt = count_request_tokens(body["messages"], body.get("tools"))
        completion = MAX_REPLY if self.full else self.rng.randint(1, MAX_REPLY)
        self.billed[user] = self.billed.get(user, 0) + prompt + completion
        message: dict[str, Any] = {"role": "assistant", "content": f"answer {self.calls}"}
        if text.endswith("|fail"):
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}]})


def activity(text: str, conversation: str, *, user: str, tenant: str = "tenant-a",
             activity_id: str | None = None) -> bytes:
    return json.dumps({"type": "message", "id": activity_id or f"{conversation}-{text}",
                       "text": f"{user}|{text}", "channelId": "test", "deliveryMode": "expectReplies",
                       "conversation": {"id": conversation, "tenantId": tenant},
                       "from": {"id": user}}).encode()


@pytest.fixture
async def instances(azurite_connection_string: str,
                    table_name: str) -> AsyncIterator[Callable[..., list[ChatBot]]]:
    """Bots on their own stores (instances) over one table, closed after the test."""
    made: list[tuple[ChatBot, TableConversationStore]] = []

    def make(count: int, model: Any, clock: Callable[[], datetime] | None = None,
             **env: str) -> list[ChatBot]:
        bots = []
        for _ in range(count):
            store = TableConversationStore.from_connection_string(azurite_connection_string,
                                                                  table_name=table_name)
            if clock is not None:
                store.clock = clock
            bot = make_bot(store, model, real_backoff=True, CHAT_MAX_REPLY_TOKENS=str(MAX_REPLY),
                           CHAT_MODEL_MAX_RETRIES="0", CHAT_ANSWER_MODE="inline", **env,
                           **({"clock": clock} if clock is not None else {}))
            made.append((bot, store))
            bots.append(bot)
        return bots

    yield make
    for bot, store in made:
        await bot.prompt.model.close()
        await store.close()


def text_of(response: Any) -> str:
    assert "activities" in (response.body or {}), (response.status, response.body)
    return str(response.body["activities"][-1]["text"])


async def test_parallel_turns_on_three_instances_never_pass_the_budgets(
        instances: Callable[..., list[ChatBot]]) -> None:
    # GIVEN three instances on one table, a user budget and a tenant budget, and a model that
    # bills each call up to its worst case, 0-20 ms late
    model = HonestModel(seed=7)
    user_limit, tenant_limit = 2_500, 4_000
    bots = instances(3, model, CHAT_USER_DAILY_TOKEN_LIMIT=str(user_limit),
                     CHAT_TENANT_DAILY_TOKEN_LIMIT=str(tenant_limit))
    # WHEN three users of one tenant send 60 messages at once, in 9 conversations, spread over
    # the instances
    sends = [bots[i % 3].handle(body=activity(f"m{i}", f"c{i % 9}", user=f"u{i % 3}"),
                                headers=HEADERS) for i in range(60)]
    replies = [text_of(r) for r in await asyncio.gather(*sends)]
    # THEN each user's and the tenant's settled tokens are what the model billed, within the
    # limits (every call billed at most its reservation), with no reservation left open
    store = bots[0].store
    now = datetime.now(UTC).timestamp()
    for user in ("u0", "u1", "u2"):
        (day,) = await store.list_ledgers(Account("user", user), since=utc_day(TODAY))
        assert day.tokens == model.billed.get(user, 0) <= user_limit
        assert day.reserved(now) == 0
    (tenant,) = await store.list_ledgers(Account("tenant", "tenant-a"), since=utc_day(TODAY))
    assert tenant.tokens == sum(model.billed.values()) <= tenant_limit
    assert tenant.calls == model.calls and tenant.reserved(now) == 0
    # AND some turns were answered, the others got a budget reply, with no model call for them
    answered = [r for r in replies if r.startswith("answer")]
    assert 0 < len(answered) == model.calls < 60
    assert all("usage limit" in r for r in replies if r not in answered)


async def test_fifty_first_calls_at_once_of_one_tenant_are_all_reserved_and_counted(
        instances: Callable[..., list[ChatBot]]) -> None:
    # GIVEN three instances and a tenant budget with room for all (its row is every call's to
    # change, twice), and a model that takes up to 0.2 s
    model = HonestModel(latency=0.2)
    bots = instances(3, model, CHAT_TENANT_DAILY_TOKEN_LIMIT="100000000")
    # WHEN fifty users of the tenant write at once
    responses = await asyncio.gather(*(
        bots[i % 3].handle(body=activity("hi", f"c{i}", user=f"u{i}"), headers=HEADERS)
        for i in range(50)))
    # THEN every one is answered (no change of the row gave up after losing its races: the
    # changes of one instance go together), and the tenant's day counts every call and turn
    assert [text_of(r).startswith("answer") for r in responses] == [True] * 50
    (day,) = await bots[0].store.list_ledgers(Account("tenant", "tenant-a"),
                                              since=utc_day(TODAY))
    assert (day.calls, day.turns, day.tokens) == (50, 50, sum(model.billed.values()))


async def test_a_user_refused_at_once_never_holds_the_tenants_room(
        instances: Callable[..., list[ChatBot]]) -> None:
    # GIVEN two instances, a user with room for one answer, and a tenant with room for three
    # calls' worst cases (the user's turns would fill it if each held it while being refused)
    model = HonestModel(full=True)
    bots = instances(2, model, CHAT_USER_DAILY_TOKEN_LIMIT=str(2 * MAX_REPLY - 1),
                     CHAT_TENANT_DAILY_TOKEN_LIMIT=str(4 * MAX_REPLY))
    # WHEN the user sends 20 messages at once in four conversations, over both instances
    replies = [text_of(r) for r in await asyncio.gather(*(
        bots[i % 2].handle(body=activity(f"m{i}", f"c{i % 4}", user="ann"), headers=HEADERS)
        for i in range(20)))]
    # THEN exactly one is answered, and the 19 others are told the user's budget ran out
    assert model.calls == 1 and sum(r.startswith("answer") for r in replies) == 1
    assert sum(r.startswith("You've reached your daily usage limit") for r in replies) == 19


async def test_a_dead_workers_reservation_holds_the_budget_until_it_expires(
        instances: Callable[..., list[ChatBot]]) -> None:
    # GIVEN a user budget, and a reservation of all of it left by a worker that died mid-call
    clock = Clock(datetime.now(UTC).replace(hour=12))
    model = HonestModel()
    (bot,) = instances(1, model, clock, CHAT_USER_DAILY_TOKEN_LIMIT="1000",
                       CHAT_BUDGET_RESERVATION_SECONDS="60")
    dead = Reservation("dead-worker", 1_000, int(clock().timestamp()) + 60)
    await bot.store.update_ledger(Account("user", "ada"), utc_day(clock()),
                                  lambda day: day.reserve(dead, limit=None, now=0))  # type: ignore[arg-type, return-value]
    # WHEN the user writes before the reservation expires, and again after
    before = await bot.handle(body=activity("first", "c1", user="ada"), headers=HEADERS)
    clock.now += timedelta(seconds=61)
    after = await bot.handle(body=activity("second", "c1", user="ada"), headers=HEADERS)
    # THEN the first gets the budget reply with no model call, the second is answered
    assert "daily usage limit" in text_of(before)
    assert text_of(after) == "answer 1" and model.calls == 1
    (day,) = await bot.store.list_ledgers(Account("user", "ada"), since=utc_day(clock()))
    assert [r.id for r in day.reservations] == [] and day.tokens == model.billed["ada"]


async def test_tool_round_tokens_count_when_a_later_call_fails(
        instances: Callable[..., list[ChatBot]]) -> None:
    # GIVEN a tool, a user with a budget, and a model that calls the tool and then fails
    @tool
    async def lookup() -> str:
        """Look something up."""
        return "found"

    model = HonestModel()
    (bot,) = instances(1, model, CHAT_USER_DAILY_TOKEN_LIMIT="100000")
    bot.prompt.functions["lookup"] = lookup
    bot.prompt._all = bot.prompt._offered(bot.prompt.functions.values())  # the offered tools
    # WHEN the user asks
    response = await bot.handle(body=activity("look|fail", "c1", user="bob"), headers=HEADERS)
    # THEN they get the apology, and both the user's ledger and the conversation's counter
    # count the tool round as billed and the failed call as its request
    assert text_of(response) == APOLOGY and model.calls == 2
    failed = model.requests[1]
    expected = model.billed["bob"] + count_request_tokens(failed["messages"], failed["tools"])
    (day,) = await bot.store.list_ledgers(Account("user", "bob"), since=utc_day(TODAY))
    assert day.tokens == expected and day.calls == 2 and day.reserved(TODAY.timestamp()) == 0
    window = await bot.store.load_window("c1", token_budget=100, max_messages=1)
    assert window.spend.tokens_on_day(datetime.now(UTC)) == expected
    assert await bot.store.list_messages("c1") == []


async def test_a_retried_turn_takes_one_place_in_the_users_minute(
        instances: Callable[..., list[ChatBot]]) -> None:
    # GIVEN a user allowed one turn a minute, and a model whose first call fails
    honest = HonestModel()
    failures = [500]

    async def flaky(request: httpx2.Request) -> httpx2.Response:
        if failures:
            return httpx2.Response(failures.pop(), json={"error": {"message": "down"}})
        return await honest(request)

    clock = Clock(datetime.now(UTC).replace(second=10))
    (bot,) = instances(1, flaky, clock, CHAT_USER_TURNS_PER_MINUTE="1")
    body = activity("hello", "c1", user="dee")
    # WHEN the first attempt fails, and the channel sends the same message again
    first = await bot.handle(body=body, headers=HEADERS)
    again = await bot.handle(body=body, headers=HEADERS)
    # THEN the retry is answered, not refused: the user's minute counts the message once
    assert text_of(first) == APOLOGY
    assert text_of(again) == "answer 1"
    (day,) = await bot.store.list_ledgers(Account("user", "dee"), since=utc_day(clock()))
    assert (day.turns, day.minute_turns) == (1, 1)
    # AND another message in the same minute is refused
    other = await bot.handle(body=activity("next", "c1", user="dee"), headers=HEADERS)
    assert "faster" in text_of(other) and honest.calls == 1


async def test_without_limits_the_usage_is_still_recorded_once_per_turn(
        instances: Callable[..., list[ChatBot]]) -> None:
    # GIVEN no budget set
    model = HonestModel()
    (bot,) = instances(1, model)
    # WHEN a user has three turns
    for index in range(3):
        await bot.handle(body=activity(f"q{index}", "c1", user="cy"), headers=HEADERS)
    # THEN the user's and the tenant's day count three turns and what the model billed
    for account in (Account("user", "cy"), Account("tenant", "tenant-a")):
        (day,) = await bot.store.list_ledgers(account, since=utc_day(TODAY))
        assert (day.turns, day.calls, day.tokens) == (3, 3, model.billed["cy"])
        assert day.reservations == ()


async def test_the_usage_table_and_csv_list_each_tenant_and_day(
        instances: Callable[..., list[ChatBot]], azurite_connection_string: str,
        table_name: str) -> None:
    # GIVEN two tenants' turns today (a clock that stays on one day, though the suite may
    # cross midnight), and a priced model
    model = HonestModel()
    today = Clock(datetime.now(UTC))
    (bot,) = instances(1, model, today)
    for user, tenant in (("u1", "contoso"), ("u2", "contoso"), ("u3", "fabrikam")):
        await bot.handle(body=activity("hello", f"c-{user}", user=user, tenant=tenant),
                         headers=HEADERS)
    environ = {"CHAT_STORAGE_CONNECTION_STRING": azurite_connection_string,
               "CHAT_TABLE_NAME": table_name,
               "CHAT_MODEL_PRICES": '{"gpt-4o": {"input": 1, "output": 2}}'}
    # WHEN `make usage` runs for tenants, writing the CSV
    days = await usage.usage("tenant", 7, environ)
    table, sheet = io.StringIO(), io.StringIO()
    usage.write_table(days, table)
    usage.write_csv(days, sheet)
    # THEN the table sums each tenant (contoso first: two users), and the CSV has one line
    # per tenant and day with the cost from the price of "gpt-4o" (a prefix of the model)
    lines = table.getvalue().splitlines()
    assert lines[1].startswith("contoso") and lines[2].startswith("fabrikam")
    rows = list(csv.DictReader(io.StringIO(sheet.getvalue())))
    assert [(r["id"], r["day"], r["turns"]) for r in rows] == [
        ("contoso", utc_day(today()), "2"), ("fabrikam", utc_day(today()), "1")]
    contoso = rows[0]
    cost = (int(contoso["input_tokens"]) * 1 + int(contoso["output_tokens"]) * 2) / 1_000_000
    assert float(contoso["estimated_cost"]) == pytest.approx(cost)
    assert int(contoso["tokens"]) == model.billed["u1"] + model.billed["u2"]


async def test_retention_deletes_usage_rows_older_than_the_period(
        instances: Callable[..., list[ChatBot]]) -> None:
    # GIVEN a user's usage today and 40 days ago
    clock = Clock(datetime.now(UTC) - timedelta(days=40))
    model = HonestModel()
    (bot,) = instances(1, model, clock)
    await bot.handle(body=activity("old", "c1", user="dee"), headers=HEADERS)
    clock.now = datetime.now(UTC)
    await bot.handle(body=activity("new", "c1", user="dee"), headers=HEADERS)
    assert bot.budgets is not None
    # WHEN retention runs with a 30-day period
    deleted = await bot.budgets.purge(days=30)
    # THEN the old day's rows (user and tenant) are gone and today's stay
    assert deleted == 2
    report = await bot.budgets.report(Account("user", "dee"), days=60)
    assert [d.day for d in report.days if d.turns] == [utc_day(clock())]
