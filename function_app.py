"""The Azure Functions app (Python v2 model): thin HTTP handlers over the chatstate runtime.

POST /api/messages                                   the Bot Framework messaging endpoint
GET  /api/health                                     healthy, or degraded naming what fails (503:
                                                     storage)
GET  /api/conversations/{conversation_id}/messages   the stored history, oldest first, and summary
                                                     (404 for a conversation never stored)
DELETE /api/conversations/{conversation_id}          forget a conversation
GET  /api/users/{user_id}/messages                   every stored message a user sent or received
DELETE /api/users/{user_id}                          forget a user (docs/operate.md)
GET  /api/users/{user_id}/usage?days=N               a user's tokens and turns, today and N-1 days
GET  /api/tenants/{tenant_id}/usage?days=N           a tenant's (docs/operate.md "Budgets")
queue answer (%CHAT_TURN_QUEUE%)                     answer an accepted message (shared/answer.py)
timer retention (%CHAT_RETENTION_SCHEDULE%)          delete conversations idle too long
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import azure.functions as func

from shared.errors import BadRequest, ChatstateError, http_status_for
from shared.ledger import Account, Level
from shared.messages import ChatMessage, utc_now
from shared.runtime import Runtime
from shared.settings import trigger_setting
from shared.tools import tool

if TYPE_CHECKING:
    from shared.budgets import DayUsage, UsageReport
    from shared.store import UserConversation, UserData


@tool
async def get_current_time(time_zone: str = "UTC") -> dict[str, str]:
    """The current date and time in an IANA time zone such as Europe/Paris or America/New_York."""
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe" is a folder of zones
        close = sorted(name for name in available_timezones() if time_zone.lower() in name.lower())
        raise ValueError(f"unknown time zone {time_zone!r}; did you mean one of {close[:5]}?") from None
    now = datetime.now(zone)
    return {"time_zone": time_zone, "iso": now.isoformat(timespec="seconds"),
            "weekday": now.strftime("%A")}


# Settings are read and checked here, at start-up: a bad one stops the app with its name. The
# runtime's parts (and the SDKs under them) are built on first use (shared/runtime.py).
runtime = Runtime.from_environment(functions=[get_current_time])
app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body, ensure_ascii=False) if body is not None else None,
                             status_code=status, headers=headers or {}, mimetype="application/json")


@app.route(route="messages", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def messages(req: func.HttpRequest) -> func.HttpResponse:
    response = await runtime.bot.handle(body=req.get_body(), headers=dict(req.headers))
    return _json(response.body, status=response.status, headers=response.headers)


@app.queue_trigger(arg_name="msg", queue_name=trigger_setting("CHAT_TURN_QUEUE"),
                   connection="AzureWebJobsStorage")
async def answer(msg: func.QueueMessage) -> None:
    """Wakes the conversation's drain (shared/order.py). Raises (`TurnFailed`, naming only the
    failure's kind) to have the message retried; a failing turn is retried by the drain itself."""
    await runtime.bot.answerer.answer_ticket(msg.get_body())


@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def health(req: func.HttpRequest) -> func.HttpResponse:
    """healthy (200); degraded when the model or storage refuses us or is unreachable, `failing`
    naming which: 200 with storage up (messages are still accepted and answered with an apology),
    503 with storage down (nothing can be). No tokens spent (docs/operate.md)."""
    from shared.health import check_health

    found = await check_health(runtime.store, runtime.model)
    body = {"status": found.status, "failing": list(found.failing), "storage": found.storage,
            "model": found.model.state.value, "modelDetail": found.model.detail}
    if "storage" in found.failing:
        return _json(body, status=503, headers={"Retry-After": "5"})
    return _json(body)


@app.route(route="conversations/{conversation_id}/messages", methods=["GET"])
async def conversation_messages(req: func.HttpRequest) -> func.HttpResponse:
    """404 for a conversation with no stored message and no summary (never seen, or cleared)."""
    conversation_id = req.route_params["conversation_id"]
    try:
        messages = await runtime.store.list_messages(conversation_id)
        summary = await runtime.store.get_summary(conversation_id)
    except ChatstateError as exc:
        return _failed(exc)
    if not messages and summary is None:
        return _json({"error": "conversation_not_found",
                      "reason": f"no stored messages for conversation {conversation_id!r}"},
                     status=404)
    return _json({"conversationId": conversation_id, "summary": summary,
                  "messages": [_message_json(message) for message in messages]})


@app.route(route="conversations/{conversation_id}", methods=["DELETE"])
async def clear_conversation(req: func.HttpRequest) -> func.HttpResponse:
    conversation_id = req.route_params["conversation_id"]
    try:
        await runtime.store.clear(conversation_id)
    except ChatstateError as exc:
        return _failed(exc)
    logging.info("cleared conversation=%r through the API", conversation_id)
    return func.HttpResponse(status_code=204)


@app.route(route="users/{user_id}/messages", methods=["GET"])
async def user_messages(req: func.HttpRequest) -> func.HttpResponse:
    """{"userId", "conversations": [{"conversationId", "type": "personal"|"shared",
    "messages": [{"direction": "sent"|"received", "role", "content", "activityId", ...}]}]}"""
    user_id = req.route_params["user_id"]
    try:
        data = await runtime.store.export_user(user_id)
    except ChatstateError as exc:
        return _failed(exc)
    return _json({"userId": user_id,
                  "conversations": [_user_conversation_json(found) for found in data.conversations]})


@app.route(route="users/{user_id}", methods=["DELETE"])
async def forget_user(req: func.HttpRequest) -> func.HttpResponse:
    """{"userId", "personalConversationsDeleted", "sharedConversations", "messagesReplaced",
    "usageDaysDeleted"}"""
    user_id = req.route_params["user_id"]
    try:
        data = await runtime.forget_user(user_id)
        usage_days = 0
        if runtime.budgets is not None:  # under each ID their messages were sent with
            usage_days = await runtime.budgets.forget_user([user_id, *(
                known for found in data.conversations for message in found.sent
                if message.sender is not None for known in message.sender.ids)])
    except ChatstateError as exc:
        return _failed(exc)
    body = {**_forget_json(data), "usageDaysDeleted": usage_days}
    logging.info("forgot a user through the API: %s", {k: v for k, v in body.items() if k != "userId"})
    return _json(body)


@app.route(route="users/{user_id}/usage", methods=["GET"])
async def user_usage(req: func.HttpRequest) -> func.HttpResponse:
    """{"userId", "limits", "today", "days": [{"day", "tokens", ...}], "total"}"""
    return await _usage(req, "user", req.route_params["user_id"])


@app.route(route="tenants/{tenant_id}/usage", methods=["GET"])
async def tenant_usage(req: func.HttpRequest) -> func.HttpResponse:
    """{"tenantId", "limits", "today", "days": [...], "total"}"""
    return await _usage(req, "tenant", req.route_params["tenant_id"])


async def _usage(req: func.HttpRequest, level: Level, account_id: str) -> func.HttpResponse:
    try:
        days = _days_asked(req.params.get("days"))
        if runtime.budgets is None:
            raise BadRequest("this store keeps no usage")
        report = await runtime.budgets.report(Account(level, account_id), days=days)
    except ChatstateError as exc:
        return _failed(exc)
    return _json(_usage_json(report))


def _days_asked(raw: str | None) -> int:
    from shared.budgets import MAX_REPORT_DAYS

    if raw is None or raw == "":
        return 7
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_REPORT_DAYS:
        raise BadRequest(f"days must be a whole number from 1 to {MAX_REPORT_DAYS}, got {raw[:20]!r}")
    return int(raw)


@app.timer_trigger(schedule=trigger_setting("CHAT_RETENTION_SCHEDULE"), arg_name="timer",
                   use_monitor=True)
async def retention(timer: func.TimerRequest) -> None:
    from shared.inbox import LEFTOVER_DAYS
    from shared.retention import purge_idle

    days = runtime.settings.data.retention_days
    await purge_idle(runtime.store, days=days)
    if days is not None and runtime.budgets is not None:  # usage rows: the same period
        logging.info("retention_run usage_rows_deleted=%d", await runtime.budgets.purge(days=days))
    if runtime.inbox is not None:  # accepted messages never answered (their tickets poisoned)
        await runtime.inbox.purge_before(utc_now() - timedelta(days=LEFTOVER_DAYS))


def _failed(error: ChatstateError) -> func.HttpResponse:
    return _json({"error": error.code, "reason": str(error)}, status=http_status_for(error))


def _message_json(message: ChatMessage) -> dict[str, Any]:
    """A stored message as the history endpoint shows it."""
    shown: dict[str, Any] = {"role": message.role, "content": message.content,
                             "activityId": message.activity_id,
                             "timestamp": message.timestamp.isoformat()}
    if message.tool_calls:
        shown["toolCalls"] = [call.to_openai() for call in message.tool_calls]
    if message.tool_call_id:
        shown["toolCallId"] = message.tool_call_id
    if message.name and message.role == "user":
        shown["speaker"] = message.name
    if message.model:
        shown["model"] = message.model
    if message.stopped:
        shown["stopped"] = True
    if message.attachments:
        shown["attachments"] = [attachment.to_json() for attachment in message.attachments]
    if message.feedback:
        shown["feedback"] = {"reaction": message.feedback.reaction, "text": message.feedback.text,
                             "at": message.feedback.at.isoformat()}
    if message.citations:
        shown["citations"] = [citation.to_json() for citation in message.citations]
    if message.decision:  # a tool call held back for a person: what they decided, who, when
        shown["decision"] = {"reason": message.decision.reason,
                             "outcome": message.decision.outcome, "by": message.decision.by,
                             "at": message.decision.at.isoformat()}
    if message.usage:
        shown["usage"] = {"promptTokens": message.usage.prompt_tokens,
                          "completionTokens": message.usage.completion_tokens,
                          "cachedTokens": message.usage.cached_tokens}
    return shown


def _user_conversation_json(found: UserConversation) -> dict[str, Any]:
    sent = {id(message) for message in found.sent}
    return {"conversationId": found.conversation_id,
            "type": "shared" if found.shared else "personal",
            "messages": [{"direction": "sent" if id(message) in sent else "received",
                          **_message_json(message)} for message in found.messages]}


def _usage_json(report: UsageReport) -> dict[str, Any]:
    days = [_day_json(day) for day in report.days]
    costs = [day.estimated_cost for day in report.days]
    total = {key: sum(day[key] for day in days) for key in
             ("tokens", "inputTokens", "cachedTokens", "outputTokens", "calls", "turns")}
    total["estimatedCost"] = round(sum(c for c in costs if c is not None), 6) \
        if all(c is not None for c in costs) else None
    return {f"{report.account.level}Id": report.account.id,
            "limits": {"dailyTokens": report.daily_limit, "turnsPerMinute": report.turns_per_minute},
            "today": days[-1], "days": days, "total": total}


def _day_json(day: DayUsage) -> dict[str, Any]:
    return {"day": day.day, "tokens": day.tokens, "inputTokens": day.input_tokens,
            "cachedTokens": day.cached_tokens, "outputTokens": day.output_tokens,
            "calls": day.calls, "turns": day.turns, "reservedTokens": day.reserved,
            "estimatedCost": day.estimated_cost}


def _forget_json(data: UserData) -> dict[str, Any]:
    return {"userId": data.user_id,
            "personalConversationsDeleted": sum(not c.shared for c in data.conversations),
            "sharedConversations": sum(c.shared for c in data.conversations),
            "messagesReplaced": sum(len(c.messages) for c in data.conversations if c.shared)}
