"""A tool on an MCP server, end to end: the app through the dev host calls the demo MCP server over
real HTTP (the `mcp` SDK), the model (faked at HTTP) cites its source, the final activity carries
Teams' citation entity, and history shows the citation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.background import BackgroundLoop
from devtools.fake_model import Scripted, tool_call
from devtools.mcp_server import DemoMcpServer, demo_servers_setting
from tests.e2e.channel import Bench, bench

ANSWER = "Teams shows sources as citations on AI messages [1]."


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[DemoMcpServer]:
    loop = BackgroundLoop()
    server = loop.run(DemoMcpServer().start())
    try:
        yield server
    finally:
        loop.run(server.stop())
        loop.close()


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str, mcp_server: DemoMcpServer) -> Iterator[Bench]:
    with bench(azurite_connection_string,
               extra_env={"CHAT_MCP_SERVERS": demo_servers_setting(mcp_server.url)}) as running:
        yield running


def ai_entity(activity: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in activity["entities"] if e.get("additionalType") == ["AIGeneratedContent"])


def expected_claim() -> dict[str, Any]:
    return {"@type": "Claim", "position": 1, "appearance": {
        "@type": "DigitalDocument", "name": "Bot messages with AI-generated content",
        "abstract": ("Teams shows an AI label, citations (a number with a source card) and feedback "
                     "buttons on bot messages that carry the AI entity."),
        "url": "https://learn.microsoft.com/en-us/microsoftteams/platform/bots/how-to/"
               "format-ai-bot-messages"}}


@pytest.mark.parametrize("chat", ["personal", "groupChat"])
def test_a_tool_on_an_mcp_server_gives_a_cited_answer(channel: Bench, mcp_server: DemoMcpServer,
                                                      chat: str) -> None:
    # GIVEN a model that calls the MCP server's search tool, then cites its first source
    conversation = f"a:{uuid.uuid4().hex}" if chat == "personal" else f"19:{uuid.uuid4().hex}"
    channel.model.then(
        Scripted(tool_calls=[tool_call("search_docs", {"query": "Teams citations"}, "c1")]),
        Scripted(content=ANSWER))
    calls_before = len(mcp_server.headers)
    message = channel.message("how does Teams show sources?", conversation_id=conversation)
    message["conversation"]["conversationType"] = chat
    # WHEN the message arrives (streamed in a personal chat, one message in a group chat)
    assert channel.post(message).status_code == 200
    # THEN the model was offered the MCP tool beside the app's own, and got its result with
    # the sources numbered
    request = channel.model.requests[-2]
    names = [spec["function"]["name"] for spec in request["tools"]]
    assert names == ["get_current_time", "search_docs", "delete_notes"]
    tool_result = channel.model.requests[-1]["messages"][-1]
    assert tool_result["role"] == "tool" and "[1] Bot messages with AI-generated content" in \
        tool_result["content"]
    assert len(mcp_server.headers) > calls_before  # the call went to the server over HTTP
    # AND the final activity carries the text and Teams' citation next to the AI label
    final = channel.connector.messages(conversation)[-1]
    assert final["text"] == ANSWER
    entity = ai_entity(final)
    assert entity["@type"] == "Message" and entity["citation"] == [expected_claim()]
    streamed = any(e.get("type") == "streaminfo" and e.get("streamType") == "final"
                   for e in final["entities"])
    assert streamed == (chat == "personal")
    # AND history shows the citation with the stored reply
    reply = channel.history(conversation)[-1]
    assert reply["content"] == ANSWER
    assert reply["citations"] == [{
        "position": 1, "title": "Bot messages with AI-generated content",
        "url": expected_claim()["appearance"]["url"],
        "snippet": expected_claim()["appearance"]["abstract"]}]
