"""Queue trigger settings and polling rules read as the Functions host's queue extension reads them (no I/O)."""

from __future__ import annotations

import random

import pytest

from devtools import rpc
from devtools.azurite import azurite_connection_string
from devtools.queues import (
    Backoff,
    QueueFunction,
    QueueSetupError,
    output_messages,
    queue_functions,
    queues_options,
    storage_connection,
)
from devtools.worker import IndexedFunction

AZURITE = azurite_connection_string(port=1, queue_port=2)


def queue_function(name: str = "work", **binding: str) -> IndexedFunction:
    trigger = {"type": "queueTrigger", "direction": "IN", "name": "msg", "queueName": "orders", **binding}
    return IndexedFunction(name, "id-" + name, (trigger,))


def test_host_json_queue_settings_default_as_the_extension_does() -> None:
    # GIVEN a host.json without extensions.queues, on a machine with 4 processors
    # WHEN its queue settings are read
    options = queues_options({"version": "2.0"}, processor_count=4)
    # THEN they are the extension's defaults: 1 min polling, no retry delay, 16 a batch, 16/2*4 threshold, 5 tries
    assert (options.max_polling_interval, options.visibility_timeout, options.batch_size,
            options.new_batch_threshold, options.max_dequeue_count, options.message_encoding) == (
        60.0, 0.0, 16, 32, 5, "base64")


def test_host_json_queue_settings_are_read_case_insensitively_with_timespans() -> None:
    # GIVEN extensions.queues with TimeSpan strings, in another case than documented
    host_json = {"extensions": {"Queues": {"MaxPollingInterval": "00:00:02.5", "visibilityTimeout": "1.00:00:30",
                                           "batchSize": 4, "maxDequeueCount": 2, "messageEncoding": "None"}}}
    # WHEN they are read
    options = queues_options(host_json, processor_count=1)
    # THEN each is taken, and the threshold follows the batch size
    assert options.max_polling_interval == 2.5 and options.visibility_timeout == 86430
    assert (options.batch_size, options.new_batch_threshold, options.max_dequeue_count) == (4, 2, 2)
    assert options.message_encoding == "none"


@pytest.mark.parametrize(("setting", "value", "reason"), [
    ("maxPollingInterval", "00:00:00.05", "must not be less than 00:00:00.1"),
    ("maxPollingInterval", 2000, "must be a TimeSpan"),
    ("batchSize", 33, "from 1 to 32"),
    ("maxDequeueCount", 0, "1 or more"),
    ("newBatchThreshold", -1, "0 or more"),
    ("messageEncoding", "utf8", '"base64" or "none"'),
])
def test_a_bad_queue_setting_is_refused_naming_the_key(setting: str, value: object, reason: str) -> None:
    # GIVEN a host.json queue setting the host would refuse (or misread)
    # WHEN it is read
    with pytest.raises(QueueSetupError) as refused:
        queues_options({"extensions": {"queues": {setting: value}}})
    # THEN the error names the key and says why
    assert f"host.json extensions.queues.{setting}" in str(refused.value) and reason in str(refused.value)


def test_the_backoff_grows_at_random_to_the_maximum_and_resets_after_a_message() -> None:
    # GIVEN the extension's backoff from 100 ms to 2 s
    backoff = Backoff(minimum=0.1, maximum=2.0, rng=random.Random(7))
    # WHEN empty polls follow one another
    idle = [backoff.next_delay(found=False) for _ in range(10)]
    # THEN the first wait is the minimum, each next one the minimum plus 0.8-1.2 x 2^(n-1) minimums, up to the cap
    assert idle[0] == 0.1
    for n, (wait, previous) in enumerate(zip(idle[1:], idle, strict=False), start=1):
        if wait < 2.0:
            assert 0.1 + 0.8 * 2 ** (n - 1) * 0.1 <= wait <= 0.1 + 1.2 * 2 ** (n - 1) * 0.1
        assert wait >= previous
    assert idle[-1] == 2.0
    # AND after a message was found the next wait is the minimum again
    assert backoff.next_delay(found=True) == 0.1


def test_a_queue_trigger_resolves_its_queue_name_and_connection_setting() -> None:
    # GIVEN a queue function whose queue name is an app-setting expression and whose connection is named
    function = queue_function(queueName="%TURN_QUEUE%", connection="Jobs")
    environ = {"TURN_QUEUE": "Chat-Turns", "AzureWebJobsJobs": "UseDevelopmentStorage=true"}
    # WHEN it is indexed
    [found] = queue_functions([function, IndexedFunction("web", "w", ({"type": "httpTrigger"},))], environ=environ)
    # THEN the name is resolved and lower-cased, the AzureWebJobs-prefixed setting is found, and development
    # storage means the local Azurite's queue service
    assert found == QueueFunction(function, "chat-turns", "AzureWebJobsJobs", azurite_connection_string(),
                                  binary=False)
    assert "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1" in found.connection_string
    assert found.poison_queue_name == "chat-turns-poison"


@pytest.mark.parametrize(("binding", "environ", "named"), [
    ({"queueName": "%MISSING%"}, {"AzureWebJobsStorage": AZURITE}, "MISSING"),
    ({"connection": "ORDERS_STORAGE"}, {}, "ORDERS_STORAGE"),
    ({}, {}, "AzureWebJobsStorage"),
    ({"queueName": "no_underscores"}, {"AzureWebJobsStorage": AZURITE}, "no_underscores"),
])
def test_a_queue_function_that_cannot_be_served_stops_the_start_naming_it(
        binding: dict[str, str], environ: dict[str, str], named: str) -> None:
    # GIVEN a queue function with an unset setting or a bad queue name
    # WHEN it is indexed
    with pytest.raises(QueueSetupError) as refused:
        queue_functions([queue_function("turn", **binding)], environ=environ)
    # THEN the error names the function and what is wrong
    assert "queue function 'turn'" in str(refused.value) and named in str(refused.value)


def test_a_connection_string_without_a_queue_endpoint_is_refused() -> None:
    # GIVEN a table-only connection string (explicit endpoints, none for queues)
    table_only = AZURITE.split("QueueEndpoint")[0]
    # WHEN it is used for a queue trigger
    with pytest.raises(ValueError, match="has no QueueEndpoint"):
        storage_connection("AzureWebJobsStorage", environ={"AzureWebJobsStorage": table_only})
    # THEN it is refused, while an account connection string (no explicit endpoints) is taken as it is
    account = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net"
    assert storage_connection("", environ={"AzureWebJobsStorage": account}) == ("AzureWebJobsStorage", account)


def test_a_poison_queue_has_no_poison_queue_of_its_own() -> None:
    # GIVEN a trigger on a poison queue, and one whose name leaves no room for the suffix
    poison = QueueFunction(queue_function(), "orders-poison", "AzureWebJobsStorage", AZURITE, binary=False)
    long = QueueFunction(queue_function(), "q" * 60, "AzureWebJobsStorage", AZURITE, binary=False)
    # WHEN their poison queues are named
    # THEN there are none, as the host keeps none
    assert poison.poison_queue_name is None and long.poison_queue_name is None


def test_a_queue_output_value_becomes_messages_as_the_host_reads_it() -> None:
    # GIVEN the values the worker hands back for queue outputs: a string, bytes, a JSON list, a QueueMessage
    values = [rpc.TypedData(string="plain"), rpc.TypedData(bytes=b"\x00raw"),
              rpc.TypedData(json='["a", {"b": 1}, null]'), rpc.TypedData(json='{"id": null, "body": "x"}'),
              rpc.TypedData()]
    # WHEN each is turned into queue messages
    messages = [output_messages(value) for value in values]
    # THEN a string or bytes is one message, a list one per item (objects as compact JSON), an unset value none
    assert messages == [[b"plain"], [b"\x00raw"], [b"a", b'{"b":1}'], [b'{"id":null,"body":"x"}'], []]
