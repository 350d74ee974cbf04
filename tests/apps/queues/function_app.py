"""A test-only function app for the dev host's queue-trigger tests (never deployed): it notes each message.

`record` is triggered by the queue the app setting DEVHOST_TEST_QUEUE names, on the storage account of
the app setting DEVHOST_TEST_STORAGE. It appends one JSON line per run to the file DEVHOST_TEST_RUNS names,
with the message as `func.QueueMessage` presents it, when the run starts and when it ends. By the body:
`fail...` raises; `slow-once...` runs for a minute on its first dequeue (to be killed); `sleep:<s>...` runs
for <s> seconds. `POST /api/enqueue` puts each line of its body on the same queue through a queue
output binding, then fails if the request has an `x-fail` header. The host.json beside it is the tests'
own (each test writes its `extensions.queues`).
"""

from __future__ import annotations

import asyncio
import json
import os
import typing
from datetime import UTC, datetime

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


def _note(event: str, msg: func.QueueMessage) -> None:
    line = {"event": event, "at": datetime.now(UTC).isoformat(), "body": msg.get_body().decode("utf-8", "replace"),
            "id": msg.id, "dequeue_count": msg.dequeue_count, "pop_receipt": msg.pop_receipt,
            "insertion_time": _iso(msg.insertion_time), "expiration_time": _iso(msg.expiration_time),
            "next_visible_time": _iso(msg.time_next_visible)}
    with open(os.environ["DEVHOST_TEST_RUNS"], "a", encoding="utf-8") as runs:
        runs.write(json.dumps(line) + "\n")


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


@app.queue_trigger(arg_name="msg", queue_name="%DEVHOST_TEST_QUEUE%", connection="DEVHOST_TEST_STORAGE")
async def record(msg: func.QueueMessage) -> None:
    _note("start", msg)
    body = msg.get_body().decode("utf-8", "replace")
    if body.startswith("fail"):
        raise RuntimeError("the record function failed on purpose")
    if body.startswith("slow-once") and msg.dequeue_count == 1:
        await asyncio.sleep(60)
    if body.startswith("sleep:"):
        await asyncio.sleep(float(body.split(":")[1]))
    _note("end", msg)


@app.route(route="enqueue", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%DEVHOST_TEST_QUEUE%", connection="DEVHOST_TEST_STORAGE")
# The worker takes `typing.List[str]` here and refuses `list[str]`.
def enqueue(req: func.HttpRequest, out: func.Out[typing.List[str]]) -> func.HttpResponse:  # noqa: UP006
    out.set(req.get_body().decode("utf-8").splitlines())
    if "x-fail" in req.headers:
        raise RuntimeError("the enqueue function failed on purpose")
    return func.HttpResponse("queued")
