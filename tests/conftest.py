"""Shared fixtures: one real Azurite for the session (or the one `make test` started)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
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
    """Close every model the test module's `build_model` built, or the shared `model_for`
    (tests/integration/tool_model.py), with their HTTP sessions."""
    built: list[ChatModel] = []

    def counted(build: Callable[..., ChatModel]) -> Callable[..., ChatModel]:
        def building(*args: object, **kwargs: object) -> ChatModel:
            model = build(*args, **kwargs)
            built.append(model)
            return model
        return building

    for module in (request.module, sys.modules.get("tests.integration.tool_model")):
        if module is not None and hasattr(module, "build_model"):
            monkeypatch.setattr(module, "build_model", counted(module.build_model))
    yield
    for model in built:
        await model.close()
