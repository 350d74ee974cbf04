"""The prompt through the real openai SDK, against a local OpenAI-compatible server and Azurite."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx2
import pytest

from devtools.fake_model import FakeModelServer, Scripted
from shared.errors import InputTooLong, ModelRejected, ModelTimeout, ModelUnavailable
from shared.messages import ChatMessage
from shared.model import ChatModel, build_model
from shared.prompt import ChatPrompt, ConversationMemory
from shared.settings import load_settings
from shared.store import TableConversationStore

FAST_RETRY = {"retry-after-ms": "5"}

pytestmark = pytest.mark.usefixtures("models_closed")


def model_for(server: FakeModelServer, **env: str) -> ChatModel:
    settings = load_settings({"OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": "test-model",
                              "CHAT_MODEL_TIMEOUT_SECONDS": "5", **env})
    return build_model(settings.model)


@pytest.fixture
async def server() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer() as running:
        yield running


async def run_turn(store: TableConversationStore, model: ChatModel, conversation_id: str,
                   text: str, activity_id: str, *, budget: int = 8_000) -> str:
    memory = ConversationMemory(store, conversation_id, token_budget=budget)
    result = await ChatPrompt(model).send(text, memory=memory, instructions="Be brief.")
    await memory.commit(result, activity_id=activity_id)
    return result.response.content or ""


async def test_the_request_is_instructions_then_window_then_the_new_message(
        table_store: TableConversationStore, server: FakeModelServer) -> None:
    # GIVEN a model and a conversation of two turns
    model = model_for(server)
    await run_turn(table_store, model, "c", "first", "a1")
    await run_turn(table_store, model, "c", "second", "a2")
    # WHEN the third turn is sent
    reply = await run_turn(table_store, model, "c", "third", "a3")
    # THEN the model saw instructions, both earlier turns in order, then the new message
    sent = server.requests[-1]["messages"]
    assert sent == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply to 'first' after 2 messages"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "reply to 'second' after 4 messages"},
        {"role": "user", "content": "third"},
    ]
    assert reply == "reply to 'third' after 6 messages"
    assert server.requests[-1]["model"] == "test-model"
    assert server.requests[-1]["max_tokens"] == 1000
    # AND the reply is stored with its model and token usage
    stored = await table_store.list_messages("c")
    assert stored[-1].model == "test-model" and stored[-1].usage is not None
    reported = server.usages[-1]
    assert stored[-1].usage.total_tokens == reported["total_tokens"] > 0
    assert stored[-1].usage.cached_tokens == reported["prompt_tokens_details"]["cached_tokens"]


async def test_sending_changes_nothing_until_commit(
        table_store: TableConversationStore, server: FakeModelServer) -> None:
    # GIVEN a memory of a new conversation
    memory = ConversationMemory(table_store, "uncommitted")
    # WHEN a prompt is sent with it but not committed
    result = await ChatPrompt(model_for(server)).send("hi", memory=memory)
    # THEN there is a reply, and nothing was stored
    assert result.response.content and await table_store.list_messages("uncommitted") == []
    assert await memory.get_all() == []


async def test_a_long_conversation_sends_only_what_fits_and_reads_only_those_rows(
        table_store: TableConversationStore, server: FakeModelServer) -> None:
    # GIVEN 5,000 stored messages
    from tests.integration.test_store_table import seed

    await seed(table_store, "long", 5_000)
    # WHEN two turns are sent with a small budget (the second on a warm worker)
    model = model_for(server)
    for index in range(2):
        memory = ConversationMemory(table_store, "long", token_budget=120)
        result = await ChatPrompt(model).send(f"now {index}", memory=memory)
        await memory.commit(result, activity_id=f"now-{index}")
    # THEN the request fits the budget, starts at a user message, and few rows were read
    window = memory.window
    assert window is not None and window.tokens <= 120
    sent = server.requests[-1]["messages"]
    assert 2 < len(sent) < 20 and sent[0]["role"] == "user" and sent[-1]["content"] == "now 1"
    assert window.round_trips == 1 and window.rows_read <= len(window.messages) + 8


async def test_a_message_over_the_budget_is_refused_without_a_model_call(
        table_store: TableConversationStore, server: FakeModelServer) -> None:
    # GIVEN a memory with a 100-token budget
    memory = ConversationMemory(table_store, "huge", token_budget=100)
    # WHEN a message of about 800 tokens is sent THEN it is refused before the model is asked
    with pytest.raises(InputTooLong) as caught:
        await ChatPrompt(model_for(server)).send("word " * 500, memory=memory)
    assert caught.value.budget == 100 and caught.value.tokens > 100
    assert server.calls == 0


async def test_azure_openai_with_a_key_calls_the_deployment(server: FakeModelServer) -> None:
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{server.port}",
                              "AZURE_OPENAI_DEPLOYMENT": "chat-dep", "AZURE_OPENAI_API_KEY": "k-123"})
    result = await ChatPrompt(build_model(settings.model)).send("hello")
    assert result.response.content
    assert server.paths == ["/openai/deployments/chat-dep/chat/completions"]
    assert server.headers[0]["api-key"] == "k-123"


class FakeCredential:
    """Stands in for azure-identity: hands out a token and records the scopes asked for."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: object) -> object:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken("entra-token-xyz", 4_102_444_800)

    async def get_token_info(self, *scopes: str, **kwargs: object) -> object:
        from azure.core.credentials import AccessTokenInfo

        self.scopes.append(scopes)
        return AccessTokenInfo("entra-token-xyz", 4_102_444_800)

    async def close(self) -> None:
        pass


async def test_azure_openai_without_a_key_uses_an_entra_token(server: FakeModelServer) -> None:
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{server.port}",
                              "AZURE_OPENAI_DEPLOYMENT": "chat-dep"})
    credential = FakeCredential()
    await ChatPrompt(build_model(settings.model, credential=credential)).send("hello")
    assert server.headers[0]["Authorization"] == "Bearer entra-token-xyz"
    assert credential.scopes == [("https://cognitiveservices.azure.com/.default",)]


async def test_a_429_then_200_succeeds(server: FakeModelServer) -> None:
    server.then(Scripted(status=429, headers=FAST_RETRY))
    result = await ChatPrompt(model_for(server)).send("hi")
    assert result.response.content and server.calls == 2


@pytest.mark.parametrize(("script", "error"), [
    ([Scripted(status=500, headers=FAST_RETRY)] * 3, ModelUnavailable),
    ([Scripted(status=400, error={"message": "bad", "type": "invalid_request_error",
                                  "code": "bad"})], ModelRejected),
    ([Scripted(delay=3)] * 3, ModelTimeout),
])
async def test_a_failed_model_call_leaves_the_conversation_unchanged(
        table_store: TableConversationStore, server: FakeModelServer, script: list[Scripted],
        error: type[Exception]) -> None:
    # GIVEN a conversation of one turn
    await run_turn(table_store, model_for(server), "f", "first", "a1")
    before = await table_store.list_messages("f")
    # WHEN the next model call fails for good (timeouts: 1 s per attempt, 1.5 s in all)
    server.then(*script)
    model = model_for(server, CHAT_MODEL_TIMEOUT_SECONDS="1")
    memory = ConversationMemory(table_store, "f")
    prompt = ChatPrompt(model, timeout_seconds=1.5)
    # THEN the typed error is raised and nothing was stored
    with pytest.raises(error):
        await prompt.send("second", memory=memory)
    assert await table_store.list_messages("f") == before


async def test_an_unreachable_model_is_a_typed_error() -> None:
    settings = load_settings({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_MODEL": "m",
                              "CHAT_MODEL_MAX_RETRIES": "0"})
    with pytest.raises(ModelUnavailable):
        await ChatPrompt(build_model(settings.model)).send("hi")


async def test_the_offline_stand_in_says_what_it_is_and_remembers(
        table_store: TableConversationStore) -> None:
    # GIVEN no model settings at all
    model = build_model(load_settings({}).model)
    # WHEN two turns are sent
    first = await run_turn(table_store, model, "off", "my name is Ada", "o1")
    second = await run_turn(table_store, model, "off", "what is my name?", "o2")
    # THEN both replies say they are the stand-in, and the second knows the first
    assert first.startswith("[offline stand-in") and "first message" in first
    assert second.startswith("[offline stand-in")
    assert "2 earlier messages" in second and "my name is Ada" in second


async def test_a_mock_transport_can_stand_in_for_the_model() -> None:
    seen: list[dict] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "mock",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "from the transport"}}]})

    # GIVEN the real SDK over a mock transport, and a history of one message
    settings = load_settings({"OPENAI_API_KEY": "sk-test", "OPENAI_MODEL": "m"})
    model = build_model(settings.model, http_client=httpx2.AsyncClient(
        transport=httpx2.MockTransport(handler)))
    history = [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="A")]
    # WHEN a prompt is sent after it
    result = await ChatPrompt(model).send("b", history=history)
    # THEN the transport saw the history then the new message, and its answer is the reply
    assert result.response.content == "from the transport"
    assert [m["content"] for m in seen[0]["messages"]] == ["a", "A", "b"]
    assert "max_completion_tokens" in seen[0]
