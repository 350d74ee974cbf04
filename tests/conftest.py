"""Shared fixtures: one real Azurite for the session (or the one `make test` started)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devtools.azurite import ROOT, STORAGE_ENV, free_port, given_or_started, wait_for_port
from shared.model import ChatModel
from shared.store import TableConversationStore

EVENTS = Path(__file__).parent / "events"


@pytest.fixture(scope="session")
def azurite_connection_string() -> Iterator[str]:
    """`make test` starts Azurite and passes its connection string; alone, pytest starts one."""
    with given_or_started(os.environ.get(STORAGE_ENV)) as connection_string:
        yield connection_string


@pytest.fixture(scope="session")
def queue_connection_string(azurite_connection_string: str) -> Iterator[str]:
    """The session's storage with a queue service: its own `QueueEndpoint` when it has one, else
    an Azurite queue service started here beside it."""
    if "QueueEndpoint=" in azurite_connection_string:
        yield azurite_connection_string
        return
    port = free_port()
    process = subprocess.Popen(
        [str(ROOT / "node_modules" / ".bin" / "azurite-queue"), "--inMemoryPersistence",
         "--queueHost", "127.0.0.1", "--queuePort", str(port), "--skipApiVersionCheck", "--loose",
         "--silent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield (f"{azurite_connection_string.rstrip(';')};"
               f"QueueEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def table_name() -> str:
    return "t" + uuid.uuid4().hex[:16]


@pytest.fixture
async def table_store(
        azurite_connection_string: str, table_name: str) -> AsyncIterator[TableConversationStore]:
    store = TableConversationStore.from_connection_string(azurite_connection_string,
                                                          table_name=table_name)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def models_closed(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Close every model the test module's `build_model` built (their HTTP sessions with them)."""
    build = request.module.build_model
    built: list[ChatModel] = []

    def building(*args: object, **kwargs: object) -> ChatModel:
        model: ChatModel = build(*args, **kwargs)
        built.append(model)
        return model

    monkeypatch.setattr(request.module, "build_model", building)
    yield
    for model in built:
        await model.close()
