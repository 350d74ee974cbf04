"""Faults over real HTTP: storage down, model failures, connector refusals. Nothing is ever lost."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.azurite import Azurite
from devtools.fake_model import Scripted
from tests.e2e.channel import Bench, bench

FAST_RETRY = {"retry-after-ms": "5"}


def wait_until_on_disk(data: Path, text: str, *, timeout: float = 15.0) -> None:
    """Azurite saves its data every few seconds: wait until `text` is in its files."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text.encode() in path.read_bytes() for path in data.rglob("*") if path.is_file()):
            return
        time.sleep(0.1)
    raise AssertionError(f"Azurite did not save {text!r} within {timeout} s")


def new_conversation() -> str:
    return f"fault:{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string, extra_env={"CHAT_MODEL_TIMEOUT_SECONDS": "1.5"}) as running:
        yield running


def test_storage_down_mid_conversation_is_a_503_and_the_next_turn_sees_everything() -> None:
    # GIVEN a bot on its own Azurite that keeps data on disk
    with tempfile.TemporaryDirectory() as data:
        azurite = Azurite(location=Path(data)).start()
        try:
            with bench(azurite.connection_string) as local:
                conversation = new_conversation()
                assert local.post(local.message("before", conversation_id=conversation)).status_code == 200
                # WHEN storage stops (once Azurite's autosave has put the turn on disk)
                wait_until_on_disk(Path(data), "reply to 'before'")
                azurite.stop()
                calls = local.model.calls
                down = local.post(local.message("while down", conversation_id=conversation))
                # THEN the channel is told to retry later, and no model call was spent
                assert down.status_code == 503 and down.headers["Retry-After"]
                assert down.json()["error"] == "storage_unavailable"
                assert local.model.calls == calls
                # AND the health check says storage is down
                health = local.http.get(f"{local.host.url}/api/health")
                assert health.status_code == 503 and health.json()["storage"] == "unreachable"
                assert health.json()["status"] == "degraded" and "storage" in health.json()["failing"]
                # WHEN storage is back
                azurite.start()
                after = local.post(local.message("after", conversation_id=conversation))
                # THEN the next turn works and sees the whole history, with no half turn
                assert after.status_code == 200
                assert [m["content"] for m in local.model.requests[-1]["messages"][1:]] == [
                    "before", "reply to 'before' after 2 messages", "after"]
                history = local.history(conversation)
                assert [m["content"] for m in history if m["role"] == "user"] == ["before", "after"]
        finally:
            azurite.stop()


@pytest.mark.parametrize(("script", "expect_apology"), [
    ([Scripted(status=429, headers=FAST_RETRY)], False),
    ([Scripted(status=500, headers=FAST_RETRY)] * 3, True),
    ([Scripted(delay=3)] * 3, True),
    ([Scripted(status=400, error={"message": "nope", "type": "invalid_request_error", "code": None})], True),
    ([Scripted(status=400, error={"message": "filtered", "type": "invalid_request_error",
                                  "code": "content_filter"})], True),
])
def test_a_failing_model_gives_a_reply_or_an_apology_and_no_half_turn(
        channel: Bench, script: list[Scripted], expect_apology: bool) -> None:
    # GIVEN a conversation with one good turn
    conversation = new_conversation()
    channel.post(channel.message("first", conversation_id=conversation))
    # WHEN the model fails on the next turn
    channel.model.then(*script)
    response = channel.post(channel.message("second", conversation_id=conversation))
    # THEN the user gets a reply or a short apology, and the conversation holds whole turns only
    assert response.status_code == 200
    last = channel.connector.messages(conversation)[-1]["text"]
    history = channel.history(conversation)
    if expect_apology:
        assert last.startswith("Sorry") and [m["content"] for m in history][::2] == ["first"]
        assert len(history) == 2
    else:
        assert last == "reply to 'second' after 4 messages" and len(history) == 4
    channel.model.script.clear()


def test_an_unreachable_model_gives_an_apology(azurite_connection_string: str) -> None:
    with bench(azurite_connection_string, extra_env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
                                                     "CHAT_MODEL_MAX_RETRIES": "1"}) as local:
        conversation = new_conversation()
        assert local.post(local.message("anyone?", conversation_id=conversation)).status_code == 200
        assert local.connector.messages(conversation)[-1]["text"].startswith("Sorry")
        assert local.history(conversation) == []


def test_a_refused_reply_stays_committed_and_the_retry_resends_it_without_a_model_call(
        channel: Bench) -> None:
    # GIVEN a connector that accepts the typing indicator, then refuses the reply once
    conversation = new_conversation()
    activity = channel.message("deliver me", conversation_id=conversation)
    channel.connector.statuses.extend([201, 500])
    calls = channel.model.calls
    # WHEN the message arrives
    first = channel.post(activity)
    # THEN the channel is told delivery failed, but the turn is committed
    assert first.status_code == 502 and first.json()["error"] == "connector_error"
    assert len(channel.history(conversation)) == 2 and channel.connector.messages(conversation) == []
    # WHEN the channel retries the same activity
    retry = channel.post(activity)
    # THEN the stored reply goes out, with no second model call, and only once
    assert retry.status_code == 200
    assert [r["text"] for r in channel.connector.messages(conversation)] == [
        "reply to 'deliver me' after 2 messages"]
    assert channel.model.calls == calls + 1
    assert channel.post(activity).status_code == 200
    assert len(channel.connector.messages(conversation)) == 1 and len(channel.history(conversation)) == 2
