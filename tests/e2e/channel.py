"""The webhook test bench: Azurite, a local model, connector and identity provider, the dev host;
with `signin`, the token service stand-in and the demo MCP server whose `whoami` needs the user."""

from __future__ import annotations

import copy
import json
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from azure.data.tables import TableServiceClient

from devtools.background import BackgroundLoop
from devtools.fake_channel import FakeConnector, FakeIdentity
from devtools.fake_model import FakeModelServer
from devtools.fake_token_service import Connection, FakeTokenService
from devtools.host import DevHostProcess
from devtools.local_server import loopback_certificate
from devtools.mcp_server import BearerCheck, DemoMcpServer
from devtools.otlp_collector import OtlpCollector

EVENTS = Path(__file__).parents[1] / "events"
CLIENT_ID = "bot-app-id"
#: With `signin`: the app registration users sign in to, its connection, and the audience of the
#: demo MCP server's `whoami` (the user's token is exchanged on-behalf-of for it).
SSO_APP = "sso-app"
SSO_CONNECTION = "sso"
MCP_AUDIENCE = "api://mcp-demo"


def event(name: str, **fields: Any) -> dict[str, Any]:
    """A JSON fixture from tests/events, with top-level fields replaced."""
    data: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    for key, value in fields.items():
        if key == "conversation_id":
            data["conversation"]["id"] = value
        else:
            data[key] = value
    return copy.deepcopy(data)


@contextmanager
def otlp_collector() -> Iterator[OtlpCollector]:
    """An OTLP collector stand-in on its own loop (point OTEL_EXPORTER_OTLP_ENDPOINT at it)."""
    loop = BackgroundLoop()
    running = loop.run(OtlpCollector().start())
    try:
        yield running
    finally:
        loop.run(running.stop())
        loop.close()


def invoke(name: str, value: dict[str, Any], *, conversation_id: str, **fields: Any) -> dict[str, Any]:
    """A Teams invoke (`signin/tokenExchange`, ...) from the message fixture's user."""
    data = event("message", conversation_id=conversation_id, id=uuid.uuid4().hex, **fields)
    for key in ("text", "textFormat"):
        data.pop(key)
    data.update(type="invoke", name=name, value=value)
    return data


def in_group(activity: dict[str, Any], *, user: str = "29:user-1", name: str = "Ada") -> dict[str, Any]:
    """`activity` as sent in a Teams group chat, by `user`."""
    activity["conversation"].update(conversationType="groupChat", isGroup=True)
    activity["from"] = {**activity["from"], "id": user, "name": name}
    return activity


@dataclass
class Bench:
    loop: BackgroundLoop
    model: FakeModelServer
    connector: FakeConnector
    identity: FakeIdentity
    host: DevHostProcess
    http: httpx2.Client
    #: With `signin`: the token service stand-in and the demo MCP server (`whoami`, `search_docs`).
    tokens: FakeTokenService | None = None
    mcp: DemoMcpServer | None = None

    def message(self, text: str, *, conversation_id: str, activity_id: str | None = None,
                **fields: Any) -> dict[str, Any]:
        fields.setdefault("serviceUrl", self.connector.url)
        return event("message", text=text, conversation_id=conversation_id,
                     id=activity_id or uuid.uuid4().hex, **fields)

    def token_for(self, activity: dict[str, Any], **options: Any) -> str:
        options.setdefault("audience", CLIENT_ID)
        options.setdefault("service_url", activity.get("serviceUrl", ""))
        return self.identity.botframework_token(**options)

    def post(self, activity: dict[str, Any] | bytes, *, token: str | None = "auto",
             headers: dict[str, str] | None = None,
             host: DevHostProcess | None = None) -> httpx2.Response:
        """`host`: another instance (`another_host`) instead of the bench's."""
        body = activity if isinstance(activity, bytes) else json.dumps(activity).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token == "auto" and isinstance(activity, dict):
            token = self.token_for(activity)
        if token and token != "auto":
            sent["Authorization"] = f"Bearer {token}"
        return self.http.post(f"{(host or self.host).url}/api/messages", content=body,
                              headers=sent)

    @contextmanager
    def another_host(self) -> Iterator[DevHostProcess]:
        """A second instance: another dev host on the same table, queue, model and connector."""
        host = DevHostProcess(env=dict(self.host.env)).start()
        try:
            yield host
        finally:
            host.stop()

    def replies(self, conversation_id: str, *, count: int = 1,
                seconds: float = 30.0) -> list[dict[str, Any]]:
        """The messages the bot sent to the conversation, once there are `count` of them."""
        import time

        deadline = time.monotonic() + seconds
        while len(found := self.connector.messages(conversation_id)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} replies after {seconds} s")
            time.sleep(0.05)
        return found

    def history(self, conversation_id: str) -> list[dict[str, Any]]:
        from urllib.parse import quote

        response = self.http.get(f"{self.host.url}/api/conversations/{quote(conversation_id, safe='')}/messages")
        if response.status_code == 404:  # nothing stored (never, or cleared)
            return []
        response.raise_for_status()
        return list(response.json()["messages"])


@contextmanager
def bench(storage: str, *, auth: bool = True, model_latency: float = 0.0,
          extra_env: dict[str, str] | None = None,
          model_options: dict[str, Any] | None = None, answer_mode: str = "inline",
          host_args: list[str] | None = None, signin: bool = False) -> Iterator[Bench]:
    """`answer_mode` inline: the reply is sent before the POST returns (what most of these tests
    read); queue: the dev host's `answer` function sends it from the turn queue. `signin`: MCP
    tools that act as the user, through the token service stand-in (users' tokens are the identity
    stand-in's, so its on-behalf-of exchange accepts them)."""
    loop = BackgroundLoop()
    model = FakeModelServer(latency=model_latency, **(model_options or {}))
    certificates = tempfile.TemporaryDirectory()
    certificate = loopback_certificate(Path(certificates.name))
    connector, identity = FakeConnector(), FakeIdentity(certificate=certificate)
    for server in (model, connector, identity):
        loop.run(server.start())
    tokens = mcp = None
    if signin:
        entra_key = identity.keys["entra-key-1"]
        identity.obo_apps[SSO_APP] = "sso-secret"
        tokens = loop.run(FakeTokenService(
            [Connection(name=SSO_CONNECTION, audience=f"api://botid-{SSO_APP}",
                        exchange_uri=f"api://botid-{SSO_APP}")],
            app_id=CLIENT_ID, signing_key=entra_key, kid="entra-key-1",
            tenant_id=identity.tenant_id).start())
        mcp = loop.run(DemoMcpServer(bearer=BearerCheck(audience=MCP_AUDIENCE,
                                                        keys=(entra_key.public_key(),))).start())
    env = {
        "CHAT_STORAGE_CONNECTION_STRING": storage,
        "CHAT_TABLE_NAME": "t" + uuid.uuid4().hex[:16],
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_MODEL": "bench-model",
        "CHAT_MODEL_TIMEOUT_SECONDS": "10",
        "CHAT_INSTRUCTIONS": "You are a test bot.",
        "CHAT_ANSWER_MODE": answer_mode,
        # the queue trigger's connection, and a queue of this bench's own
        "AzureWebJobsStorage": storage,
        "CHAT_TURN_QUEUE": f"turns-{uuid.uuid4().hex[:12]}",
        # The identity provider is HTTPS (as Entra is): the host trusts its certificate only.
        "SSL_CERT_FILE": str(certificate),
    }
    if auth:
        env.update({"CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": "test-secret", "TENANT_ID": "tenant-1",
                    "BOT_OPENID_METADATA_URL": identity.botframework_metadata_url,
                    "BOT_AUTHORITY_HOST": identity.url,
                    # the stand-in connector's host (replies go only to listed hosts)
                    "BOT_SERVICE_URL_HOSTS": "127.0.0.1"})
    if tokens is not None and mcp is not None:
        env.update({
            "CHAT_TOKEN_SERVICE_URL": tokens.url, "CHAT_SIGNIN_APP_ID": SSO_APP,
            "CHAT_SIGNIN_APP_SECRET": "sso-secret",
            "CHAT_MCP_SERVERS": json.dumps([
                {"name": "docs", "url": mcp.url, "tools": ["search_docs"], "trusted": True},
                {"name": "me", "url": mcp.url, "tools": ["whoami"], "trusted": True,
                 "asUser": {"connection": SSO_CONNECTION, "audience": MCP_AUDIENCE}}])})
    env.update(extra_env or {})
    host = DevHostProcess(env=env, args=host_args).start()
    http = httpx2.Client(timeout=30)
    try:
        yield Bench(loop=loop, model=model, connector=connector, identity=identity, host=host,
                    http=http, tokens=tokens, mcp=mcp)
    finally:
        http.close()
        host.stop()
        for server in (model, connector, identity, *(s for s in (tokens, mcp) if s is not None)):
            loop.run(server.stop())
        loop.close()
        certificates.cleanup()


def stored_text(channel: Bench) -> str:
    """Every row of every table of the bench's storage, as text (compressed bodies unpacked)."""
    service = TableServiceClient.from_connection_string(channel.host.env["CHAT_STORAGE_CONNECTION_STRING"])
    prefix = channel.host.env["CHAT_TABLE_NAME"]
    parts: list[str] = []
    for table in service.list_tables():
        if not table.name.startswith(prefix):
            continue
        for row in service.get_table_client(table.name).list_entities():
            for value in row.values():
                if isinstance(value, bytes):
                    try:
                        value = zlib.decompress(value)
                    except zlib.error:
                        pass
                    value = value.decode("utf-8", "replace")
                parts.append(str(value))
    return "\n".join(parts)
