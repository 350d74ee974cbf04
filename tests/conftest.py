"""Shared fixtures: one real Azurite for the session (or the one `make test` started)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devtools.azurite import STORAGE_ENV, given_or_started
from shared.model import ChatModel
from shared.store import TableConversationStore

EVENTS = Path(__file__).parent / "events"


@pytest.fixture(scope="session")
def azurite_connection_string() -> Iterator[str]:
    """`make test` starts Azurite and passes its connection string; alone, pytest starts one."""
    with given_or_started(os.environ.get(STORAGE_ENV)) as connection_string:
        yield connection_string


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
