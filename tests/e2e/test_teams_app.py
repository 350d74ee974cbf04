"""The Teams app end to end through the dev host, with auth on: an image pasted in a personal chat
is fetched with the bot's token, reaches the model as image input, and the streamed answer ends
with suggested replies; history shows the attachment, never its bytes."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator

import pytest
from PIL import Image

from devtools.fake_files import FakeFileHost
from devtools.fake_model import Scripted
from shared.suggestions import CLOSE, OPEN
from tests.e2e.channel import Bench, bench


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string) as running:
        yield running


@pytest.fixture
def files(channel: Bench) -> Iterator[FakeFileHost]:
    host = FakeFileHost()
    channel.loop.run(host.start())
    try:
        yield host
    finally:
        channel.loop.run(host.stop())


def test_an_image_is_answered_with_suggestions_and_stored_without_its_bytes(
        channel: Bench, files: FakeFileHost) -> None:
    # GIVEN a picture pasted in a Teams personal chat: on the Bot Connector's host (listed in
    # BOT_SERVICE_URL_HOSTS), as image/*, and a model that answers with two suggestions
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 120, 60)).save(buffer, format="PNG")
    picture = buffer.getvalue()
    url = files.put("/v3/attachments/0-abc/views/original", picture, content_type="image/png")
    channel.model.then(Scripted(content=f"A green square.\n{OPEN}\nWhy green?\nDraw it\n{CLOSE}"))
    conversation = f"a:{uuid.uuid4().hex}"
    activity = channel.message("what is this?", conversation_id=conversation,
                               attachments=[{"contentType": "image/*", "contentUrl": url},
                                            {"contentType": "text/html", "content": "<p>hi</p>"}])
    # WHEN it is posted
    response = channel.post(activity)
    # THEN the image was fetched with the bot's token, and the model got it as image input
    assert response.status_code == 200
    (fetched,) = files.requests
    assert (fetched["authorization"] or "").startswith("Bearer outbound-")
    parts = [m for m in channel.model.requests[-1]["messages"] if m["role"] == "user"][-1]["content"]
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(picture).decode()
    # AND the streamed answer's final carries the suggestions as buttons, the answer as its text
    final = channel.connector.messages(conversation)[-1]
    assert final["text"] == "A green square."
    assert [a["value"] for a in final["suggestedActions"]["actions"]] == ["Why green?", "Draw it"]
    assert channel.connector.streams.violations == []
    # AND history shows the placeholder and the attachment's name, type and size, no bytes
    user, reply = channel.history(conversation)
    assert user["content"].startswith("what is this?\n\n[image: an image, 1 KB]")
    assert user["attachments"] == [{"name": "an image", "contentType": "image/png",
                                    "size": len(picture)}]
    assert reply["content"] == "A green square."


@pytest.fixture(scope="module")
def queued(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string, answer_mode="queue") as running:
        yield running


def test_through_the_turn_queue_an_image_is_answered_and_a_pptx_refused(
        queued: Bench) -> None:
    # GIVEN the webhook and the answer function apart (CHAT_ANSWER_MODE=queue), a file host, and
    # a model that suggests one reply
    files = FakeFileHost()
    queued.loop.run(files.start())
    try:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (0, 0, 0)).save(buffer, format="PNG")
        image = files.put("/v3/attachments/9/views/original", buffer.getvalue())
        deck = files.put("/v3/attachments/10/views/original", b"PK\3\4")
        queued.model.then(Scripted(content=f"Black.\n{OPEN}\nWhy black?\n{CLOSE}"))
        calls = queued.model.calls
        answered, refused = f"a:{uuid.uuid4().hex}", f"a:{uuid.uuid4().hex}"
        # WHEN an image, then a PowerPoint file, are posted to two personal chats
        for conversation, attachment in (
                (answered, {"contentType": "image/*", "contentUrl": image}),
                (refused, {"contentType": "application/vnd.ms-powerpoint", "name": "deck.pptx",
                           "contentUrl": deck})):
            activity = queued.message("look", conversation_id=conversation,
                                      attachments=[attachment])
            assert queued.post(activity).status_code == 200
        # THEN the image's answer ends the stream the webhook opened, with its button
        (reply,) = queued.replies(answered)
        assert reply["text"] == "Black." and reply["channelData"]["streamType"] == "final"
        assert reply["suggestedActions"]["actions"][0]["value"] == "Why black?"
        # AND the file gets the polite refusal as that stream's end, with no model call for it
        (refusal,) = queued.replies(refused)
        assert refusal["text"].startswith("Sorry, ") and "“deck.pptx”" in refusal["text"]
        assert queued.model.calls == calls + 1 and queued.history(refused) == []
        assert queued.connector.streams.violations == []
    finally:
        queued.loop.run(files.stop())
