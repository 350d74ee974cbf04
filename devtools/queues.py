"""Queue triggers: read as the Functions host's queue extension reads them, and run by its rules.

What this follows (the Storage Queues extension 5.x that extension bundle 4.x loads; the sources are
`QueueListener`, `QueueProcessor`, `QueuesOptions` and `RandomizedExponentialBackoffStrategy` in
Azure/azure-sdk-for-net `sdk/storage/Microsoft.Azure.WebJobs.Extensions.Storage.*`; docs/devhost.md
has the table):

- Indexing: the function's `queueTrigger` binding as the worker reported it. `%SETTING%` queue names
  are resolved from the app settings, the name is lower-cased and checked. The `connection` names an
  app setting (`AzureWebJobsStorage` when empty; `AzureWebJobs<name>` is tried too) that holds a
  connection string; `UseDevelopmentStorage=true` means the local Azurite. A missing one stops the
  start, naming the function and the setting.
- Polling: `batchSize` messages at a time, each leased for 10 minutes (`LEASE_SECONDS`; the dev host's
  `--queue-lease-seconds` shortens it for tests) and the lease renewed at half-time while the function
  runs. A batch found polls again as soon as no more than `newBatchThreshold` messages are running; an
  empty (or missing) queue backs off at random exponentially from 100 ms to `maxPollingInterval`.
- Completion: success deletes the message. A failure makes it visible again after
  `visibilityTimeout`, unless its dequeue count has reached `maxDequeueCount`: then it is copied, the
  same text, to `<queue>-poison` (created when missing) and deleted. A message dequeued more often than
  that (its runs died with their host) goes there without a run.
- `messageEncoding`: `base64` (the default) or `none`. A message that is not base64 under `base64`
  goes straight to the poison queue, as the extension's decoding-failure handler sends it.
- The function gets the body (a string, or bytes with `dataType: binary`) and the trigger metadata the
  host sends (`QueueTrigger`, `Id`, `DequeueCount`, `InsertionTime`, `ExpirationTime`,
  `NextVisibleTime`, `PopReceipt`, as the host's gRPC conversion types them), so `func.QueueMessage` is
  built by `azure.functions`' own converter.
- Output bindings (`queue`, also as `$return`): written only after the function succeeded, the queue
  created when missing, with the same `messageEncoding`; a JSON list is one message per item. A listener
  of the same host on that queue polls at once (`SharedQueueWatcher`), as it does on a poison move.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.queue import QueueMessage
from azure.storage.queue.aio import QueueClient

from devtools import rpc
from devtools.azurite import azurite_connection_string
from devtools.timers import resolve_settings
from devtools.worker import IndexedFunction, Outcome

log = logging.getLogger("devtools.host")

#: How long a dequeued message stays invisible while its function runs (the host's fixed 10 minutes).
LEASE_SECONDS = 600
#: The shortest wait between polls of an empty queue (`QueuePollingIntervals.Minimum`).
MIN_POLLING_INTERVAL = 0.1
DEVELOPMENT_STORAGE = "usedevelopmentstorage=true"
DEFAULT_CONNECTION = "AzureWebJobsStorage"
POISON_SUFFIX = "-poison"
_QUEUE_NAME = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{1,2})(?::(\d{1,2})(\.\d{1,7})?)?$")


class QueueSetupError(ValueError):
    """A queue function or the host.json queue settings cannot be used; the message says which."""


# -- host.json ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuesOptions:
    """host.json `extensions.queues`, with the extension's defaults (times in seconds)."""

    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    message_encoding: str = "base64"


def queues_options(host_json: Mapping[str, Any], *, processor_count: int | None = None) -> QueuesOptions:
    """The `extensions.queues` section of a host.json document; `QueueSetupError` naming a bad key.

    Keys are case-insensitive, as .NET configuration reads them. `newBatchThreshold` defaults to
    `batchSize / 2 * processors`."""
    extensions = _lower_keys(host_json.get("extensions") or {})
    section = _lower_keys(extensions.get("queues") or {})

    def where(key: str) -> str:
        return f"host.json extensions.queues.{key}"

    max_polling = _timespan(section.get("maxpollinginterval", "00:01:00"), where("maxPollingInterval"))
    if max_polling < MIN_POLLING_INTERVAL:
        raise QueueSetupError(f"{where('maxPollingInterval')} must not be less than 00:00:00.1")
    visibility = _timespan(section.get("visibilitytimeout", "00:00:00"), where("visibilityTimeout"))
    batch_size = _integer(section.get("batchsize", 16), where("batchSize"), low=1, high=32)
    cpus = processor_count or os.cpu_count() or 1
    threshold = _integer(section.get("newbatchthreshold", batch_size // 2 * cpus), where("newBatchThreshold"),
                         low=0, high=None)
    max_dequeue = _integer(section.get("maxdequeuecount", 5), where("maxDequeueCount"), low=1, high=None)
    encoding = str(section.get("messageencoding", "base64")).lower()
    if encoding not in ("base64", "none"):
        raise QueueSetupError(f"{where('messageEncoding')} must be \"base64\" or \"none\", not {encoding!r}")
    return QueuesOptions(max_polling_interval=max_polling, visibility_timeout=visibility, batch_size=batch_size,
                         new_batch_threshold=threshold, max_dequeue_count=max_dequeue, message_encoding=encoding)


def _lower_keys(section: object) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in section.items()} if isinstance(section, dict) else {}


def _timespan(value: object, where: str) -> float:
    """A .NET TimeSpan string (`[d.]hh:mm[:ss[.fffffff]]`) in seconds."""
    found = _TIMESPAN.match(value) if isinstance(value, str) else None
    if found is None:
        raise QueueSetupError(f"{where} must be a TimeSpan such as \"00:00:02\", not {value!r}")
    days, hours, minutes, seconds, fraction = found.groups()
    return (int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)
            + float(fraction or 0))


def _integer(value: object, where: str, *, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise QueueSetupError(f"{where} must be a whole number {bounds}, not {value!r}")
    return value


# -- indexing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueFunction:
    """A queue-triggered function with its queue and storage account resolved."""

    function: IndexedFunction
    queue_name: str
    connection: str
    connection_string: str
    binary: bool

    @property
    def poison_queue_name(self) -> str | None:
        """`<queue>-poison`, or None where the host keeps none (the queue is a poison queue itself, or
        the name would be too long)."""
        name = self.queue_name + POISON_SUFFIX
        if self.queue_name.endswith(POISON_SUFFIX) or not _QUEUE_NAME.match(name):
            return None
        return name


def queue_functions(functions: list[IndexedFunction], *, environ: Mapping[str, str]) -> list[QueueFunction]:
    """The app's queue-triggered functions, their settings resolved; `QueueSetupError` naming the function."""
    queues = []
    for function in functions:
        trigger = function.trigger
        if trigger.get("type") != "queueTrigger":
            continue
        try:
            name, setting, connection_string = _queue_binding(trigger, environ=environ)
        except ValueError as exc:
            raise QueueSetupError(f"queue function {function.name!r}: {exc}") from exc
        queues.append(QueueFunction(function, name, setting, connection_string,
                                    binary=str(trigger.get("dataType", "")).lower() == "binary"))
    return queues


def _queue_binding(binding: Mapping[str, Any], *, environ: Mapping[str, str]) -> tuple[str, str, str]:
    """A queue binding's queue name (resolved, lower-cased, checked), connection setting and string."""
    name = resolve_settings(str(binding.get("queueName", "")), environ=environ).lower()
    if not _QUEUE_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid queue name (3-63 lower-case letters, digits and "
                         "single hyphens, starting and ending with a letter or digit)")
    setting, connection_string = storage_connection(str(binding.get("connection") or ""), environ=environ)
    return name, setting, connection_string


def storage_connection(connection: str, *, environ: Mapping[str, str]) -> tuple[str, str]:
    """The app setting a binding's `connection` names, and the queue connection string it holds."""
    name = connection or DEFAULT_CONNECTION
    for setting in (name, f"AzureWebJobs{name}"):
        value = environ.get(setting, "").strip()
        if value:
            break
    else:
        raise ValueError(f"the app setting {name!r} named by its connection is not set (identity-based "
                         f"connections such as {name}__queueServiceUri are not supported by the dev host)")
    if value.lower().rstrip(";") == DEVELOPMENT_STORAGE:
        return setting, azurite_connection_string()
    parts = {k.strip().lower() for k, _, _ in (p.partition("=") for p in value.split(";") if p.strip())}
    if "queueendpoint" not in parts and any(p.endswith("endpoint") for p in parts):
        raise ValueError(f"the connection string in app setting {setting!r} has no QueueEndpoint")
    if "queueendpoint" not in parts and "accountname" not in parts:
        raise ValueError(f"app setting {setting!r} is not a storage connection string")
    return setting, value


# -- the listener ----------------------------------------------------------------------------------


Run = Callable[["QueueFunction", rpc.TypedData, dict[str, rpc.TypedData], str], Awaitable[Outcome]]


class Backoff:
    """`RandomizedExponentialBackoffStrategy`: back to the minimum after a message was found, else the
    minimum plus a random 0.8-1.2 times 2^(n-1) minimums, up to the maximum."""

    def __init__(self, *, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._current = 0.0
        self._exponent = 0

    def next_delay(self, *, found: bool) -> float:
        if found:
            self._current = self.minimum
            self._exponent = 1
        elif self._current != self.maximum:
            delay = self.minimum
            if self._exponent > 0:
                delay += self._rng.uniform(0.8, 1.2) * 2 ** (self._exponent - 1) * self.minimum
            if delay < self.maximum:
                self._current = delay
                self._exponent += 1
            else:
                self._current = self.maximum
        return self._current


class QueueListener:
    """Polls one function's queue and runs each message by the host's rules, until cancelled."""

    def __init__(self, queue: QueueFunction, *, options: QueuesOptions, run: Run,
                 lease_seconds: int = LEASE_SECONDS, enqueued: Callable[[str], None] | None = None) -> None:
        """`enqueued(queue_name)` is called after a message moved to a poison queue (to wake its listener)."""
        self.queue = queue
        self.options = options
        self.run = run
        self.lease_seconds = lease_seconds
        self.enqueued = enqueued
        self._wake = asyncio.Event()
        self.backoff = Backoff(minimum=MIN_POLLING_INTERVAL, maximum=options.max_polling_interval)
        self.processing: set[asyncio.Task[None]] = set()
        self._client: QueueClient | None = None
        self._poison: QueueClient | None = None
        self._unreachable = False
        self._missing = False

    async def run_forever(self) -> None:
        # No encode or decode policy: the message text is read raw and decoded here, as the host does.
        self._client = QueueClient.from_connection_string(self.queue.connection_string, self.queue.queue_name)
        poison = self.queue.poison_queue_name
        if poison is not None:
            self._poison = QueueClient.from_connection_string(self.queue.connection_string, poison)
        found_since_last_delay = False
        while True:
            self._wake.clear()  # a message added before this poll is found by it, as `ExecuteAsync` resets
            batch = await self._receive()
            if batch:
                found_since_last_delay = True
                for message in batch:
                    task = asyncio.create_task(self._process(message))
                    self.processing.add(task)
                    task.add_done_callback(self.processing.discard)
                while len(self.processing) > self.options.new_batch_threshold:
                    await asyncio.wait(set(self.processing), return_when=asyncio.FIRST_COMPLETED)
                continue
            delay = self.backoff.next_delay(found=found_since_last_delay)
            found_since_last_delay = False
            log.debug("Backing off polling of queue '%s' for %.0f ms", self.queue.queue_name, delay * 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def notify(self) -> None:
        """A message was just added to this queue by this host: end the current backoff wait now."""
        self._wake.set()

    async def close(self, *, grace: float) -> None:
        """After the poll loop is cancelled: let running messages finish for up to `grace` seconds (the
        rest keep their lease, which runs out as after a crash), then close the clients."""
        if self.processing:
            _, pending = await asyncio.wait(set(self.processing), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for client in (self._client, self._poison):
            if client is not None:
                await client.close()

    async def _receive(self) -> list[QueueMessage]:
        assert self._client is not None
        try:
            pages = self._client.receive_messages(messages_per_page=self.options.batch_size,
                                                  max_messages=self.options.batch_size,
                                                  visibility_timeout=self.lease_seconds)
            batch = [message async for message in pages]
        except ResourceNotFoundError:  # the host backs off while the queue does not exist, and does not create it
            if not self._missing:
                log.info("queue %r of function %r does not exist yet; polling until it does",
                         self.queue.queue_name, self.queue.function.name)
            self._missing = True
            return []
        except AzureError as exc:  # a server error or storage unreachable: back off and poll again
            if not self._unreachable:
                log.warning("cannot poll queue %r of function %r (%s); retrying", self.queue.queue_name,
                            self.queue.function.name, getattr(exc, "reason", None) or type(exc).__name__)
            self._unreachable = True
            return []
        self._unreachable = self._missing = False
        return batch

    async def _process(self, message: QueueMessage) -> None:
        try:
            await self._process_one(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("queue message %s of function %r could not be completed", message.id,
                          self.queue.function.name)

    async def _process_one(self, message: QueueMessage) -> None:
        raw = str(message.content or "")
        if message.dequeue_count is not None and message.dequeue_count > self.options.max_dequeue_count:
            await self._move_to_poison(message, raw, receipt=str(message.pop_receipt))
            return
        body = self._decode(raw)
        if body is None:
            log.warning("Message decoding has failed! Check MessageEncoding settings. MessageId=%s.", message.id)
            await self._move_to_poison(message, raw, receipt=str(message.pop_receipt))
            return
        receipt = [str(message.pop_receipt)]
        renewing = asyncio.create_task(self._renew_lease(message, receipt))
        try:
            data, metadata = trigger_data(self.queue, message, body)
            outcome = await self.run(self.queue, data, metadata,
                                     f"New queue message detected on '{self.queue.queue_name}'.")
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
        if outcome.succeeded:
            await self._settle(self._client_or_fail().delete_message(message.id, receipt[0]))
        elif self._poison is None:
            pass  # no poison queue: the host leaves the message invisible until its lease runs out
        elif (message.dequeue_count or 0) >= self.options.max_dequeue_count:
            await self._move_to_poison(message, raw, receipt=receipt[0])
        else:
            await self._settle(self._client_or_fail().update_message(
                message.id, receipt[0], visibility_timeout=int(self.options.visibility_timeout)))

    def _decode(self, raw: str) -> bytes | None:
        if self.options.message_encoding == "none":
            return raw.encode("utf-8")
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None

    async def _renew_lease(self, message: QueueMessage, receipt: list[str]) -> None:
        """Keep the message invisible while the function runs: renew at half the lease, sooner after a
        failed renewal (`UpdateQueueMessageVisibilityCommand`); stop once the message is lost."""
        interval = self.lease_seconds / 2
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                updated = await self._client_or_fail().update_message(
                    message.id, receipt[0], visibility_timeout=self.lease_seconds)
            except (ResourceNotFoundError, HttpResponseError) as exc:
                if isinstance(exc, HttpResponseError) and (exc.status_code or 0) >= 500:
                    delay = max(delay / 2, 1.0)
                    continue
                log.warning("the lease on queue message %s was lost (%s)", message.id, exc.reason or exc)
                return
            except AzureError:
                delay = max(delay / 2, 1.0)
                continue
            receipt[0] = str(updated.pop_receipt)
            delay = interval

    async def _move_to_poison(self, message: QueueMessage, raw: str, *, receipt: str) -> None:
        """Copy the message's text to the poison queue (created when missing), then delete it."""
        if self._poison is None:
            return
        log.warning("Message has reached MaxDequeueCount of %d. Moving message to queue '%s'.",
                    self.options.max_dequeue_count, self.queue.poison_queue_name)
        try:
            await self._poison.send_message(raw)
        except ResourceNotFoundError:
            try:
                await self._poison.create_queue()
            except ResourceExistsError:
                pass
            await self._poison.send_message(raw)
        if self.enqueued is not None and self.queue.poison_queue_name:
            self.enqueued(self.queue.poison_queue_name)
        await self._settle(self._client_or_fail().delete_message(message.id, receipt))

    async def _settle(self, call: Awaitable[object]) -> None:
        """Delete or release a message; someone else owning it now (pop receipt mismatch) or it being gone
        is not an error, as in `QueueProcessor`."""
        try:
            await call
        except ResourceNotFoundError:
            pass
        except HttpResponseError as exc:
            if exc.status_code != 400:
                raise
            log.debug("queue message no longer ours: %s", exc.reason)

    def _client_or_fail(self) -> QueueClient:
        assert self._client is not None
        return self._client


def trigger_data(queue: QueueFunction, message: QueueMessage,
                 body: bytes) -> tuple[rpc.TypedData, dict[str, rpc.TypedData]]:
    """The trigger's value and metadata as the host sends them over gRPC: strings as `string`, the
    dequeue count and the times as JSON (Newtonsoft's ISO dates)."""
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    data = rpc.TypedData(bytes=body) if queue.binary or text is None else rpc.TypedData(string=text)
    metadata = {
        "DequeueCount": rpc.TypedData(json=json.dumps(message.dequeue_count or 0)),
        "ExpirationTime": _json_time(message.expires_on),
        "Id": rpc.TypedData(string=str(message.id)),
        "InsertionTime": _json_time(message.inserted_on),
        "NextVisibleTime": _json_time(message.next_visible_on),
        "PopReceipt": rpc.TypedData(string=str(message.pop_receipt)),
        "sys": rpc.TypedData(json=json.dumps({
            "MethodName": queue.function.name, "UtcNow": datetime.now(UTC).isoformat(),
            "RandGuid": str(uuid.uuid4())})),
    }
    if text is not None:
        metadata["QueueTrigger"] = rpc.TypedData(string=text)
    return data, metadata


def _json_time(value: datetime | None) -> rpc.TypedData:
    when = (value or datetime.now(UTC)).astimezone(UTC)
    return rpc.TypedData(json=json.dumps(when.isoformat()))


# -- output bindings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueOutput:
    """A `queue` output binding (a parameter, or `$return`) with its queue and account resolved."""

    binding: str
    queue_name: str
    connection_string: str


def queue_outputs(functions: list[IndexedFunction], *,
                  environ: Mapping[str, str]) -> dict[str, list[QueueOutput]]:
    """Each function's queue output bindings by function name; `QueueSetupError` naming the function."""
    outputs: dict[str, list[QueueOutput]] = {}
    for function in functions:
        for binding in function.bindings:
            if binding.get("type") != "queue" or str(binding.get("direction", "")).lower() != "out":
                continue
            try:
                name, _, connection_string = _queue_binding(binding, environ=environ)
            except ValueError as exc:
                raise QueueSetupError(f"function {function.name!r}, queue output {binding.get('name')!r}: "
                                      f"{exc}") from exc
            outputs.setdefault(function.name, []).append(
                QueueOutput(str(binding.get("name")), name, connection_string))
    return outputs


class QueueWriter:
    """Writes what functions set on their queue output bindings, after they succeed."""

    def __init__(self, outputs: dict[str, list[QueueOutput]], *, options: QueuesOptions,
                 enqueued: Callable[[str], None]) -> None:
        self.outputs = outputs
        self.options = options
        self.enqueued = enqueued
        self._clients: dict[tuple[str, str], QueueClient] = {}

    async def write(self, function: IndexedFunction, outcome: Outcome) -> None:
        """Send each queue output's messages (the queue created when missing); errors propagate."""
        for output in self.outputs.get(function.name, []):
            data = outcome.return_value if output.binding == "$return" else outcome.outputs.get(output.binding)
            texts = [self._encode(item) for item in output_messages(data)]
            if not texts:
                continue
            client = self._client(output)
            for text in texts:
                try:
                    await client.send_message(text)
                except ResourceNotFoundError:
                    with contextlib.suppress(ResourceExistsError):
                        await client.create_queue()
                    await client.send_message(text)
            self.enqueued(output.queue_name)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    def _client(self, output: QueueOutput) -> QueueClient:
        key = (output.connection_string, output.queue_name)
        if key not in self._clients:
            self._clients[key] = QueueClient.from_connection_string(output.connection_string, output.queue_name)
        return self._clients[key]

    def _encode(self, body: bytes) -> str:
        if self.options.message_encoding == "none":
            return body.decode("utf-8")
        return base64.b64encode(body).decode("ascii")


def output_messages(data: rpc.TypedData | None) -> list[bytes]:
    """The messages an output value makes, as the host reads it: a string or bytes is one; JSON is read
    into objects, a list being one message per item (strings as they are, the rest as compact JSON)."""
    kind = data.WhichOneof("data") if data is not None else None
    if data is None or kind is None:
        return []
    if kind == "string":
        return [str(data.string).encode("utf-8")]
    if kind == "bytes":
        return [bytes(data.bytes)]
    if kind == "json":
        value = json.loads(data.json)
        items = value if isinstance(value, list) else [value]
        return [(item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))).encode("utf-8")
                for item in items if item is not None]
    raise ValueError(f"a queue output cannot take {kind} data")
