"""The first hour's missteps, through `make run`'s and `make chat`'s own scripts and the dev host:
each answered with one line that says what is wrong and what to do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from devtools.azurite import Azurite, free_port
from devtools.background import BackgroundLoop
from devtools.fake_model import FakeModelServer, Scripted
from shared.answer import APOLOGY, SETUP_PROBLEM
from tests.e2e.channel import bench

REPO = Path(__file__).resolve().parents[2]
#: Variables of the developer's own shell that would change what the scripts see.
OURS = ("CHAT_", "OPENAI_", "AZURE_", "CLIENT_", "TENANT_", "BOT_", "WEBSITE_", "PORT", "AzureWebJobs")


def clean_env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(OURS)}
    return {**env, "PYTHONUNBUFFERED": "1", **values}


def script(module: str, *args: str, env: dict[str, str], stdin: str = "",
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    return tmp_path / "local.settings.json"


@pytest.mark.parametrize("module", ["devtools.run", "devtools.chat", "devtools.playground"])
def test_a_trailing_comma_in_local_settings_is_one_line_naming_the_file_line_and_column(
        module: str, settings_file: Path) -> None:
    # GIVEN a local.settings.json with a trailing comma at the end of its third line
    settings_file.write_text('{\n  "Values": {\n    "PORT": "7071",\n  }\n}\n')
    # WHEN make run (or make chat, make playground) reads it
    done = script(module, "--settings", str(settings_file), env=clean_env())
    # THEN it stops with one line naming the file, the line and the column, and no traceback
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"error: {settings_file} line 3 column 19: Illegal trailing comma before end of object "
        "(JSON allows no trailing comma); fix the file, or copy local.settings.sample.json again"]


def test_a_taken_port_ends_make_run_with_one_line_naming_port_before_any_url(
        settings_file: Path) -> None:
    # GIVEN something already listening on the configured PORT
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings_file.write_text(json.dumps({"Values": {"PORT": str(port)}}))
        # WHEN make run starts
        done = script("devtools.run", "--settings", str(settings_file), env=clean_env())
    # THEN it ends with one line naming PORT and another port to use, and printed no URL
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"error: PORT {port} is taken: stop what listens there, or choose another port "
        f"(PORT={port + 1} make run)"]
    assert "http://" not in done.stdout


def test_a_mistyped_setting_in_local_settings_is_named_with_the_real_one(
        settings_file: Path) -> None:
    # GIVEN a typo in local.settings.json, first as it is, then with CHAT_STRICT_SETTINGS on
    with socket.socket() as taken:  # a taken PORT makes make run stop right after the settings
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        values = {"PORT": str(taken.getsockname()[1]), "CHAT_HISTORY_TOKEN_BUGDET": "4000"}
        settings_file.write_text(json.dumps({"Values": values}))
        warned = script("devtools.run", "--settings", str(settings_file), env=clean_env())
        settings_file.write_text(json.dumps({"Values": {**values, "CHAT_STRICT_SETTINGS": "on"}}))
        refused = script("devtools.run", "--settings", str(settings_file), env=clean_env())
    # THEN make run warns naming the closest setting; strict, it stops with that line
    assert warned.stderr.splitlines()[0] == (
        "warning: CHAT_HISTORY_TOKEN_BUGDET is not a chatstate setting (did you mean "
        "CHAT_HISTORY_TOKEN_BUDGET?); it is ignored (CHAT_STRICT_SETTINGS=on makes this an error)")
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        "error: setting CHAT_HISTORY_TOKEN_BUGDET: is not a chatstate setting (did you mean "
        "CHAT_HISTORY_TOKEN_BUDGET?); CHAT_STRICT_SETTINGS is on"]


@pytest.fixture
def keyed_model() -> Iterator[FakeModelServer]:
    """A model server that takes only the key "right"."""
    loop = BackgroundLoop()
    model = FakeModelServer(api_key="right")
    loop.run(model.start())
    try:
        yield model
    finally:
        loop.run(model.stop())
        loop.close()


def wait_for_line(process: subprocess.Popen[str], prefix: str, *, timeout: float = 60) -> list[str]:
    """The lines `process` printed up to the first that starts with `prefix`."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line.rstrip("\n"))
        if line.strip().startswith(prefix):
            return lines
    raise AssertionError(f"no line starting {prefix!r}: {lines}")


def test_make_run_checks_the_model_and_make_chat_finds_its_port_and_is_told_of_a_setup_problem(
        azurite_connection_string: str, keyed_model: FakeModelServer, tmp_path: Path) -> None:
    # GIVEN make run on a free port with a wrong model key (and no local.settings.json)
    port, run_file = free_port(), tmp_path / "run.json"
    env = clean_env(PORT=str(port), CHAT_STORAGE_CONNECTION_STRING=azurite_connection_string,
                    CHAT_TURN_QUEUE="turns-" + uuid.uuid4().hex[:12],
                    CHAT_TABLE_NAME="t" + uuid.uuid4().hex[:16], OPENAI_BASE_URL=keyed_model.base_url,
                    OPENAI_API_KEY="wrong", OPENAI_MODEL="fake-model")
    run = subprocess.Popen([sys.executable, "-m", "devtools.run", "--settings",
                            str(tmp_path / "none.json"), "--run-file", str(run_file)],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        # WHEN it starts
        banner = wait_for_line(run, "messaging endpoint:")
        # THEN its banner shows the provider, the endpoint and the check's answer with what to fix
        [model_line] = [line for line in banner if line.startswith("model:")]
        assert model_line == (
            f"model: openai {keyed_model.base_url} model fake-model: refused (the model answered "
            "401: the key was refused: check OPENAI_API_KEY (and OPENAI_BASE_URL))  <- a setup "
            "problem: replies will say so until it is fixed")
        assert keyed_model.requests == []  # the check spent no tokens
        # AND the host answers as soon as the banner is printed (no retry needed)
        health = httpx2.get(f"http://127.0.0.1:{port}/api/health", timeout=10).json()
        # AND health says it is degraded, naming the model, beside storage's state
        assert (health["status"], health["failing"]) == ("degraded", ["model"])
        assert (health["storage"], health["model"]) == ("reachable", "refused")
        assert "OPENAI_API_KEY" in health["modelDetail"]
        # WHEN make chat starts, with PORT not given to it, and a message is sent
        chat = script("devtools.chat", "--settings", str(tmp_path / "none.json"),
                      "--run-file", str(run_file), env=clean_env(), stdin="hello\n")
        # THEN it found make run's port, and the user is told it is a setup problem, not "try again"
        assert f"http://127.0.0.1:{port}/api/messages (port from the running `make run`" in chat.stdout
        assert f"bot> {SETUP_PROBLEM}" in chat.stdout
    finally:
        run.send_signal(signal.SIGTERM)
        rest, _ = run.communicate(timeout=30)
    # AND the log said what to fix, and the run file is gone with make run
    assert "ModelMisconfigured" in rest and "check OPENAI_API_KEY" in rest
    assert not run_file.exists()


def test_a_refused_storage_key_makes_health_say_so(azurite_connection_string: str) -> None:
    # GIVEN the bot with a storage connection string whose account key is wrong
    wrong = azurite_connection_string.replace("AccountKey=Eby8", "AccountKey=Xby8")
    assert wrong != azurite_connection_string
    with bench(wrong, auth=False) as local:
        # WHEN health is asked
        health = local.http.get(f"{local.host.url}/api/health")
    # THEN it says storage refused our key, not that storage is unreachable; the model is fine
    assert health.status_code == 503
    assert health.json() == {"status": "degraded", "failing": ["storage"],
                             "storage": "refused: check the key / role",
                             "model": "ok", "modelDetail": "bench-model answers (no tokens spent)"}


def test_the_history_of_an_unknown_conversation_is_a_404(azurite_connection_string: str) -> None:
    with bench(azurite_connection_string, auth=False) as local:
        # GIVEN a conversation that was never stored
        # WHEN its history is asked for
        response = local.http.get(f"{local.host.url}/api/conversations/never-seen/messages")
    # THEN the answer is 404 with a reason
    assert response.status_code == 404
    assert response.json() == {"error": "conversation_not_found",
                               "reason": "no stored messages for conversation 'never-seen'"}


def test_with_no_model_the_offline_stand_in_streams_in_a_personal_chat(
        azurite_connection_string: str) -> None:
    # GIVEN the bot with no model setting (the offline stand-in) and Teams' streaming stand-in
    with bench(azurite_connection_string,
               extra_env={"OPENAI_BASE_URL": "", "OPENAI_MODEL": ""}) as local:
        conversation = f"a:{uuid.uuid4().hex}"  # a Teams personal chat
        # WHEN a message arrives
        response = local.post(local.message("show me streaming", conversation_id=conversation))
        # THEN the reply streams: the informative update, then at least one growing text update,
        # by Teams' rules, and the final message is the stand-in's whole answer
        assert response.status_code == 200 and local.connector.streams.violations == []
        (stream,) = local.connector.streams.of(conversation)
        kinds = [next(e["streamType"] for e in update["entities"] if e.get("type") == "streaminfo")
                 for update in stream.updates]
        assert kinds[0] == "informative" and "streaming" in kinds and stream.finished
        final = [r["activity"] for r in local.connector.requests
                 if r["conversation_id"] == conversation][-1]
        assert final["text"].startswith("[offline stand-in: no model is configured]")
        assert local.model.calls == 0


def test_a_setup_problem_and_a_passing_failure_get_different_replies(
        azurite_connection_string: str) -> None:
    # GIVEN the bot, and a model that answers 404 (no such model), then 503 three times
    fast = {"retry-after-ms": "5"}
    with bench(azurite_connection_string, extra_env={"CHAT_MODEL_MAX_RETRIES": "2"}) as local:
        replies = []
        for script in ([Scripted(status=404)], [Scripted(status=503, headers=fast)] * 3):
            local.model.then(*script)
            conversation = f"setup:{uuid.uuid4().hex}"
            # WHEN a message arrives
            assert local.post(local.message("hello?", conversation_id=conversation)).status_code == 200
            replies.append(local.connector.messages(conversation)[-1]["text"])
        log = local.host.log_text()
    # THEN the 404 tells the user it is a setup problem, the 503s keep "try again"
    assert replies == [SETUP_PROBLEM, APOLOGY]
    # AND the log says what to fix
    assert "model failed (ModelMisconfigured): the model answered 404: no such model: check " \
           "OPENAI_MODEL" in log


def test_through_the_turn_queue_a_setup_problem_is_told_at_once_not_retried(
        azurite_connection_string: str) -> None:
    # GIVEN the bot answering from the turn queue, and a model that refuses the key (401)
    with bench(azurite_connection_string, answer_mode="queue") as queued:
        queued.model.then(*[Scripted(status=401)] * 5)
        conversation = f"setup:{uuid.uuid4().hex}"
        # WHEN a message arrives
        assert queued.post(queued.message("hello?", conversation_id=conversation)).status_code == 200
        replies = queued.replies(conversation)
        time.sleep(1.0)  # room for a retry that should not come
        # THEN the first answer tells the user it is a setup problem; the queue does not retry it
        assert [r["text"] for r in replies] == [SETUP_PROBLEM]
        assert queued.model.calls == 1 and len(queued.connector.messages(conversation)) == 1


def test_make_chat_says_the_truth_when_azurites_data_folder_is_removed_under_the_bot(
        tmp_path: Path) -> None:
    # GIVEN a bot answering from the turn queue, on an Azurite that keeps its data in a folder as
    # make run starts it (make run's note of its port lives in that folder too), and make chat
    data = tmp_path / "azurite"
    data.mkdir()
    azurite = Azurite(location=data).start()
    try:
        with bench(azurite.connection_string, auth=False, answer_mode="queue") as local:
            port = local.host.url.rsplit(":", 1)[1]
            run_file = data / "run.json"
            run_file.write_text(json.dumps({"port": int(port), "pid": os.getpid(),
                                            "azuriteData": str(data)}))
            chat = subprocess.Popen([sys.executable, "-m", "devtools.chat", "--settings",
                                     str(tmp_path / "none.json"), "--run-file", str(run_file)],
                                    cwd=REPO, env=clean_env(), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert chat.stdin is not None
            try:
                chat.stdin.write("hello\n")
                chat.stdin.flush()
                before = wait_for_line(chat, "bot> reply to 'hello'")
                # WHEN the folder is removed while both run, and the user writes again
                shutil.rmtree(data)
                rest, _ = chat.communicate(input="hello again\n", timeout=60)
            finally:
                chat.kill()
            # AND make chat is started afresh (the run file went with the folder)
            after = script("devtools.chat", "--settings", str(tmp_path / "none.json"),
                           "--run-file", str(run_file), env=clean_env(PORT=port), stdin="")
    finally:
        azurite.stop()
    # THEN the first message was answered as Teams shows it
    assert any("bot> Thinking…" in line for line in before)
    # AND then make chat said what happened and what to do, and did not wait long for the answer
    # (the message was taken, but the queue can no longer hand it to the answer function)
    during = " ".join(rest.split())  # the line as one, wherever the terminal would wrap it
    truth = f"Azurite's data folder {data} was removed while `make run` runs"
    assert truth in during and "Stop `make run` (Ctrl-C) and start it again" in during
    assert "(no reply yet" in during
    # AND a make chat started later says the same, not that no make run is running
    assert truth in " ".join(after.stderr.split()) and "no `make run` is running" not in after.stdout
