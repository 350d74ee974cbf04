"""What /api/health says of each state: healthy; degraded, naming the model or storage, when one
refuses us or cannot be reached. The model is the real openai client against a local model (or
an address where nothing listens); storage is Azurite, one with a wrong key, or none at all."""

from __future__ import annotations

import pytest

from devtools.fake_model import FakeModelServer
from shared.health import check_health
from shared.model import ChatModel, build_model
from shared.settings import load_settings
from shared.store import TableConversationStore

pytestmark = pytest.mark.usefixtures("models_closed")


def model_at(base_url: str, *, key: str = "sk-test") -> ChatModel:
    return build_model(load_settings({"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": key,
                                      "OPENAI_MODEL": "fake-model",
                                      "CHAT_MODEL_MAX_RETRIES": "0"}).model)


@pytest.fixture
async def keyed_model() -> FakeModelServer:
    async with FakeModelServer(api_key="sk-right") as model:
        yield model  # type: ignore[misc]


async def test_healthy_when_both_answer(table_store: TableConversationStore,
                                        keyed_model: FakeModelServer) -> None:
    # GIVEN storage and a model that both take our credentials
    # WHEN health is checked
    health = await check_health(table_store, model_at(keyed_model.base_url, key="sk-right"))
    # THEN it is healthy, with nothing failing, and no tokens were spent
    assert (health.status, health.failing, health.storage) == ("healthy", (), "reachable")
    assert health.model.state.value == "ok" and keyed_model.requests == []


async def test_a_model_that_refuses_our_key_is_degraded_naming_the_model(
        table_store: TableConversationStore, keyed_model: FakeModelServer) -> None:
    # GIVEN a model that refuses our key
    # WHEN health is checked
    health = await check_health(table_store, model_at(keyed_model.base_url, key="sk-wrong"))
    # THEN it is degraded, the model named, with what to fix
    assert (health.status, health.failing) == ("degraded", ("model",))
    assert health.model.state.value == "refused" and "OPENAI_API_KEY" in health.model.detail


async def test_a_model_nobody_answers_for_is_degraded(table_store: TableConversationStore) -> None:
    # GIVEN a model address where nothing listens
    # WHEN health is checked
    health = await check_health(table_store, model_at("http://127.0.0.1:9/v1"))
    # THEN it is degraded, the model unreachable
    assert (health.status, health.failing) == ("degraded", ("model",))
    assert health.model.state.value == "unreachable"


async def test_storage_that_refuses_our_key_is_degraded_naming_storage(
        azurite_connection_string: str, keyed_model: FakeModelServer) -> None:
    # GIVEN storage whose account key is wrong
    wrong = azurite_connection_string.replace("AccountKey=Eby8", "AccountKey=Xby8")
    store = TableConversationStore.from_connection_string(wrong, table_name="healthwrong")
    try:
        # WHEN health is checked
        health = await check_health(store, model_at(keyed_model.base_url, key="sk-right"))
    finally:
        await store.close()
    # THEN storage is named as refusing us
    assert (health.status, health.failing) == ("degraded", ("storage",))
    assert health.storage == "refused: check the key / role"


async def test_storage_and_model_both_down_are_both_named() -> None:
    # GIVEN no storage and no model where the settings point
    store = TableConversationStore.from_connection_string(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJ"
        "PLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
        "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;", table_name="healthnone")
    try:
        # WHEN health is checked
        health = await check_health(store, model_at("http://127.0.0.1:9/v1"))
    finally:
        await store.close()
    # THEN both are named
    assert (health.status, health.failing, health.storage) == \
        ("degraded", ("storage", "model"), "unreachable")
