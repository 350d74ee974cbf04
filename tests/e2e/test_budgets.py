"""Budgets per user and per tenant through the dev host: the budget reply with no model call, six
messages at once over two instances, a dead worker's reservation, tokens of failed calls counted
(inline and through the queue's retries), the usage routes and the CSV (docs/operate.md
"Budgets")."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from devtools.fake_model import Scripted, tool_call
from shared.answer import APOLOGY
from shared.messages import utc_day
from shared.store import TableConversationStore
from shared.tokens import count_request_tokens
from tests.e2e.channel import Bench, bench

MAX_REPLY = 1_000
#: Every model answer bills this (prompt, completion): 1,000 tokens.
BILLED = (900, 100)
#: A user budget with room for one call's worst case (a prompt under 500 tokens and the reply's
#: maximum) and, once one call billed 1,000 tokens, none for a second.
ONE_ANSWER = MAX_REPLY + 500
USER_REFUSED = "You've reached your daily usage limit for me"
TENANT_REFUSED = "Your organization has reached today's usage limit for me"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def budgeted(azurite_connection_string: str) -> Iterator[Bench]:
    # The tenant budget has room for two answers, not three.
    with bench(azurite_connection_string, model_options={"usage": BILLED}, extra_env={
            "CHAT_MAX_REPLY_TOKENS": str(MAX_REPLY), "CHAT_MODEL_MAX_RETRIES": "0",
            "CHAT_SUGGESTED_REPLIES": "off",
            "CHAT_USER_DAILY_TOKEN_LIMIT": str(ONE_ANSWER),
            "CHAT_TENANT_DAILY_TOKEN_LIMIT": str(1_000 + ONE_ANSWER)}) as running:
        yield running


def group_message(running: Bench, text: str, *, conversation: str, user: str,
                  tenant: str) -> dict[str, Any]:
    """A message in a Teams group chat (no streaming: one reply message each)."""
    return running.message(text, conversation_id=conversation,
                           conversation={"id": conversation, "conversationType": "groupChat",
                                         "isGroup": True, "tenantId": tenant},
                           channelData={"tenant": {"id": tenant}},
                           **{"from": {"id": user, "name": user}})


def usage_of(running: Bench, level: str, account: str, days: int = 1) -> dict[str, Any]:
    response = running.http.get(f"{running.host.url}/api/{level}s/{quote(account, safe='')}"
                                f"/usage?days={days}")
    response.raise_for_status()
    return dict(response.json())


def new(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_user_over_budget_in_a_second_conversation_gets_the_reply_and_no_model_call(
        budgeted: Bench) -> None:
    # GIVEN a user answered once today in one group chat (the budget's one answer)
    user, tenant, first, second = new("29:u"), new("t"), new("g"), new("g")
    assert budgeted.post(group_message(budgeted, "question one", conversation=first, user=user,
                                       tenant=tenant)).status_code == 200
    assert budgeted.replies(first)[-1]["text"].startswith("reply to")
    calls = budgeted.model.calls
    # WHEN they write in a second conversation
    assert budgeted.post(group_message(budgeted, "question two", conversation=second, user=user,
                                       tenant=tenant)).status_code == 200
    # THEN they get the budget reply (which budget, when it resets, no figures), with no model
    # call and nothing stored
    (reply,) = budgeted.replies(second)
    assert reply["text"].startswith(USER_REFUSED) and "It resets in " in reply["text"]
    assert not any(str(n) in reply["text"] for n in (1_000, ONE_ANSWER))
    assert budgeted.model.calls == calls and budgeted.history(second) == []
    # AND their usage shows the one answer
    today = usage_of(budgeted, "user", user)["today"]
    assert (today["tokens"], today["calls"], today["turns"], today["reservedTokens"]) == \
        (1_000, 1, 1, 0)


def test_a_tenant_budget_answers_two_of_its_users_and_refuses_the_third(budgeted: Bench) -> None:
    # GIVEN a tenant with room for two answers, and three of its users
    tenant = new("t")
    users = [new("29:u") for _ in range(3)]
    chats = [new("g") for _ in range(3)]
    calls = budgeted.model.calls
    # WHEN each writes once, one after the other
    for user, chat in zip(users, chats, strict=True):
        assert budgeted.post(group_message(budgeted, "hello", conversation=chat, user=user,
                                           tenant=tenant)).status_code == 200
        budgeted.replies(chat)
    # THEN the first two are answered and the third is told the organization's budget ran out,
    # with no figure of the others' use, and no model call for it
    texts = [budgeted.replies(chat)[-1]["text"] for chat in chats]
    assert texts[0].startswith("reply to") and texts[1].startswith("reply to")
    assert texts[2].startswith(TENANT_REFUSED) and "2,000" not in texts[2]
    assert budgeted.model.calls == calls + 2
    assert usage_of(budgeted, "tenant", tenant)["today"]["tokens"] == 2_000


def test_six_messages_at_once_from_one_user_in_three_conversations_over_two_instances(
        budgeted: Bench) -> None:
    # GIVEN two instances (dev hosts) on one table, and a user whose budget holds one answer
    user, tenant = new("29:u"), new("t")
    chats = [new("g") for _ in range(3)]
    calls = budgeted.model.calls
    with budgeted.another_host() as second:
        messages = [group_message(budgeted, f"at once {i}", conversation=chats[i % 3], user=user,
                                  tenant=tenant) for i in range(6)]
        # WHEN the user's six messages in three conversations arrive at once, three on each
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(
                lambda i: budgeted.post(messages[i], host=second if i % 2 else None).status_code,
                range(6)))
        assert statuses == [200] * 6
        # THEN one model call answers one of them, and the five others get the budget reply
        texts = [r["text"] for chat in chats for r in budgeted.replies(chat, count=2)]
        assert budgeted.model.calls == calls + 1
        assert sum(t.startswith("reply to") for t in texts) == 1
        assert sum(t.startswith(USER_REFUSED) for t in texts) == 5
        assert usage_of(budgeted, "user", user)["today"]["tokens"] == 1_000


def test_the_usage_routes_and_the_csv(budgeted: Bench, azurite_connection_string: str,
                                      tmp_path: Path) -> None:
    # GIVEN a user answered once today
    user, tenant, chat = new("29:u"), new("t"), new("g")
    budgeted.post(group_message(budgeted, "count me", conversation=chat, user=user,
                                tenant=tenant))
    budgeted.replies(chat)
    # WHEN the operator asks for their last three days, and the tenant's
    report = usage_of(budgeted, "user", user, days=3)
    tenant_report = usage_of(budgeted, "tenant", tenant, days=3)
    # THEN each lists three days, today last, with the limits in force
    assert report["userId"] == user and [d["day"] for d in report["days"]][-1] == \
        utc_day(datetime.now(UTC))
    assert len(report["days"]) == 3 and report["total"]["tokens"] == 1_000
    assert report["limits"] == {"dailyTokens": ONE_ANSWER, "turnsPerMinute": None}
    assert tenant_report["tenantId"] == tenant and tenant_report["today"]["turns"] == 1
    # AND a bad day count is a 400 with a reason
    bad = budgeted.http.get(f"{budgeted.host.url}/api/users/{quote(user)}/usage?days=0")
    assert bad.status_code == 400 and "days must be" in bad.json()["reason"]
    # WHEN `make usage` writes the users' CSV from the same table
    sheet = tmp_path / "usage.csv"
    env = {**os.environ, "CHAT_STORAGE_CONNECTION_STRING": azurite_connection_string,
           "CHAT_TABLE_NAME": budgeted.host.env["CHAT_TABLE_NAME"]}
    done = subprocess.run([sys.executable, "-m", "devtools.usage", "--level", "user", "--days",
                           "2", "--csv", str(sheet)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    # THEN it prints the table and the CSV holds the user's day
    assert done.returncode == 0, done.stderr
    assert user in done.stdout
    rows = {row["id"]: row for row in csv.DictReader(sheet.open(encoding="utf-8"))}
    assert (rows[user]["day"], rows[user]["tokens"], rows[user]["turns"]) == \
        (utc_day(datetime.now(UTC)), "1000", "1")


def test_a_dead_workers_reservation_is_freed_when_it_expires(
        azurite_connection_string: str) -> None:
    # GIVEN a user budget for one answer, reservations that outlive a dead worker by 11 s, and a
    # model that takes 30 s over the first answer
    with bench(azurite_connection_string, model_options={"usage": BILLED}, extra_env={
            "CHAT_MAX_REPLY_TOKENS": str(MAX_REPLY), "CHAT_USER_DAILY_TOKEN_LIMIT": str(ONE_ANSWER),
            "CHAT_BUDGET_RESERVATION_SECONDS": "11"}) as running:
        user, tenant, chat = new("29:u"), new("t"), new("g")
        running.model.then(Scripted(content="never seen", delay=30.0))
        first = threading.Thread(target=lambda: _post_quietly(running, group_message(
            running, "one", conversation=chat, user=user, tenant=tenant)), daemon=True)
        first.start()
        deadline = time.monotonic() + 20
        while running.model.calls == 0:
            assert time.monotonic() < deadline, "the turn never reached the model"
            time.sleep(0.05)
        # WHEN the worker dies mid-call (SIGKILL), holding its reservation, and comes back
        assert running.host.pid is not None
        os.kill(running.host.pid, signal.SIGKILL)
        running.host.stop()
        running.host.start()
        # THEN a message meanwhile gets the budget reply, with no model call
        assert usage_of(running, "user", user)["today"]["reservedTokens"] > MAX_REPLY
        running.post(group_message(running, "two", conversation=chat, user=user, tenant=tenant))
        assert running.replies(chat)[-1]["text"].startswith(USER_REFUSED)
        assert running.model.calls == 1
        # AND once the reservation expires, the next message is answered
        deadline = time.monotonic() + 30
        while usage_of(running, "user", user)["today"]["reservedTokens"]:
            assert time.monotonic() < deadline, "the reservation never expired"
            time.sleep(0.2)
        running.post(group_message(running, "three", conversation=chat, user=user, tenant=tenant))
        assert running.replies(chat, count=2)[-1]["text"].startswith("reply to")
        assert running.model.calls == 2


def _post_quietly(running: Bench, activity: dict[str, Any]) -> None:
    try:
        running.post(activity)
    except Exception:  # the worker is killed under it
        pass


@pytest.fixture(scope="module")
def roomy(azurite_connection_string: str) -> Iterator[Bench]:
    """The turn queue (host.json: retries 5 s apart) and a user budget with room for all."""
    with bench(azurite_connection_string, answer_mode="queue", model_options={"usage": BILLED},
               extra_env={"CHAT_MODEL_MAX_RETRIES": "0", "CHAT_SUGGESTED_REPLIES": "off",
                          "CHAT_USER_DAILY_TOKEN_LIMIT": "1000000"}) as running:
        yield running


def test_tool_round_tokens_count_when_a_later_call_fails_inline(roomy: Bench) -> None:
    # GIVEN a model that calls a tool (billing 1,000 tokens), then fails
    user, tenant, chat = new("29:u"), new("t"), new("g")
    roomy.model.then(Scripted(tool_calls=[tool_call("get_current_time", {})]),
                     Scripted(status=500, error={"message": "down"}))
    # WHEN the user asks, answered inline (expectReplies)
    response = roomy.post(group_message(roomy, "what time is it", conversation=chat, user=user,
                                        tenant=tenant) | {"deliveryMode": "expectReplies"})
    # THEN they get the apology, and their usage and the conversation's counter count the tool
    # round and the failed call as its request (the provider reported nothing for it)
    assert [a["text"] for a in response.json()["activities"]] == [APOLOGY]
    failed = roomy.model.requests[-1]
    expected = 1_000 + count_request_tokens(failed["messages"], failed.get("tools"))
    today = usage_of(roomy, "user", user)["today"]
    assert (today["tokens"], today["calls"], today["reservedTokens"]) == (expected, 2, 0)
    assert usage_of(roomy, "tenant", tenant)["today"]["tokens"] == expected
    assert asyncio.run(_conversation_tokens(roomy, chat)) == expected


def test_each_queue_retry_counts_what_it_billed(roomy: Bench) -> None:
    # GIVEN a model that calls a tool and then fails on the first two tries, and answers on
    # the third
    user, tenant, chat = new("29:u"), new("t"), new("g")
    tool = Scripted(tool_calls=[tool_call("get_current_time", {})])
    down = Scripted(status=500, error={"message": "down"})
    first = len(roomy.model.requests)
    roomy.model.then(tool, down, tool, down, tool, Scripted(content="at last"))
    # WHEN the user asks, through the turn queue
    assert roomy.post(group_message(roomy, "what time is it", conversation=chat, user=user,
                                    tenant=tenant)).status_code == 200
    # THEN the third try answers
    assert [r["text"] for r in roomy.replies(chat, seconds=60)] == ["at last"]
    # AND the user's usage and the conversation's counter both count every try's billing:
    # four answered calls and the two failed ones as their requests
    failed = [roomy.model.requests[first + i] for i in (1, 3)]
    expected = 4 * 1_000 + sum(count_request_tokens(r["messages"], r.get("tools"))
                               for r in failed)
    today = usage_of(roomy, "user", user)["today"]
    assert (today["tokens"], today["calls"], today["reservedTokens"]) == (expected, 6, 0)
    assert asyncio.run(_conversation_tokens(roomy, chat)) == expected


async def _conversation_tokens(running: Bench, conversation: str) -> int:
    async with TableConversationStore.from_connection_string(
            running.host.env["CHAT_STORAGE_CONNECTION_STRING"],
            table_name=running.host.env["CHAT_TABLE_NAME"]) as store:
        window = await store.load_window(conversation, token_budget=100, max_messages=1)
        return window.spend.tokens_on_day(datetime.now(UTC))
