"""Files and images in a chat: fetched within bounds from allowed hosts only, images to the model
as image input, text files as text, anything else refused politely with no model call; what is
stored holds no image bytes. A local HTTP server stands in for the file hosts."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image

from devtools.fake_channel import FakeConnector
from devtools.fake_files import FakeFileHost
from devtools.fake_model import FakeModelServer, Scripted
from shared.activity import parse_activity
from shared.attachments import TEAMS_FILE, AttachmentReader, Incoming, Refusal
from shared.settings import load_settings
from shared.store import InMemoryConversationStore, TableConversationStore
from tests.integration.teams_harness import HEADERS, activity, last_user_content, running_bot

#: The file host is 127.0.0.1: listed, downloads from it are allowed (without the bot's token).
ALLOWED = {"CHAT_FILE_HOSTS": "127.0.0.1", "CHAT_SUGGESTED_REPLIES": "off"}
CSV = "city,temperature\nOslo,9\nBergen,11\n"


def png(width: int = 4, height: int = 3) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def image(url: str, name: str | None = None, content_type: str = "image/*") -> dict[str, Any]:
    """An image as Teams sends a pasted one (`image/*`, no name) or an attached one."""
    return {"contentType": content_type, "contentUrl": url, **({"name": name} if name else {})}


def teams_file(url: str, name: str) -> dict[str, Any]:
    """A file attachment as Teams sends it in a personal chat."""
    return {"contentType": TEAMS_FILE, "contentUrl": url, "name": name,
            "content": {"downloadUrl": url, "uniqueId": "1", "fileType": name.rpartition(".")[2]}}


HTML_COPY = {"contentType": "text/html", "content": "<p>look</p>"}


@pytest.fixture
async def servers() -> AsyncIterator[tuple[FakeModelServer, FakeConnector, FakeFileHost]]:
    async with FakeModelServer() as model, FakeConnector() as connector, FakeFileHost() as files:
        yield model, connector, files


async def test_an_image_reaches_the_model_as_image_input_and_is_stored_as_a_placeholder(
        servers: tuple[FakeModelServer, FakeConnector, FakeFileHost],
        table_store: TableConversationStore) -> None:
    # GIVEN a picture pasted in a personal chat (Teams: image/*, with its HTML copy of the text),
    # and the Table Storage store (Azurite)
    model, connector, files = servers
    picture = png()
    url = files.put("/v3/attachments/1/views/original", picture, content_type="image/png")
    model.then(Scripted(content="A red square."))
    store = table_store
    async with running_bot(store, model, **ALLOWED) as bot:
        # WHEN it is sent with a question, and then another message follows
        await bot.handle(body=activity(connector, "a:image", "what is this?",
                                       attachments=[image(url), HTML_COPY]), headers=HEADERS)
        first = last_user_content(model)
        await bot.handle(body=activity(connector, "a:image", "and now?"), headers=HEADERS)
    # THEN the model got the text and the image as an image_url part with a PNG data URL
    assert isinstance(first, list) and first[0]["type"] == "text"
    assert first[0]["text"].startswith("what is this?\n\n[image: an image, ")
    assert first[1] == {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(picture).decode()}}
    # AND the store keeps the text with a placeholder and the image's name, type and size only
    stored = (await store.list_messages("a:image"))[0]
    assert stored.content == first[0]["text"] and "base64" not in (stored.content or "")
    assert [(a.name, a.content_type, a.size) for a in stored.attachments] == \
        [("an image", "image/png", len(picture))]
    # AND the next turn sends that message as its placeholder text, without the image
    history = model.requests[-1]["messages"]
    assert next(m["content"] for m in history if m["role"] == "user") == first[0]["text"]
    assert "image_url" not in json.dumps(history)


async def test_a_text_file_reaches_the_model_as_text(
        servers: tuple[FakeModelServer, FakeConnector, FakeFileHost]) -> None:
    # GIVEN a CSV file attached in a personal chat (Teams' file download info), sent chunked
    model, connector, files = servers
    url = files.put("/personal/ada/weather.csv", CSV.encode(), chunked=True)
    store = InMemoryConversationStore()
    # WHEN it is sent with a question
    async with running_bot(store, model, **ALLOWED) as bot:
        await bot.handle(body=activity(connector, "a:file", "warmest?",
                                       attachments=[teams_file(url, "weather.csv")]),
                         headers=HEADERS)
    # THEN the model read the file's text in the message, named, and no bot token went with it
    content = last_user_content(model)
    assert isinstance(content, str) and content.startswith("warmest?\n\n[file: weather.csv, 1 KB")
    assert content.endswith(CSV)
    assert files.requests == [{"path": "/personal/ada/weather.csv", "authorization": None}]
    # AND the store keeps what the model read, with the file's name, type and size
    stored = (await store.list_messages("a:file"))[0]
    assert stored.content == content
    assert [(a.name, a.content_type, a.size) for a in stored.attachments] == \
        [("weather.csv", "text/csv", len(CSV))]


async def test_a_long_text_file_is_cut_to_half_the_token_budget(
        servers: tuple[FakeModelServer, FakeConnector, FakeFileHost]) -> None:
    # GIVEN a text file far over the token budget of 2,000
    model, connector, files = servers
    url = files.put("/notes.md", ("line of notes\n" * 5_000).encode())
    # WHEN it is sent
    async with running_bot(InMemoryConversationStore(), model, CHAT_HISTORY_TOKEN_BUDGET="2000",
                           **ALLOWED) as bot:
        response = await bot.handle(body=activity(connector, "a:long", "sum up",
                                                  attachments=[teams_file(url, "notes.md")]),
                                    headers=HEADERS)
    # THEN the model got the start of it, cut with a note, and the turn was answered
    content = last_user_content(model)
    assert response.status == 200 and model.calls == 1
    assert "[cut here: the file holds about" in content and len(content) < 70_000 / 4


@pytest.mark.parametrize("case", ["oversize", "oversize-chunked", "unsupported", "too-many",
                                  "unlisted-host", "images-off", "not-an-image"])
async def test_what_cannot_be_read_is_refused_politely_with_no_model_call(
        servers: tuple[FakeModelServer, FakeConnector, FakeFileHost], case: str) -> None:
    # GIVEN a message whose attachment cannot be taken
    model, connector, files = servers
    environment = {**ALLOWED, "CHAT_FILE_MAX_BYTES": "5000", "CHAT_FILE_MAX_COUNT": "2"}
    big = files.put("/big.png", png(400, 400) + b"\0" * 6_000, content_type="image/png")
    attachments = {
        "oversize": [image(big, "big.png", "image/png")],
        "oversize-chunked": [teams_file(files.put("/big.txt", b"x" * 9_000, chunked=True),
                                        "big.txt")],
        "unsupported": [teams_file(files.put("/deck.pptx", b"PK\3\4"), "deck.pptx")],
        "too-many": [image(files.put(f"/{n}.png", png()), f"{n}.png") for n in range(3)],
        "unlisted-host": [image(files.put("/p.png", png()).replace("127.0.0.1", "localhost"))],
        "images-off": [image(files.put("/p.png", png()), "p.png")],
        "not-an-image": [image(files.put("/fake.png", b"GIF? no, text"), "fake.png")],
    }[case]
    if case == "images-off":
        environment["CHAT_MODEL_IMAGES"] = "off"
    store = InMemoryConversationStore()
    # WHEN it is sent
    async with running_bot(store, model, **environment) as bot:
        response = await bot.handle(body=activity(connector, f"a:{case}", "look",
                                                  attachments=attachments), headers=HEADERS)
    # THEN a polite reply says what is wrong; the model was not called and nothing was stored
    (reply,) = connector.messages(f"a:{case}")
    assert response.status == 200 and model.calls == 0
    assert reply["text"].startswith("Sorry, ") and "entities" not in reply
    assert await store.list_messages(f"a:{case}") == []
    expected = {"oversize": "up to 5 KB", "oversize-chunked": "up to 5 KB", "unsupported": "“deck.pptx”",
                "too-many": "at most 2 files", "unlisted-host": "may not fetch",
                "images-off": "cannot look at images", "not-an-image": "“fake.png”"}[case]
    assert expected in reply["text"]
    # AND a file on an unlisted host was never asked for, and too many were not fetched at all
    if case in ("unlisted-host", "too-many", "images-off"):
        assert files.requests == []


def _reader(**environment: str) -> tuple[AttachmentReader, list[str]]:
    asked: list[str] = []

    async def token() -> str:
        asked.append("token")
        return "bot-token"

    return AttachmentReader(settings=load_settings(environment), token=token), asked


def _message(*attachments: dict[str, Any]) -> Any:
    return parse_activity(json.dumps({
        "type": "message", "id": "1", "text": "see", "conversation": {"id": "a:1"},
        "attachments": list(attachments)}).encode(), HEADERS)


async def test_the_bots_token_goes_only_to_the_bot_connectors_hosts(
        servers: tuple[FakeModelServer, FakeConnector, FakeFileHost]) -> None:
    # GIVEN the Bot Connector's host (127.0.0.1, on BOT_SERVICE_URL_HOSTS) and a file host
    # (localhost, on CHAT_FILE_HOSTS), the same server under two names
    _, _, files = servers
    inline = files.put("/v3/attachments/2/views/original", png())
    shared_file = files.put("/sites/a.txt", b"hello").replace("127.0.0.1", "localhost")
    reader, asked = _reader(BOT_SERVICE_URL_HOSTS="127.0.0.1", CHAT_FILE_HOSTS="localhost")
    # WHEN a message with an inline image and a file is read
    result = await reader.read(_message(image(inline), teams_file(shared_file, "a.txt")), "see",
                               token_budget=8_000)
    # THEN both were read, and only the connector's host got the bot's token
    assert isinstance(result, Incoming) and len(result.images) == 1 and result.text.endswith("hello")
    assert [r["authorization"] for r in files.requests] == ["Bearer bot-token", None]
    assert asked == ["token"]


async def test_a_redirect_to_an_unlisted_host_is_refused(
        servers: tuple[FakeModelServer, FakeConnector, FakeFileHost]) -> None:
    # GIVEN a listed file host that redirects to an unlisted one
    _, _, files = servers
    files.put("/elsewhere.txt", b"secret")
    start = files.redirect("/start.txt", files.url.replace("127.0.0.1", "localhost") +
                           "/elsewhere.txt")
    reader, _ = _reader(CHAT_FILE_HOSTS="127.0.0.1")
    # WHEN the file is read
    result = await reader.read(_message(teams_file(start, "start.txt")), "see", token_budget=8_000)
    # THEN the redirect is not followed
    assert isinstance(result, Refusal) and "not on BOT_SERVICE_URL_HOSTS" in result.reason
    assert [r["path"] for r in files.requests] == ["/start.txt"]
