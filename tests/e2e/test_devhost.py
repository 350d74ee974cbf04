"""The dev host behaves like the Functions host: each HTTP rule, key routes, timers, queues, start-up checks.

Every test talks real HTTP to `devtools.host` in its own process, serving the test-only app in
tests/apps/devhost (or tests/apps/broken_binding), through the pinned azure-functions-runtime. The queue
tests serve tests/apps/queues with their own host.json, on the session's real Azurite queue service.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from devtools.host import DevHostProcess

APPS = Path(__file__).parents[1] / "apps"


@pytest.fixture(scope="module")
def ticks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devhost") / "ticks.jsonl"


@pytest.fixture(scope="module")
def host(ticks: Path) -> Iterator[DevHostProcess]:
    running = DevHostProcess(env={"DEVHOST_TEST_TICKS": str(ticks), "DEVHOST_TEST_SCHEDULE": "*/2 * * * * *"},
                             app_dir=APPS / "devhost", health_path="/api/cookies").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=10) as client:
        yield client


def seen(response: httpx2.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- the request as the function sees it ------------------------------------------------------------


def test_a_repeated_header_arrives_as_one_value_joined_with_commas(host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN a request with one header sent twice
    headers = [("X-Tag", "first"), ("X-Tag", "second")]
    # WHEN the function reads it
    request = seen(http.get(f"{host.url}/api/echo/x", headers=headers))
    # THEN it sees both values, joined with ',' as the host joins them
    assert request["headers"]["x-tag"] == "first,second"


def test_a_repeated_query_key_is_joined_and_an_empty_value_is_dropped(host: DevHostProcess,
                                                                       http: httpx2.Client) -> None:
    # GIVEN a query with a key given twice and a key with an empty value
    url = f"{host.url}/api/echo/x?k=1&k=2&empty=&plain=a+b"
    # WHEN the function reads req.params
    params = seen(http.get(url))["params"]
    # THEN the repeated key holds both values, the empty one is gone, and + is a space
    assert params == {"k": "1,2", "plain": "a b"}


def test_an_escaped_slash_in_a_route_parameter_arrives_literally(host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN route parameters holding %2F and %3A
    # WHEN the function reads req.route_params
    slash = seen(http.get(f"{host.url}/api/echo/a%2Fb"))["route_params"]
    colon = seen(http.get(f"{host.url}/api/echo/a%3Ab"))["route_params"]
    # THEN %2F stays literal (no 404) and any other escape is decoded, as Kestrel does
    assert slash == {"name": "a%2Fb"}
    assert colon == {"name": "a:b"}


def test_the_url_arrives_escaped_as_sent(host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN a path and a query with escapes
    # WHEN the function reads req.url
    url = seen(http.get(f"{host.url}/api/echo/a%20b?q=x%20y"))["url"]
    # THEN it is the URL as sent, still escaped
    assert url == f"{host.url}/api/echo/a%20b?q=x%20y"


def test_routes_match_case_insensitively_and_accept_a_trailing_slash(host: DevHostProcess,
                                                                       http: httpx2.Client) -> None:
    # GIVEN the route api/echo/{name}
    # WHEN it is called in another case and with a trailing slash
    response = http.get(f"{host.url}/API/Echo/Value/", follow_redirects=False)
    # THEN it matches at once (no 307 redirect), the parameter keeping its case
    assert seen(response)["route_params"] == {"name": "Value"}


def test_a_method_the_route_does_not_take_is_not_found(host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN a GET-only route
    # WHEN it is called with DELETE
    response = http.delete(f"{host.url}/api/cookies")
    # THEN no route matches: 404, as the host answers (not 405)
    assert response.status_code == 404


def test_a_chunked_request_body_arrives_empty(host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN a body sent with Transfer-Encoding: chunked, and the same body with a length
    def chunks() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    # WHEN the function reads each
    chunked = seen(http.post(f"{host.url}/api/echo/x", content=chunks()))
    sized = seen(http.post(f"{host.url}/api/echo/x", content=b"part one, part two"))
    # THEN the chunked one is empty (the host's known limit), the sized one whole
    assert chunked["headers"]["transfer-encoding"] == "chunked" and chunked["body"] == ""
    assert sized["body"] == "part one, part two"


# -- the response --------------------------------------------------------------------------------


def test_every_set_cookie_of_a_response_reaches_the_client(host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN a function whose response sets two cookies
    # WHEN it is called
    response = http.get(f"{host.url}/api/cookies")
    # THEN both Set-Cookie headers arrive, attributes kept, and the body is intact
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 2
    assert cookies[0].startswith("first=1") and cookies[1].startswith("second=2")
    assert "path=/api" in cookies[1] and "httponly" in cookies[1]
    assert response.text == "two cookies"


# -- function keys stay local ----------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{"Host": "chatbot.devtunnels.ms"},
                                     {"X-Forwarded-Host": "chatbot.devtunnels.ms"},
                                     {"Forwarded": 'for=203.0.113.9;host="chatbot.example.com"'}],
                         ids=["host", "x-forwarded-host", "forwarded"])
def test_a_function_key_route_refuses_a_request_that_is_not_loopback(
        host: DevHostProcess, http: httpx2.Client, headers: dict[str, str]) -> None:
    # GIVEN a route with AuthLevel.FUNCTION, and a request whose host is not this machine (a tunnel)
    # WHEN it is called
    response = http.get(f"{host.url}/api/operator", headers=headers)
    # THEN it is refused with 401 and a reason naming the rule
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert "checks no keys" in response.json()["reason"]


def test_a_function_key_route_answers_loopback_and_an_anonymous_one_answers_anyone(
        host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN a function-key route and an anonymous route
    # WHEN the first is called on localhost and the second through a tunnel's Host
    local = http.get(f"{host.url}/api/operator", headers={"Host": f"localhost:{host.port}"})
    anonymous = http.get(f"{host.url}/api/cookies", headers={"Host": "chatbot.devtunnels.ms"})
    # THEN both answer
    assert local.status_code == 200 and local.text == "operator data"
    assert anonymous.status_code == 200


# -- timer triggers ----------------------------------------------------------------------------------


def runs(ticks: Path, function: str) -> list[dict[str, Any]]:
    if not ticks.exists():
        return []
    return [line for line in map(json.loads, ticks.read_text().splitlines()) if line["function"] == function]


def wait_for(condition: Any, *, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_timer_function_runs_now_through_the_admin_api(host: DevHostProcess, http: httpx2.Client,
                                                          ticks: Path) -> None:
    # GIVEN a timer function that fires at 03:00 only
    # WHEN POST /admin/functions/nightly is sent as `func start` takes it
    response = http.post(f"{host.url}/admin/functions/nightly", json={"input": ""})
    # THEN it is accepted and runs once, with a TimerRequest that is not past due
    assert response.status_code == 202
    wait_for(lambda: runs(ticks, "nightly"))
    run = runs(ticks, "nightly")[0]
    assert run["past_due"] is False and run["next"].endswith("03:00:00+00:00")
    # AND the run is logged with its outcome and duration
    wait_for(lambda: "Executed 'Functions.nightly' (Succeeded" in host.log_text())
    assert "Duration=" in host.log_text().split("Executed 'Functions.nightly'")[1].splitlines()[0]


def test_a_failing_timer_run_is_logged_as_failed(host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN a timer function that raises
    # WHEN it is run through the admin API
    assert http.post(f"{host.url}/admin/functions/FAILING", json={"input": ""}).status_code == 202
    # THEN the log says it failed, with the duration and the exception
    wait_for(lambda: "Executed 'Functions.failing' (Failed" in host.log_text())
    line = host.log_text().split("Executed 'Functions.failing' (Failed")[1].splitlines()[0]
    assert "Duration=" in line and "the failing timer failed on purpose" in line


def test_the_admin_api_refuses_what_it_cannot_run(host: DevHostProcess, http: httpx2.Client) -> None:
    # GIVEN an unknown function, an HTTP function, a bad body and a tunnel's Host
    # WHEN each is sent to the admin API
    unknown = http.post(f"{host.url}/admin/functions/nope", json={"input": ""})
    http_function = http.post(f"{host.url}/admin/functions/echo", json={"input": ""})
    bad_body = http.post(f"{host.url}/admin/functions/nightly", content=b"[1]")
    tunnel = http.post(f"{host.url}/admin/functions/nightly", json={"input": ""},
                       headers={"Host": "chatbot.devtunnels.ms"})
    # THEN each gets its status and a reason
    assert [r.status_code for r in (unknown, http_function, bad_body, tunnel)] == [404, 400, 400, 401]


def test_a_timer_function_runs_on_its_ncrontab_schedule(host: DevHostProcess, ticks: Path) -> None:
    # GIVEN `tick`, scheduled by the app setting DEVHOST_TEST_SCHEDULE = "*/2 * * * * *" (every 2 s)
    # WHEN the host has run for a while
    wait_for(lambda: len(runs(ticks, "tick")) >= 2)
    # THEN it ran on even seconds, each run not past due and told the next occurrence
    for run in runs(ticks, "tick")[:2]:
        at = datetime.fromisoformat(run["at"])
        assert at.second % 2 == 0 and at.microsecond < 900_000, run
        assert run["past_due"] is False
        assert datetime.fromisoformat(run["next"]).second % 2 == 0


# -- start-up checks -------------------------------------------------------------------------------------


def test_a_binding_mistake_stops_the_start_naming_the_function(tmp_path: Path) -> None:
    # GIVEN an app whose HTTP trigger is named `req` but whose parameter is `request`
    host = DevHostProcess(env={}, app_dir=APPS / "broken_binding", log_path=tmp_path / "host.log")
    # WHEN the host starts
    with pytest.raises(RuntimeError) as failed:
        host.start(timeout=30)
    # THEN it exits with the worker's own message, which names the function and the parameter
    assert "cannot load the hello function" in str(failed.value)
    assert "'request'" in str(failed.value)


def test_an_unset_schedule_setting_stops_the_start_naming_the_function(tmp_path: Path) -> None:
    # GIVEN the timer app with DEVHOST_TEST_SCHEDULE unset
    host = DevHostProcess(env={"DEVHOST_TEST_TICKS": str(tmp_path / "ticks")}, app_dir=APPS / "devhost",
                          log_path=tmp_path / "host.log", health_path="/api/cookies")
    # WHEN the host starts
    with pytest.raises(RuntimeError) as failed:
        host.start(timeout=30)
    # THEN it exits naming the function and the setting
    assert "timer function 'tick'" in str(failed.value)
    assert "DEVHOST_TEST_SCHEDULE" in str(failed.value)


# -- queue triggers ------------------------------------------------------------------------------------
# tests/apps/queues: `record` notes each message it gets; each test writes the app's host.json.


class QueueApp:
    """The queue test app in its own folder with its own host.json, its queue on the session's Azurite."""

    def __init__(self, folder: Path, storage: str, *, queues: dict[str, Any], args: list[str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "function_app.py").write_text((APPS / "queues" / "function_app.py").read_text())
        (folder / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"queues": queues}}))
        self.folder = folder
        self.storage = storage
        self.name = "q" + uuid.uuid4().hex[:12]
        self.runs_file = folder / "runs.jsonl"
        self.args = ["--log-level", "debug", *(args or [])]
        self.queue = QueueClient.from_connection_string(storage, self.name)
        self.queue.create_queue()
        self.logs: list[str] = []
        self.host: DevHostProcess | None = None

    def start(self) -> DevHostProcess:
        env = {"DEVHOST_TEST_QUEUE": self.name, "DEVHOST_TEST_STORAGE": self.storage,
               "DEVHOST_TEST_RUNS": str(self.runs_file)}
        self.host = DevHostProcess(env=env, app_dir=self.folder, health_path="/api/none", args=self.args,
                                   log_path=self.folder / f"host-{len(self.logs)}.log").start()
        return self.host

    def stop(self) -> None:
        if self.host is not None:
            self.host.stop()
            self.logs.append(self.host.log_text())
            self.host = None

    def log_text(self) -> str:
        return "".join(self.logs) + (self.host.log_text() if self.host else "")

    def send(self, body: str, *, encode: bool = True) -> Any:
        return self.queue.send_message(base64.b64encode(body.encode()).decode() if encode else body)

    def runs(self, event: str = "start") -> list[dict[str, Any]]:
        if not self.runs_file.exists():
            return []
        return [line for line in map(json.loads, self.runs_file.read_text().splitlines()) if line["event"] == event]

    def poisoned(self) -> list[str]:
        poison = QueueClient.from_connection_string(self.storage, self.name + "-poison")
        try:
            return [str(m.content) for m in poison.peek_messages(max_messages=32)]
        except ResourceNotFoundError:
            return []

    def queue_length(self) -> int:
        return int(self.queue.get_queue_properties().approximate_message_count)


@pytest.fixture
def queue_app(azurite_connection_string: str, tmp_path: Path) -> Iterator[Any]:
    apps: list[QueueApp] = []

    def make(queues: dict[str, Any], *, args: list[str] | None = None) -> QueueApp:
        apps.append(QueueApp(tmp_path / f"app{len(apps)}", azurite_connection_string, queues=queues, args=args))
        return apps[-1]

    yield make
    for app in apps:
        app.stop()


def backoffs(log: str) -> list[float]:
    return [float(ms) / 1000 for ms in re.findall(r"Backing off polling of queue '[^']+' for (\d+) ms", log)]


def test_a_queue_message_runs_the_function_with_its_body_and_metadata(queue_app: Any) -> None:
    # GIVEN the record function on the queue named by the app setting DEVHOST_TEST_QUEUE (%...% in its binding)
    app = queue_app({"maxPollingInterval": "00:00:02"})
    app.start()
    # WHEN a message is put on that queue, base64-encoded as the default messageEncoding expects
    sent = app.send("héllo, queue")
    wait_for(lambda: app.runs("end"))
    # THEN the function ran once with the body and the trigger metadata func.QueueMessage reads
    run = app.runs()[0]
    assert run["body"] == "héllo, queue" and run["id"] == sent.id and run["dequeue_count"] == 1
    assert datetime.fromisoformat(run["insertion_time"]) == sent.inserted_on
    assert datetime.fromisoformat(run["expiration_time"]) == sent.expires_on
    assert run["pop_receipt"]
    # AND the message was leased for 10 minutes while it ran
    leased = datetime.fromisoformat(run["next_visible_time"]) - datetime.fromisoformat(run["at"])
    assert 590 <= leased.total_seconds() <= 601
    # AND it is deleted after the success, and the run is logged as the host logs it
    wait_for(lambda: app.queue_length() == 0)
    assert f"Executing 'Functions.record' (Reason='New queue message detected on '{app.name}'.'" in app.log_text()
    assert f"Trigger Details: MessageId: {sent.id}, DequeueCount: 1" in app.log_text()
    wait_for(lambda: "Executed 'Functions.record' (Succeeded" in app.log_text())
    assert app.runs() == app.runs("start")[:1] and len(app.runs("end")) == 1


def test_an_idle_queue_is_polled_with_random_exponential_backoff_and_a_found_message_resets_it(
        queue_app: Any) -> None:
    # GIVEN maxPollingInterval 2 s and an empty queue (that did not exist when the host started)
    app = queue_app({"maxPollingInterval": "00:00:02"})
    app.queue.delete_queue()
    app.start()
    wait_for(lambda: "does not exist yet; polling until it does" in app.log_text())
    app.queue.create_queue()
    # WHEN the host has polled it for a while
    wait_for(lambda: backoffs(app.log_text()).count(2.0) >= 2)
    idle = backoffs(app.log_text())
    # THEN the waits grow from 100 ms, at random, to the maximum and stay there
    assert idle[0] == 0.1
    assert all(a <= b for a, b in itertools.pairwise(idle)), idle
    assert max(idle) == 2.0 and len(set(idle[1:4])) == 3
    # WHEN a message comes while it waits the longest
    polls_before = len(idle)
    sent = app.send("wake up")
    wait_for(lambda: app.runs("end"))
    wait_for(lambda: len(backoffs(app.log_text())) > polls_before + 2)
    # THEN it is picked up within the maximum wait, and the next waits start again from 100 ms
    pickup = (datetime.fromisoformat(app.runs()[0]["at"]) - sent.inserted_on).total_seconds()
    print(f"pickup after an idle spell with maxPollingInterval 2 s: {pickup:.2f} s")
    assert pickup < 2.0 + 1.0 + 1.0  # the wait, plus Azurite's one-second insertion time, plus slack
    after = backoffs(app.log_text())[polls_before:]
    assert 0.1 in after[:2], after


def overlap(app: QueueApp) -> int:
    """The most runs that were going on at once, from the app's start and end notes."""
    events = sorted([(datetime.fromisoformat(r["at"]), 1) for r in app.runs("start")]
                    + [(datetime.fromisoformat(r["at"]), -1) for r in app.runs("end")])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_batch_size_and_new_batch_threshold_bound_the_runs_and_a_found_batch_polls_again_at_once(
        queue_app: Any) -> None:
    # GIVEN batchSize 2 and newBatchThreshold 1: at most 3 messages run at once
    app = queue_app({"maxPollingInterval": "00:00:05", "batchSize": 2, "newBatchThreshold": 1})
    app.start()
    wait_for(lambda: len(backoffs(app.log_text())) >= 3)
    # WHEN six messages wait in the queue, the second of them slower than the rest
    for seconds in (1, 3, 1, 1, 1, 1):
        app.send(f"sleep:{seconds}")
    wait_for(lambda: len(app.runs("end")) == 6, timeout=30)
    # THEN they ran two by two, a new batch as soon as no more than one was running: three at most
    assert overlap(app) == 3
    # AND while messages were found no poll waited: the next batch was fetched at once each time
    log = app.log_text()
    first, last = log.index("Executing 'Functions.record'"), log.rindex("Executing 'Functions.record'")
    assert backoffs(log[first:last]) == []


def test_a_failing_message_is_retried_after_the_visibility_timeout_then_moved_to_the_poison_queue(
        queue_app: Any) -> None:
    # GIVEN maxDequeueCount 3 and visibilityTimeout 2 s
    app = queue_app({"maxPollingInterval": "00:00:01", "maxDequeueCount": 3, "visibilityTimeout": "00:00:02"})
    app.start()
    # WHEN a message makes the function fail every time
    sent = app.send("fail: always")
    wait_for(lambda: app.poisoned(), timeout=30)
    # THEN it ran three times, its dequeue count growing, each retry after the visibility timeout
    runs = app.runs()
    assert [r["dequeue_count"] for r in runs] == [1, 2, 3] and {r["id"] for r in runs} == {sent.id}
    starts = [datetime.fromisoformat(r["at"]) for r in runs]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    print(f"retry gaps with visibilityTimeout 2 s: {gaps}")
    assert all(gap >= 1.9 for gap in gaps), gaps
    # AND then it moved to <queue>-poison with the same text, and left the queue
    assert app.poisoned() == [sent.content]
    assert base64.b64decode(app.poisoned()[0]) == b"fail: always"
    wait_for(lambda: app.queue_length() == 0)
    assert f"Message has reached MaxDequeueCount of 3. Moving message to queue '{app.name}-poison'." in app.log_text()
    assert app.log_text().count("Executed 'Functions.record' (Failed") == 3


def test_message_encoding_none_hands_over_the_text_as_sent_and_base64_refuses_what_is_not_base64(
        queue_app: Any) -> None:
    # GIVEN one app reading its queue with messageEncoding none, another with the default base64
    plain = queue_app({"maxPollingInterval": "00:00:01", "messageEncoding": "none"})
    encoded = queue_app({"maxPollingInterval": "00:00:01"})
    plain.start()
    encoded.start()
    # WHEN each gets a message that is plain text (not base64)
    plain.send('{"text": "as sent"}', encode=False)
    encoded.send("not base64!", encode=False)
    # THEN the first function gets the text as sent
    wait_for(lambda: plain.runs("end"))
    assert plain.runs()[0]["body"] == '{"text": "as sent"}'
    # AND the second message goes to the poison queue without a run, the text unchanged
    wait_for(lambda: encoded.poisoned())
    assert encoded.poisoned() == ["not base64!"] and encoded.runs() == []
    assert "Message decoding has failed! Check MessageEncoding settings." in encoded.log_text()


def test_a_host_killed_mid_run_runs_the_message_again_once_its_lease_runs_out(queue_app: Any) -> None:
    # GIVEN a host whose queue leases last 4 s (--queue-lease-seconds, dev only; Azure's are 10 minutes)
    app = queue_app({"maxPollingInterval": "00:00:01"}, args=["--queue-lease-seconds", "4"])
    app.start()
    # WHEN a message's run goes on longer than the lease
    app.send("slow-once")
    wait_for(lambda: app.runs())
    time.sleep(6)
    # THEN the lease is renewed while it runs: nothing else picked the message up
    assert [r["dequeue_count"] for r in app.runs()] == [1]
    # WHEN the host is killed mid-run (SIGKILL: no chance to release the message) and started again
    assert app.host is not None and app.host.pid is not None
    os.kill(app.host.pid, signal.SIGKILL)
    killed = datetime.now(UTC)
    app.stop()
    app.start()
    # THEN the message runs again, dequeued a second time, once the lease has run out, and completes
    wait_for(lambda: app.runs("end"), timeout=30)
    again = app.runs()[1]
    assert again["dequeue_count"] == 2 and again["id"] == app.runs()[0]["id"]
    print(f"run again {(datetime.fromisoformat(again['at']) - killed).total_seconds():.1f} s after the kill")
    assert (datetime.fromisoformat(again["at"]) - killed).total_seconds() <= 4 + 1 + 10
    wait_for(lambda: app.queue_length() == 0)


def test_a_host_stopped_mid_run_lets_the_run_finish_and_completes_the_message(queue_app: Any) -> None:
    # GIVEN a message whose run takes 3 s
    app = queue_app({"maxPollingInterval": "00:00:01"})
    app.start()
    app.send("sleep:3")
    wait_for(lambda: app.runs())
    # WHEN the host is stopped gracefully (SIGTERM, as Ctrl-C or a scale-in) while it runs
    app.stop()
    # THEN the run finished before the host exited, and the message was deleted: it never runs again
    assert len(app.runs("end")) == 1
    assert app.queue_length() == 0


def test_a_message_whose_runs_died_more_than_max_dequeue_count_times_goes_to_poison_without_a_run(
        queue_app: Any) -> None:
    # GIVEN maxDequeueCount 1 and 3-second leases, and a message whose first run never ends
    app = queue_app({"maxPollingInterval": "00:00:01", "maxDequeueCount": 1}, args=["--queue-lease-seconds", "3"])
    app.start()
    sent = app.send("slow-once")
    wait_for(lambda: app.runs())
    # WHEN its host is killed mid-run and started again
    assert app.host is not None and app.host.pid is not None
    os.kill(app.host.pid, signal.SIGKILL)
    app.stop()
    app.start()
    # THEN, dequeued a second time, it goes to the poison queue with its text, without another run
    wait_for(lambda: app.poisoned(), timeout=30)
    assert app.poisoned() == [sent.content] and len(app.runs()) == 1
    assert "Message has reached MaxDequeueCount of 1." in app.log_text()


def test_an_unset_queue_connection_setting_stops_the_start_naming_the_function(tmp_path: Path) -> None:
    # GIVEN the queue app with its connection setting DEVHOST_TEST_STORAGE unset
    host = DevHostProcess(env={"DEVHOST_TEST_QUEUE": "orders", "DEVHOST_TEST_RUNS": str(tmp_path / "runs")},
                          app_dir=APPS / "queues", log_path=tmp_path / "host.log", health_path="/api/none")
    # WHEN the host starts
    with pytest.raises(RuntimeError) as failed:
        host.start(timeout=30)
    # THEN it exits naming the function and the setting
    assert "queue function 'record'" in str(failed.value)
    assert "DEVHOST_TEST_STORAGE" in str(failed.value)


def logged_at(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def test_a_queue_output_binding_is_written_after_success_and_wakes_the_queue_listener_at_once(
        queue_app: Any) -> None:
    # GIVEN an idle queue whose listener waits ever longer (maxPollingInterval 30 s)
    app = queue_app({"maxPollingInterval": "00:00:30"})
    host = app.start()
    wait_for(lambda: max(backoffs(app.log_text()), default=0) >= 6, timeout=30)
    # WHEN a function writes two messages to it through a queue output binding, after one that failed
    with httpx2.Client(timeout=10) as http:
        assert http.post(f"{host.url}/api/enqueue", content=b"dropped", headers={"x-fail": "1"}).status_code == 500
        assert http.post(f"{host.url}/api/enqueue", content=b"first\nsecond").status_code == 200
    wait_for(lambda: len(app.runs("end")) == 2)
    # THEN the successful run's messages arrive, base64-encoded as the trigger reads them; the failed run's never
    assert sorted(r["body"] for r in app.runs()) == ["first", "second"]
    # AND the listener did not sit out its wait: it polled as soon as the messages were written
    lines = app.log_text().splitlines()
    executing = next(i for i, line in enumerate(lines) if "Executing 'Functions.record'" in line)
    waiting = [line for line in lines[:executing] if "Backing off polling" in line][-1]
    cut_short = logged_at(waiting).timestamp() + backoffs(waiting)[0] - logged_at(lines[executing]).timestamp()
    print(f"the {backoffs(waiting)[0]:.1f} s wait was cut {cut_short:.1f} s short")
    assert cut_short > 1.0
