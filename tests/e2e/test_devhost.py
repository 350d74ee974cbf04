"""The dev host behaves like the Functions host: each HTTP rule, key routes, timers, start-up checks.

Every test talks real HTTP to `devtools.host` in its own process, serving the test-only app in
tests/apps/devhost (or tests/apps/broken_binding), through the pinned azure-functions-runtime.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest

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
