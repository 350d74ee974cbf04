"""Budgets per user and per tenant without I/O: the ledger's rules, the replies, the image rule,
the request estimate, and turns on the in-memory store (shared/budgets.py, shared/ledger.py)."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import pytest
from PIL import Image

from shared.activity import parse_activity
from shared.attachments import ImageInput, Incoming
from shared.budgets import BUDGET_REPLIES, Budgets, budget_reply, estimated_cost
from shared.errors import ModelUnavailable, SettingsError
from shared.ledger import MAX_RESERVATIONS, Account, Ledger, Reservation, Shortfall
from shared.messages import Usage, utc_day
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import ModelPrice, load_settings
from shared.store import InMemoryConversationStore
from shared.tokens import count_request_tokens, count_text_tokens, image_size, image_tokens
from shared.tools import tool
from tests.unit.test_telemetry import metric_points, recorded  # noqa: F401 (a fixture)
from tests.unit.test_turns import HEADERS, make_bot

NOON = datetime(2026, 12, 2, 12, 0, 30, tzinfo=UTC)
AT = NOON.timestamp()
ADA = Account("user", "aad-ada")


def ledger(**fields: Any) -> Ledger:
    return Ledger(account=ADA, day=utc_day(NOON), **fields)


# -- the ledger --------------------------------------------------------------------------------


def test_a_reservation_fits_only_when_used_and_reserved_and_it_stay_within_the_limit() -> None:
    # GIVEN a day with 600 tokens settled and 300 reserved by a call still running
    day = ledger(tokens=600, reservations=(Reservation("a", 300, int(AT) + 60),))
    # WHEN calls reserve their worst case against a limit of 1,000
    fits = day.reserve(Reservation("b", 100, int(AT) + 60), limit=1_000, now=AT)
    too_much = day.reserve(Reservation("c", 101, int(AT) + 60), limit=1_000, now=AT)
    # THEN 600 + 300 + 100 fits exactly, one token more does not, and no limit takes anything
    assert isinstance(fits, Ledger) and fits.reserved(AT) == 400
    assert too_much == Shortfall("daily_tokens")
    assert isinstance(day.reserve(Reservation("d", 10**9, 0), limit=None, now=AT), Ledger)


def test_an_expired_reservation_holds_nothing_and_is_let_go() -> None:
    # GIVEN a reservation of 900 tokens left by a worker that died, expired a second ago
    day = ledger(reservations=(Reservation("dead", 900, int(AT) - 1),))
    # WHEN a new call reserves 500 against a limit of 1,000
    after = day.reserve(Reservation("new", 500, int(AT) + 60), limit=1_000, now=AT)
    # THEN it fits, and the dead reservation is gone from the row
    assert isinstance(after, Ledger)
    assert [r.id for r in after.reservations] == ["new"] and day.reserved(AT) == 0


def test_settling_lets_the_reservation_go_and_counts_what_was_billed_by_model() -> None:
    # GIVEN a call that reserved 1,200 tokens
    day = ledger(reservations=(Reservation("a", 1_200, int(AT) + 60),))
    # WHEN it settles 300 prompt tokens (100 of them cached) and 50 completion tokens
    after = day.settle(Usage(prompt_tokens=300, completion_tokens=50, cached_tokens=100),
                       model="gpt-4o-mini", reservation_id="a")
    # THEN the reservation is gone and the day counts the tokens, the call and the model
    assert after.reservations == () and after.tokens == 350 and after.calls == 1
    assert (after.input_tokens, after.cached_tokens, after.output_tokens) == (300, 100, 50)
    assert [(m.model, m.input_tokens, m.output_tokens) for m in after.models] == [
        ("gpt-4o-mini", 300, 50)]


def test_the_minute_admits_its_limit_of_turns_then_starts_again() -> None:
    # GIVEN a user allowed 2 turns a minute
    day = ledger()
    for _ in range(2):
        admitted = day.admit(AT, turns_per_minute=2)
        assert isinstance(admitted, Ledger)
        day = admitted
    # WHEN a third turn comes in that minute, and another in the next
    # THEN the third is refused and the next minute's is admitted
    assert day.admit(AT, turns_per_minute=2) == Shortfall("turns_per_minute")
    later = day.admit(AT + 60, turns_per_minute=2)
    assert isinstance(later, Ledger) and later.minute_turns == 1 and later.turns == 3


def test_a_ledger_holds_a_bounded_number_of_reservations() -> None:
    # GIVEN a ledger with the most open reservations it may hold
    day = ledger(reservations=tuple(Reservation(str(i), 1, int(AT) + 60)
                                    for i in range(MAX_RESERVATIONS)))
    # WHEN one more is asked for, with room in the limit
    # THEN it is refused as if the budget were full (the row stays far below 64 KiB)
    assert day.reserve(Reservation("x", 1, int(AT) + 60), limit=10**9, now=AT) == \
        Shortfall("daily_tokens")
    assert len(day.reservations_json()) < 32_000


def test_the_estimated_cost_uses_the_longest_matching_price_and_none_when_unpriced() -> None:
    # GIVEN a day of gpt-4o-mini use: 1M input (half cached) and 1M output tokens
    day = ledger().settle(Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000,
                                cached_tokens=500_000), model="gpt-4o-mini-2024-07-18")
    prices = [ModelPrice(model="gpt-4o", input=2.5, cached_input=1.25, output=10),
              ModelPrice(model="gpt-4o-mini", input=0.15, cached_input=0.075, output=0.6)]
    # WHEN its cost is estimated
    # THEN the mini price applies (0.075 + 0.0375 + 0.6), and an unpriced model gives none
    assert estimated_cost(day, prices) == pytest.approx(0.7125)
    assert estimated_cost(day, prices[:0]) is None


# -- the replies -------------------------------------------------------------------------------


def test_the_budget_replies_say_which_budget_and_when_it_resets_in_the_users_time() -> None:
    # GIVEN a refusal at noon UTC; the day resets at midnight UTC
    midnight = datetime(2026, 12, 3, tzinfo=UTC)
    # WHEN the replies are written for a user in Paris and a tenant whose channel gave no zone
    user = budget_reply("user", "daily_tokens", now=NOON, resets=midnight,
                        time_zone="Europe/Paris")
    tenant = budget_reply("tenant", "daily_tokens", now=NOON, resets=midnight, time_zone=None)
    minute = budget_reply("user", "turns_per_minute", now=NOON,
                          resets=NOON.replace(second=0) + timedelta(minutes=1), time_zone=None)
    # THEN each names its budget and the reset in the user's terms, and no figures
    assert user == ("You've reached your daily usage limit for me, so I can't answer that right "
                    "now. It resets in 12 hours, at 01:00 your time.")
    assert tenant.startswith("Your organization has reached today's usage limit")
    assert tenant.endswith("It resets in 12 hours, at 00:00 UTC.")
    assert minute.endswith("Please wait 30 seconds and send that one again.")
    assert not any(ch.isdigit() for text in BUDGET_REPLIES.values() for ch in text)


# -- image tokens and the request's estimate ---------------------------------------------------


def test_images_count_as_openai_documents_for_the_gpt_4o_family() -> None:
    # GIVEN OpenAI's worked examples (high detail)
    # WHEN the tile rule counts them
    # THEN 1024 x 1024 is 765 tokens and 2048 x 4096 is 1,105 for gpt-4o; gpt-4o-mini bills
    # 2,833 + 5,667 a tile for the same price, and the context counts gpt-4o's figure
    assert image_tokens(1024, 1024, model="gpt-4o") == 765
    assert image_tokens(2048, 4096, model="gpt-4o") == 1_105
    assert image_tokens(1024, 1024, model="gpt-4o-mini") == 2_833 + 4 * 5_667
    assert image_tokens(1024, 1024, model="gpt-4o-mini", billed=False) == 765


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(out, format="PNG")
    return out.getvalue()


def test_a_request_with_an_image_counts_the_image_by_its_size_not_its_bytes() -> None:
    # GIVEN a request whose user message carries a 1024 x 1024 PNG as a data URL
    data = png(1024, 1024)
    url = f"data:image/png;base64,{base64.b64encode(data).decode()}"
    with_image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                               {"type": "image_url", "image_url": {"url": url}}]}]
    text_only = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}]}]
    # WHEN its prompt tokens are estimated for gpt-4o-mini and gpt-4o
    # THEN the image adds exactly its tile count, whatever its base64 length
    assert image_size(data) == (1024, 1024)
    assert count_request_tokens(with_image, model="gpt-4o-mini") - \
        count_request_tokens(text_only, model="gpt-4o-mini") == 2_833 + 4 * 5_667
    assert count_request_tokens(with_image, model="gpt-4o") - \
        count_request_tokens(text_only, model="gpt-4o") == 765
    # AND an image whose size cannot be read counts as the largest
    assert image_size(b"not an image") == (2048, 768)


def test_the_request_estimate_counts_the_tool_specs_too() -> None:
    # GIVEN a request and the tools it offers
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    # WHEN estimated with and without the tools
    # THEN the specs' JSON is counted
    assert count_request_tokens(messages, tools) == count_request_tokens(messages) + \
        count_text_tokens(json.dumps(tools))


# -- turns on the in-memory store --------------------------------------------------------------


class BillingModel:
    """A model at the transport that bills 1,000 tokens a call and answers with text."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "usage": {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1_000},
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"answer {self.calls}"}}]})


def message(text: str, conversation: str, *, user: str = "29:ada", tenant: str = "t-1",
            time_zone: str | None = None) -> bytes:
    activity: dict[str, Any] = {"type": "message", "id": f"{conversation}-{text}", "text": text,
                                "conversation": {"id": conversation, "tenantId": tenant},
                                "from": {"id": user}, "deliveryMode": "expectReplies",
                                "channelId": "test"}
    if time_zone:
        activity["localTimezone"] = time_zone
    return json.dumps(activity).encode()


def reply_of(response: Any) -> str:
    return str(response.body["activities"][-1]["text"])


async def test_a_user_over_budget_in_a_second_conversation_gets_the_reply_and_no_model_call() -> None:
    # GIVEN a user budget with room for one call's worst case (the prompt and 100 reply tokens)
    store, model = InMemoryConversationStore(clock=lambda: NOON), BillingModel()
    bot = make_bot(store, model, clock=lambda: NOON, CHAT_USER_DAILY_TOKEN_LIMIT="300",
                   CHAT_MAX_REPLY_TOKENS="100")
    # WHEN the user is answered in one conversation, then writes in another
    first = await bot.handle(body=message("hello", "c1"), headers=HEADERS)
    second = await bot.handle(body=message("again", "c2", time_zone="Asia/Tokyo"),
                              headers=HEADERS)
    # THEN the second gets the budget reply, in their time zone, with no model call
    assert reply_of(first) == "answer 1" and model.calls == 1
    assert reply_of(second) == ("You've reached your daily usage limit for me, so I can't answer "
                                "that right now. It resets in 12 hours, at 09:00 your time.")
    # AND the user's ledger counts the one call, with no reservation left open
    (day,) = await store.list_ledgers(Account("user", "29:ada"), since=utc_day(NOON))
    assert (day.tokens, day.calls, day.turns, day.reserved(AT)) == (1_000, 1, 1, 0)
    assert await store.list_messages("c2") == []


async def test_a_budget_that_runs_out_between_tool_rounds_ends_the_turn_politely() -> None:
    # GIVEN a tool the model calls, and a tenant budget with room for one call only
    @tool
    async def lookup() -> str:
        """Look something up."""
        return "found"

    calls = 0

    async def handler(request: httpx2.Request) -> httpx2.Response:
        nonlocal calls
        calls += 1
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "usage": {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1_000},
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}]})

    store = InMemoryConversationStore(clock=lambda: NOON)
    bot = make_bot(store, handler, clock=lambda: NOON, CHAT_TENANT_DAILY_TOKEN_LIMIT="1050",
                   CHAT_MAX_REPLY_TOKENS="100")
    bot.prompt.functions["lookup"] = lookup
    bot.prompt._all = bot.prompt._offered(bot.prompt.functions.values())  # the offered tools
    # WHEN the user asks, and the model calls the tool
    response = await bot.handle(body=message("look it up", "c1"), headers=HEADERS)
    # THEN the second round finds no room: one model call, the turn stored with its tool round
    # and a closing message that names the organization's budget
    assert calls == 1
    assert reply_of(response).startswith("I had to stop there, before I could finish. Your "
                                         "organization has reached today's usage limit")
    roles = [m.role for m in await store.list_messages("c1")]
    assert roles == ["user", "assistant", "tool", "assistant"]


async def test_the_usage_of_earlier_rounds_rides_on_the_model_error() -> None:
    # GIVEN a model that calls a tool (1,000 tokens billed), then fails
    @tool
    async def lookup() -> str:
        """Look something up."""
        return "found"

    answers = iter([200, 500])
    requests: list[dict[str, Any]] = []

    async def handler(request: httpx2.Request) -> httpx2.Response:
        requests.append(json.loads(request.content))
        if next(answers) == 500:
            return httpx2.Response(500, json={"error": {"message": "down"}})
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "usage": {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1_000},
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": "c1", "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"}}]}}]})

    settings = load_settings({"OPENAI_API_KEY": "sk-test", "CHAT_MODEL_MAX_RETRIES": "0"})
    model = build_model(settings.model,
                        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    prompt = ChatPrompt(model, functions=[lookup])
    # WHEN the turn runs into the failure
    with pytest.raises(ModelUnavailable) as failure:
        await prompt.send("look it up")
    await model.close()
    # THEN the error carries the first round's 1,000 tokens and the failed call's request
    failed = requests[1]
    assert failure.value.billed == Usage(
        prompt_tokens=900 + count_request_tokens(failed["messages"], failed["tools"]),
        completion_tokens=100)


# -- settings and who the budgets are for ------------------------------------------------------


def test_a_reservation_that_would_expire_before_the_model_deadline_is_refused_at_start() -> None:
    # GIVEN reservations of 20 s and a model deadline of 30 s
    # WHEN the settings are read
    # THEN start-up stops, naming the setting and why
    with pytest.raises(SettingsError, match="CHAT_BUDGET_RESERVATION_SECONDS: must be more than "
                                            "CHAT_MODEL_TIMEOUT_SECONDS"):
        load_settings({"CHAT_BUDGET_RESERVATION_SECONDS": "20",
                       "CHAT_MODEL_TIMEOUT_SECONDS": "30"})


@pytest.mark.parametrize("raw", ['["gpt-4o"]', '{"gpt-4o": {"input": 1}}',
                                 '{"gpt-4o": {"input": 1, "output": -2}}', "{nope"])
def test_a_malformed_price_list_is_refused_naming_the_setting(raw: str) -> None:
    # GIVEN a price list that is not {model: {"input", "output"[, "cachedInput"]}} of numbers
    # WHEN the settings are read THEN start-up stops, naming CHAT_MODEL_PRICES
    with pytest.raises(SettingsError, match="CHAT_MODEL_PRICES"):
        load_settings({"CHAT_MODEL_PRICES": raw})


def test_the_budgets_are_the_senders_entra_id_and_the_conversations_tenant() -> None:
    # GIVEN a Teams activity (Entra object ID, tenant in channelData only) and a Web Chat one
    teams = parse_activity(json.dumps({
        "type": "message", "id": "a", "conversation": {"id": "c"},
        "from": {"id": "29:x", "aadObjectId": "aad-x"},
        "channelData": {"tenant": {"id": "tenant-x"}}}).encode(), HEADERS)
    webchat = parse_activity(json.dumps({"type": "message", "id": "b", "conversation": {"id": "d"},
                                         "from": {"id": "dl_123"}}).encode(), HEADERS)
    store = InMemoryConversationStore()
    budgets = Budgets.build(load_settings({"CHAT_USER_DAILY_TOKEN_LIMIT": "10"}), store)
    assert budgets is not None
    # WHEN their turns' budgets are made
    # THEN the Teams user is counted by Entra ID and in its tenant; Web Chat's by channel ID only
    assert budgets.for_turn(teams).accounts == (Account("user", "aad-x"),
                                                Account("tenant", "tenant-x"))
    assert budgets.for_turn(webchat).accounts == (Account("user", "dl_123"),)


async def test_the_metrics_count_tokens_by_level_with_the_tenant_and_never_the_user(
        request: pytest.FixtureRequest) -> None:
    _, reader = request.getfixturevalue("recorded")  # telemetry into memory (test_telemetry)
    # GIVEN a user budget with room for one call, telemetry on
    store, model = InMemoryConversationStore(clock=lambda: NOON), BillingModel()
    bot = make_bot(store, model, clock=lambda: NOON, CHAT_USER_DAILY_TOKEN_LIMIT="300",
                   CHAT_MAX_REPLY_TOKENS="100")
    # WHEN the user is answered once, then refused
    await bot.handle(body=message("hello", "c1", user="29:secret-person"), headers=HEADERS)
    await bot.handle(body=message("again", "c2", user="29:secret-person"), headers=HEADERS)
    # THEN the budget tokens are counted by level with the tenant, the refusal by limit with the
    # tenant, and no metric attribute holds the user's ID
    points = metric_points(reader)
    tokens = {(p.attributes["chatstate.budget.level"], p.attributes["gen_ai.token.type"]): p.value
              for p in points["chatstate.budget.tokens"]}
    assert tokens == {("user", "input"): 900, ("user", "output"): 100,
                      ("tenant", "input"): 900, ("tenant", "output"): 100}
    assert {p.attributes["chatstate.tenant.id"] for p in points["chatstate.budget.tokens"]} == \
        {"t-1"}
    (refused,) = points["chatstate.spend_limit_reached"]
    assert dict(refused.attributes) == {"chatstate.limit": "user_daily_tokens",
                                        "chatstate.tenant.id": "t-1"}
    assert "secret-person" not in json.dumps(
        [dict(p.attributes) for found in points.values() for p in found])


def test_an_images_context_tokens_count_in_the_history_budget() -> None:
    # GIVEN a message with a 1024 x 1024 image
    incoming = Incoming(text="what is this?", images=(
        ImageInput(name="a.png", media_type="image/png", data=png(1024, 1024)),))
    # WHEN its tokens for the history budget are counted
    # THEN the image counts as the model's context sees it (gpt-4o's tiles), not as bytes
    assert incoming.image_tokens == 765
