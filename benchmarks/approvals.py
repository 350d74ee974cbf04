"""Ask before acting: what a pending approval costs in storage operations, and how long the Approve
click takes to reach the tool.

`python -m benchmarks.run --only approvals`. One worker, the dev host (the real app) with the turn
queue and Teams streaming, the demo MCP server over real HTTP (its `delete_notes` asks first), the
model stand-in (a tool call, then an answer, no delay), the Bot Connector stand-in. The app's
storage goes through a counting proxy in front of Azurite: every table and queue request the app
makes (a batch counts once) is counted, by phase; the host's own queue polling is not (it reaches
Azurite directly, as the Functions host's would). Per round, in a new personal chat:

plain      a message answered without a tool: accept → delivered (the reference)
ask        a message whose model calls `delete_notes`: accept → the card sent (the turn paused,
           parked, its wake-up for the expiry queued; no worker left waiting)
click      the Approve invoke: POST → its answer (the webhook's check and record)
resume     the answer → the reply delivered (the resumed turn: the call, the model, the commit)

and the time from the click's POST (2 s after the card arrived: a person reads it) to the moment
the MCP server starts the call (the queue's pickup of the wake-up included: host.json polls at
most every 0.5 s).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer, Scripted, tool_call
from devtools.host import DevHostProcess
from devtools.local_server import LocalServer
from devtools.mcp_server import DemoMcpServer, demo_servers_setting
from shared.approval_card import APPROVE_VERB

from .common import code_version, machine, median, now_iso

_WAKE_PICKED_UP = re.compile(r"picked up after (\d+) ms \(wake\)")
ROUNDS = 12
WARMUP = 2
#: A person reads the card before they click (Teams' one streaming request a second per chat
#: would otherwise hold the resumed turn's "Thinking…" back behind the pause's last update).
READING_SECONDS = 2.0
CARD = "application/vnd.microsoft.card.adaptive"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class CountingProxy(LocalServer):
    """Forwards every request to `target` as it came, and counts it (`counts`, by service)."""

    def __init__(self, target: str, service: str) -> None:
        super().__init__()
        self.target = target.rstrip("/")
        self.service = service
        self.counts: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._forward)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        self.counts[self.service] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        body = await request.read()
        # As it came: no header of aiohttp's own (a Content-Type added would break the signature).
        async with self._session.request(request.method, self.target + request.path_qs,
                                         headers=headers, data=body or None,
                                         skip_auto_headers=("Content-Type", "User-Agent",
                                                            "Accept-Encoding", "Accept"),
                                         allow_redirects=False) as answer:
            answered = await answer.read()
            kept = {k: v for k, v in answer.headers.items()
                    if k.lower() not in ("transfer-encoding", "content-length", "connection")}
            return web.Response(status=answer.status, body=answered, headers=kept)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        await super().stop()


def _endpoints(connection_string: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)


def _proxied(connection_string: str, table: CountingProxy, queue: CountingProxy) -> str:
    parts = _endpoints(connection_string)
    account = parts.get("AccountName", "devstoreaccount1")
    parts["TableEndpoint"] = f"http://127.0.0.1:{table.port}/{account}"
    parts["QueueEndpoint"] = f"http://127.0.0.1:{queue.port}/{account}"
    return ";".join(f"{k}={v}" for k, v in parts.items())


def _root(endpoint: str) -> str:
    """An endpoint's scheme, host and port (the proxy keeps the path)."""
    match = re.match(r"^(https?://[^/]+)", endpoint)
    assert match is not None, endpoint
    return match.group(1)


class Counted:
    """The proxies' counts, read as differences between marks."""

    def __init__(self, *proxies: CountingProxy) -> None:
        self.proxies = proxies

    def now(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for proxy in self.proxies:
            total.update(proxy.counts)
        return total


async def _wait(condition: Any, *, seconds: float = 30.0, step: float = 0.002) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark waited too long")
        await asyncio.sleep(step)
    return found


def _activity(connector: FakeConnector, conversation: str, **fields: Any) -> dict[str, Any]:
    activity: dict[str, Any] = {
        "type": "message", "id": uuid.uuid4().hex, "channelId": "msteams",
        "serviceUrl": connector.url, "from": {"id": "29:user-1", "name": "Ada"},
        "recipient": {"id": "28:bot", "name": "chatstate"},
        "conversation": {"id": conversation, "conversationType": "personal"}, "text": ""}
    activity.update(fields)
    return activity


async def _round(http: aiohttp.ClientSession, url: str, connector: FakeConnector,
                 model: FakeModelServer, mcp: DemoMcpServer, counted: Counted) -> dict[str, Any]:
    def replies(conversation: str) -> list[dict[str, Any]]:
        return connector.messages(conversation)

    # plain: a message without a tool
    plain = f"a:{uuid.uuid4().hex}"
    model.then(Scripted(content="Plain answer."))
    before = counted.now()
    await http.post(url, json=_activity(connector, plain, text="hello"))
    await _wait(lambda: any(r.get("text") == "Plain answer." for r in replies(plain)))
    await asyncio.sleep(0.3)  # the delivered mark and the inbox row's removal follow the reply
    plain_ops = counted.now() - before
    # ask: a message whose model calls the tool that asks first
    chat = f"a:{uuid.uuid4().hex}"
    model.then(Scripted(tool_calls=[tool_call("delete_notes", {"topic": "bench"}, "b1")]),
               Scripted(content="Deleted."))
    before = counted.now()
    await http.post(url, json=_activity(connector, chat, text="delete the bench notes"))
    card_message = await _wait(lambda: [r for r in replies(chat) if r.get("attachments")])
    await asyncio.sleep(0.3)  # the card's ID written to the record, the hold released
    ask_ops = counted.now() - before
    card = card_message[0]["attachments"][0]["content"]
    data = next(a for a in card["actions"] if a["verb"] == APPROVE_VERB)["data"]
    await asyncio.sleep(READING_SECONDS)
    # click: Approve
    calls_before = len(mcp.call_times)
    before = counted.now()
    invoke = _activity(connector, chat, type="invoke", name="adaptiveCard/action",
                       value={"action": {"type": "Action.Execute", "verb": APPROVE_VERB,
                                         "data": data}, "trigger": "manual"})
    clicked = time.perf_counter()
    async with http.post(url, json=invoke) as response:
        await response.read()
        answered = time.perf_counter()
        assert response.status == 200, response.status
    click_ops = counted.now() - before
    # resume: to the reply
    before = counted.now()
    await _wait(lambda: len(mcp.call_times) > calls_before)
    tool_started = mcp.call_times[calls_before]
    await _wait(lambda: any(r.get("text") == "Deleted." for r in replies(chat)))
    await asyncio.sleep(0.3)
    resume_ops = counted.now() - before
    return {"plain": dict(plain_ops), "ask": dict(ask_ops), "click": dict(click_ops),
            "resume": dict(resume_ops), "click_ms": (answered - clicked) * 1000,
            "click_to_tool_ms": (tool_started - clicked) * 1000}


async def run(connection_string: str) -> dict[str, Any]:
    parts = _endpoints(connection_string)
    table = CountingProxy(_root(parts["TableEndpoint"]), "table")
    queue = CountingProxy(_root(parts["QueueEndpoint"]), "queue")
    model, connector, mcp = FakeModelServer(), FakeConnector(), DemoMcpServer()
    for server in (table, queue, model, connector):
        await server.start()
    await mcp.start()
    name = "b" + uuid.uuid4().hex[:12]
    env = {"CHAT_STORAGE_CONNECTION_STRING": _proxied(connection_string, table, queue),
           "AzureWebJobsStorage": connection_string, "CHAT_TABLE_NAME": name,
           "CHAT_TURN_QUEUE": f"bench-{name}", "CHAT_ANSWER_MODE": "queue",
           "OPENAI_BASE_URL": model.base_url, "OPENAI_MODEL": "bench-model",
           "CHAT_SUGGESTED_REPLIES": "off", "CHAT_SUMMARY": "off",
           "CHAT_MCP_SERVERS": demo_servers_setting(mcp.url)}
    host = DevHostProcess(env=env)
    await asyncio.to_thread(host.start)
    counted = Counted(table, queue)
    rounds: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{host.url}/api/messages"
            for index in range(WARMUP + ROUNDS):
                measured = await _round(http, url, connector, model, mcp, counted)
                if index >= WARMUP:
                    rounds.append(measured)
                _log(f"approvals: round {index + 1} of {WARMUP + ROUNDS}: click → tool "
                     f"{measured['click_to_tool_ms']:.0f} ms")
        # The queue's share of click → tool: the wake-up's pickup delay, as the answer logs it.
        pickups = [int(ms) for ms in _WAKE_PICKED_UP.findall(host.log_text())][-ROUNDS:]
    finally:
        await asyncio.to_thread(host.stop)
        await mcp.stop()
        for server in (connector, model, queue, table):
            await server.stop()

    def ops(phase: str, service: str) -> float:
        return median([r[phase].get(service, 0) for r in rounds])

    result: dict[str, Any] = {
        "measured_at": now_iso(), "code": code_version(), "machine": machine(),
        "rounds": ROUNDS,
        "storage_ops_median": {phase: {"table": ops(phase, "table"), "queue": ops(phase, "queue")}
                               for phase in ("plain", "ask", "click", "resume")},
        "click_answer_ms": {"median": median([r["click_ms"] for r in rounds]),
                            "max": max(r["click_ms"] for r in rounds)},
        "click_to_tool_ms": {"median": median([r["click_to_tool_ms"] for r in rounds]),
                             "max": max(r["click_to_tool_ms"] for r in rounds)},
        "wake_pickup_ms": {"median": median(pickups), "max": max(pickups)} if pickups else None,
    }
    ask_total = sum(result["storage_ops_median"][p][s] for p in ("ask", "click", "resume")
                    for s in ("table", "queue"))
    plain_total = sum(result["storage_ops_median"]["plain"].values())
    result["approval_extra_ops"] = ask_total - plain_total
    _print(result)
    return result


def _print(r: dict[str, Any]) -> None:
    print(f"\napprovals ({r['machine']}; {r['rounds']} rounds, medians)")
    print(f"  {'phase':<8} {'table':>6} {'queue':>6}")
    for phase, counts in r["storage_ops_median"].items():
        print(f"  {phase:<8} {counts['table']:>6g} {counts['queue']:>6g}")
    print(f"  an approved turn costs {r['approval_extra_ops']:g} storage operations more than a "
          "plain one")
    print(f"  the click answered in {r['click_answer_ms']['median']:.0f} ms (max "
          f"{r['click_answer_ms']['max']:.0f}); click → the tool call "
          f"{r['click_to_tool_ms']['median']:.0f} ms (max {r['click_to_tool_ms']['max']:.0f})")
    if r["wake_pickup_ms"]:
        print(f"  of which the queue's pickup of the wake-up: {r['wake_pickup_ms']['median']:.0f} "
              f"ms (max {r['wake_pickup_ms']['max']:.0f}; host.json polls at most every 0.5 s)")

