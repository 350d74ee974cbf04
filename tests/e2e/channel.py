"""The webhook test bench: Azurite, a local model, connector and identity provider, the dev host."""

from __future__ import annotations

import copy
import json
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from devtools.background import BackgroundLoop
from devtools.fake_channel import FakeConnector, FakeIdentity
from devtools.fake_model import FakeModelServer
from devtools.host import DevHostProcess
from devtools.local_server import loopback_certificate

EVENTS = Path(__file__).parents[1] / "events"
CLIENT_ID = "bot-app-id"


def event(name: str, **fields: Any) -> dict[str, Any]:
    """A JSON fixture from tests/events, with top-level fields replaced."""
    data: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    for key, value in fields.items():
        if key == "conversation_id":
            data["conversation"]["id"] = value
        else:
            data[key] = value
    return copy.deepcopy(data)


@dataclass
class Bench:
    loop: BackgroundLoop
    model: FakeModelServer
    connector: FakeConnector
    identity: FakeIdentity
    host: DevHostProcess
    http: httpx2.Client

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
          host_args: list[str] | None = None) -> Iterator[Bench]:
    """`answer_mode` inline: the reply is sent before the POST returns (what most of these tests
    read); queue: the dev host's `answer` function sends it from the turn queue."""
    loop = BackgroundLoop()
    model = FakeModelServer(latency=model_latency, **(model_options or {}))
    certificates = tempfile.TemporaryDirectory()
    certificate = loopback_certificate(Path(certificates.name))
    connector, identity = FakeConnector(), FakeIdentity(certificate=certificate)
    for server in (model, connector, identity):
        loop.run(server.start())
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
    env.update(extra_env or {})
    host = DevHostProcess(env=env, args=host_args).start()
    http = httpx2.Client(timeout=30)
    try:
        yield Bench(loop=loop, model=model, connector=connector, identity=identity, host=host, http=http)
    finally:
        http.close()
        host.stop()
        for server in (model, connector, identity):
            loop.run(server.stop())
        loop.close()
        certificates.cleanup()
