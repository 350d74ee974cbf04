"""What acting as the user adds to a turn: one token service call and one on-behalf-of exchange.

`python -m benchmarks.run --only signin`. In this process: the real `ChatPrompt` over the real
openai SDK against the local model stand-in, the demo MCP server (its `whoami` checks the bearer
token), the token service stand-in and the identity stand-in's on-behalf-of grant (over HTTPS,
as Entra is), all on loopback. Turns alternate: the model calls `search_docs` (no user), then
`whoami` on a server with `asUser` (the user's token, exchanged for its audience), TURNS pairs; the
figure is the median of the paired differences of wall time, beside the calls each turn made to
the token service and to Entra (goal: one each), and what a Teams single sign-on exchange costs in
time against Azurite: the first invoke (a conditional create, the exchange, a merge, the
pending rows cleared, the note sent), and a duplicate from another client (a refused create and
one read of the outcome).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from devtools.fake_channel import FakeConnector, FakeIdentity
from devtools.fake_model import FakeModelServer, Scripted, tool_call
from devtools.fake_token_service import Connection, FakeTokenService
from devtools.local_server import loopback_certificate
from devtools.mcp_server import BearerCheck, DemoMcpServer
from shared.activity import parse_activity
from shared.connector import BotConnector
from shared.mcp import McpTools
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import McpServerSettings, SignInSettings, UserAccess, load_settings
from shared.signin import SignIn
from shared.signin_store import SignInStore
from shared.token_service import TokenService
from shared.user_tokens import UserTokens

from .common import code_version, machine, median, now_iso

TURNS = 100
WARMUP = 10
EXCHANGES = 20
USER = "29:bench-user"
AUDIENCE = "api://mcp-bench"


async def _bot_token() -> str:
    return "bot-token"


def _activity(kind: str = "message", **fields: Any) -> Any:
    body = {"type": kind, "id": "a1", "channelId": "msteams", "serviceUrl": "http://127.0.0.1:9",
            "from": {"id": USER, "name": "Ada"}, "recipient": {"id": "28:bot", "name": "bot"},
            "conversation": {"id": "a:bench", "conversationType": "personal",
                             "tenantId": "tenant-1"}, "text": "hi", **fields}
    return parse_activity(json.dumps(body).encode(), {"Content-Type": "application/json"})


async def run(connection_string: str) -> dict[str, Any]:
    for noisy in ("httpx2", "mcp", "uvicorn", "azure", "shared"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    folder = tempfile.TemporaryDirectory()
    certificate = loopback_certificate(Path(folder.name))
    identity = FakeIdentity(certificate=certificate)
    identity.obo_apps["sso-app"] = "secret"
    tokens = FakeTokenService([Connection(name="sso", audience="api://botid-sso-app",
                                          exchange_uri="api://botid-sso-app")],
                              signing_key=identity.keys["entra-key-1"], kid="entra-key-1")
    model_server, connector = FakeModelServer(), FakeConnector()
    for server in (identity, tokens, model_server, connector):
        await server.start()
    mcp = await DemoMcpServer(bearer=BearerCheck(
        audience=AUDIENCE, keys=(identity.keys["entra-key-1"].public_key(),))).start()
    service = TokenService(tokens.url, bot_token=_bot_token)
    users = UserTokens(service=service, settings=SignInSettings(app_id="sso-app",
                                                                app_secret="secret"),
                       tenant_id="tenant-1", authority_host=identity.url,
                       credential_options={"connection_verify": str(certificate)})
    tools = McpTools([McpServerSettings(name="docs", url=mcp.url, tools=("search_docs",),
                                        trusted=True),
                      McpServerSettings(name="me", url=mcp.url, tools=("whoami",), trusted=True,
                                        as_user=UserAccess(connection="sso",
                                                           scope=f"{AUDIENCE}/.default"))])
    model = build_model(load_settings({"OPENAI_BASE_URL": model_server.base_url,
                                       "OPENAI_MODEL": "bench"}).model)
    prompt = ChatPrompt(model, tool_sources=[tools])
    store = SignInStore.from_connection_string(connection_string,
                                               table_name=f"bench{int(time.time())}")
    tokens.sign_in(USER, "sso")
    activity = _activity()

    async def turn(tool: str, arguments: dict[str, str]) -> float:
        model_server.then(Scripted(tool_calls=[tool_call(tool, arguments)]), Scripted(content="ok"))
        started = time.perf_counter()
        with users.acting(activity):
            await prompt.send("go")
        return (time.perf_counter() - started) * 1000

    try:
        for _ in range(WARMUP):
            await turn("search_docs", {"query": "teams"})
            await turn("whoami", {})
        service_before, entra_before = len(tokens.requests), len(identity.token_requests)
        differences, without_ms, with_ms = [], [], []
        for _ in range(TURNS):
            without_ms.append(await turn("search_docs", {"query": "teams"}))
            with_ms.append(await turn("whoami", {}))
            differences.append(with_ms[-1] - without_ms[-1])
        assert "You are" in json.dumps(model_server.requests[-1]["messages"])
        service_calls = (len(tokens.requests) - service_before) / TURNS
        entra_calls = (len(identity.token_requests) - entra_before) / TURNS
        first_ms, duplicate_ms = await _exchanges(tokens, connector, store)
    finally:
        await tools.close()
        await model.close()
        await users.close()
        await store.close()
        await mcp.stop()
        for server in (identity, tokens, model_server, connector):
            await server.stop()
        folder.cleanup()
    section = {
        "measured_at": now_iso(), "code": code_version(), "machine": machine(),
        "turns": TURNS,
        "turn_ms_without_user_p50": round(median(without_ms), 2),
        "turn_ms_as_user_p50": round(median(with_ms), 2),
        "overhead_ms_per_turn_p50": round(median(differences), 2),
        "token_service_calls_per_turn": round(service_calls, 2),
        "entra_calls_per_turn": round(entra_calls, 2),
        "exchange_first_invoke_ms_p50": round(median(first_ms), 2),
        "exchange_duplicate_invoke_ms_p50": round(median(duplicate_ms), 2),
    }
    print(f"\nActing as the user ({TURNS} turn pairs; stand-ins on loopback, model latency 0)")
    print(f"  turn calling a tool without the user (p50)   {section['turn_ms_without_user_p50']:8.2f} ms")
    print(f"  turn calling a tool as the user (p50)        {section['turn_ms_as_user_p50']:8.2f} ms")
    print(f"  overhead per turn (median of paired differences) "
          f"{section['overhead_ms_per_turn_p50']:.2f} ms")
    print(f"  calls per turn: token service {service_calls:.2f}, Entra (on-behalf-of) "
          f"{entra_calls:.2f} (goal 1 and 1)")
    print(f"  SSO exchange invoke: first {section['exchange_first_invoke_ms_p50']:.2f} ms "
          f"(claim, exchange, settle, the note), duplicate "
          f"{section['exchange_duplicate_invoke_ms_p50']:.2f} ms (a refused create, a read)")
    return section


async def _exchanges(tokens: FakeTokenService, connector: FakeConnector,
                     store: SignInStore) -> tuple[list[float], list[float]]:
    """Teams' SSO invokes against Azurite: the first of each exchange ID, then a duplicate."""
    service = TokenService(tokens.url, bot_token=_bot_token)
    bot_connector = BotConnector(credential=None)
    signin = SignIn(service=service, store=store, connector=bot_connector,
                    connections=frozenset({"sso"}), app_id="bot")
    first, duplicate = [], []
    try:
        for index in range(EXCHANGES):
            value = {"id": f"x-{index}-{time.time_ns()}", "connectionName": "sso",
                     "token": tokens.sso_token(USER)}
            invoke = _activity("invoke", name="signin/tokenExchange", value=value,
                               serviceUrl=connector.url)
            for times in (first, duplicate):
                started = time.perf_counter()
                answer = await signin.on_invoke(invoke)
                times.append((time.perf_counter() - started) * 1000)
                assert answer.status == 200
    finally:
        await service.close()
        await bot_connector.close()
    return first, duplicate
