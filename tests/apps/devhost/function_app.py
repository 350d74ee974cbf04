"""A test-only function app for the dev host's tests (never deployed): it shows what a function receives.

HTTP routes echo the request as `func.HttpRequest` presents it; timer functions append one JSON line
per run to the file named by DEVHOST_TEST_TICKS. `tick` runs on DEVHOST_TEST_SCHEDULE (an app-setting
expression, as the retention timer will use); `nightly` and `failing` run only when called.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.route(route="echo/{name}", methods=["GET", "POST"])
def echo(req: func.HttpRequest) -> func.HttpResponse:
    seen = {"method": req.method, "url": req.url, "headers": dict(req.headers), "params": dict(req.params),
            "route_params": dict(req.route_params), "body": req.get_body().decode("latin-1")}
    return func.HttpResponse(json.dumps(seen), mimetype="application/json")


@app.route(route="cookies", methods=["GET"])
def cookies(req: func.HttpRequest) -> func.HttpResponse:
    response = func.HttpResponse("two cookies")
    response.headers.add("Set-Cookie", "first=1")
    response.headers.add("Set-Cookie", "second=2; Path=/api; HttpOnly")
    return response


@app.route(route="operator", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def operator(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("operator data")


def _note(name: str, timer: func.TimerRequest) -> None:
    line = {"function": name, "at": datetime.now(UTC).isoformat(), "past_due": timer.past_due,
            "next": timer.schedule_status.get("Next")}
    with open(os.environ["DEVHOST_TEST_TICKS"], "a", encoding="utf-8") as ticks:
        ticks.write(json.dumps(line) + "\n")


@app.timer_trigger(schedule="%DEVHOST_TEST_SCHEDULE%", arg_name="timer")
def tick(timer: func.TimerRequest) -> None:
    _note("tick", timer)


@app.timer_trigger(schedule="0 0 3 * * *", arg_name="timer")
def nightly(timer: func.TimerRequest) -> None:
    _note("nightly", timer)


@app.timer_trigger(schedule="0 0 4 * * *", arg_name="timer")
def failing(timer: func.TimerRequest) -> None:
    raise RuntimeError("the failing timer failed on purpose")
