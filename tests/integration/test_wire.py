"""The hand-built entity-group transaction (`shared.store._wire`) against a real Azurite, and beside
what the Tables SDK itself sends for the same operations."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient

from shared.store._wire import Operation, TableWire, TransactionFailed

# Quote, percent, ampersand, plus, space, non-ASCII: allowed in keys, awkward in URLs and OData.
PK = "it's 100% a&b+c é"


class CaptureBodies(SansIOHTTPPolicy):  # type: ignore[type-arg]
    """Keeps the body of every request the SDK sends (multipart bodies prepared first)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def on_request(self, request: PipelineRequest) -> None:  # type: ignore[type-arg]
        http_request = request.http_request
        if http_request.multipart_mixed_info:
            http_request.prepare_multipart_body()
        body = http_request.body
        self.bodies.append(body if isinstance(body, bytes) else str(body or "").encode())


@pytest.fixture
async def table(azurite_connection_string: str, table_name: str) -> AsyncIterator[TableClient]:
    async with TableClient.from_connection_string(azurite_connection_string,
                                                  table_name=table_name) as client:
        await client.create_table()
        yield client


def normalized(body: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    """A transaction body's envelope lines (boundaries, dates and lengths blanked) and its JSON
    bodies, with the `Edm.String` annotations the SDK adds (a JSON string is one already)."""
    text = body.decode()
    text = re.sub(r"(batch|changeset)_[0-9a-f-]{36}", r"\1_B", text)
    text = re.sub(r"(?m)^((?:x-ms-)?[Dd]ate): [^\r\n]*", r"\1: D", text)
    text = re.sub(r"(?m)^Content-Length: \d+", "Content-Length: N", text)
    lines, documents = [], []
    for line in text.split("\r\n"):
        if line.startswith("{"):
            document = json.loads(line)
            documents.append({name: value for name, value in document.items()
                              if not (name.endswith("@odata.type") and value == "Edm.String")})
        else:
            lines.append(line)
    return lines, documents


async def test_a_transaction_is_sent_as_the_sdk_sends_it(table: TableClient) -> None:
    # GIVEN a head row, a row to delete, and the SDK's own body for replace-if-match, create and
    # delete (captured on its way out)
    await table.upsert_entity({"PartitionKey": PK, "RowKey": "h", "n": 1})
    await table.upsert_entity({"PartitionKey": PK, "RowKey": "gone", "n": 1})
    etag = (await table.get_entity(PK, "h")).metadata["etag"]
    head = {"PartitionKey": PK, "RowKey": "h", "n": 2, "big": 2**40, "text": "é\u2028\"<>",
            "at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "flag": True}
    created = {"PartitionKey": PK, "RowKey": "m'1", "seq": 7, "content": "hello"}
    capture = CaptureBodies()
    async with TableClient(endpoint=table.url, table_name=table.table_name,
                           credential=table.credential, per_call_policies=[capture]) as sdk:
        sdk_head = {**head, "big": (2**40, "Edm.Int64")}
        with pytest.raises(TableTransactionError):  # the SDK's own try fails on the stale etag
            await sdk.submit_transaction([
                ("update", sdk_head, {"mode": UpdateMode.REPLACE, "etag": etag + "x",
                                      "match_condition": MatchConditions.IfNotModified}),
                ("create", created), ("delete", {"PartitionKey": PK, "RowKey": "gone"})])
    # WHEN the wire builds the same transaction
    wire = TableWire(table)
    operations = [Operation("replace", head, etag=etag + "x"), Operation("create", created),
                  Operation("delete", {"PartitionKey": PK, "RowKey": "gone"})]
    ours = wire.transaction_body(operations, batch="batch_" + "0" * 36,
                                 changeset="changeset_" + "1" * 36)
    # THEN its envelope and entities are the SDK's, but for one deliberate header: creates ask
    # the service not to echo the entity back
    sdk_lines, sdk_documents = normalized(capture.bodies[-1])
    our_lines, our_documents = normalized(ours)
    assert our_documents == sdk_documents
    assert [line for line in our_lines if line != "Prefer: return-no-content"] == sdk_lines
    assert our_lines.count("Prefer: return-no-content") == 1
    # AND every Content-Length it declares is its body's length
    declared = re.findall(rb"Content-Length: (\d+)\r\n(?:.*\r\n)*?\r\n(\{.*\})", ours)
    assert len(declared) == 2
    assert all(int(length) == len(document) for length, document in declared)


async def test_a_transaction_applies_every_operation(table: TableClient) -> None:
    # GIVEN a stored row and the wire
    await table.upsert_entity({"PartitionKey": PK, "RowKey": "h", "n": 1})
    await table.upsert_entity({"PartitionKey": PK, "RowKey": "gone", "n": 1})
    etag = (await table.get_entity(PK, "h")).metadata["etag"]
    wire = TableWire(table)
    # WHEN one transaction replaces it if unchanged, creates a row and deletes one
    await wire.transact([Operation("replace", {"PartitionKey": PK, "RowKey": "h", "n": 2}, etag=etag),
                         Operation("create", {"PartitionKey": PK, "RowKey": "new", "n": 3}),
                         Operation("delete", {"PartitionKey": PK, "RowKey": "gone"})])
    # THEN all three happened
    rows = {row["RowKey"]: row["n"] async for row in table.query_entities(
        "PartitionKey eq @pk", parameters={"pk": PK})}
    assert rows == {"h": 2, "new": 3}


async def test_a_refused_transaction_names_the_failing_operation_and_writes_nothing(
        table: TableClient) -> None:
    # GIVEN a stored row and its ETag
    await table.upsert_entity({"PartitionKey": PK, "RowKey": "a", "n": 1})
    etag = (await table.get_entity(PK, "a")).metadata["etag"]
    wire = TableWire(table)
    # WHEN a transaction creates a new row and then one that exists
    with pytest.raises(TransactionFailed) as exists:
        await wire.transact([Operation("create", {"PartitionKey": PK, "RowKey": "b"}),
                             Operation("create", {"PartitionKey": PK, "RowKey": "a"})])
    # THEN it fails as a conflict on operation 1, and the new row was not written
    assert (exists.value.status_code, exists.value.error_code, exists.value.index) == (
        409, "EntityAlreadyExists", 1)
    with pytest.raises(ResourceNotFoundError):
        await table.get_entity(PK, "b")
    # AND a replace with a stale ETag fails as a precondition on operation 0
    await table.upsert_entity({"PartitionKey": PK, "RowKey": "a", "n": 2})
    with pytest.raises(TransactionFailed) as stale:
        await wire.transact([Operation("replace", {"PartitionKey": PK, "RowKey": "a", "n": 3},
                                       etag=etag),
                             Operation("create", {"PartitionKey": PK, "RowKey": "c"})])
    assert (stale.value.status_code, stale.value.error_code, stale.value.index) == (
        412, "UpdateConditionNotSatisfied", 0)
    assert (await table.get_entity(PK, "a"))["n"] == 2


async def test_values_round_trip_between_the_wire_and_the_sdk(table: TableClient) -> None:
    # GIVEN an entity of every type the store writes, and some it does not
    when = datetime(2026, 11, 23, 12, 30, 45, 123456, tzinfo=UTC)
    values = {"text": "héllo \u2028 \"quoted\" 🎉", "empty": "", "yes": True, "no": False,
              "small": -(2**31), "int32_top": 2**31 - 1, "big": 2**40, "negative_big": -(2**33),
              "ratio": 0.25, "whole": 3.0, "when": when, "blob": b"\x00\xffbytes"}
    wire = TableWire(table)
    # WHEN the wire creates it, and the SDK creates the same under another key
    await wire.transact([Operation("create", {"PartitionKey": PK, "RowKey": "wire", **values})])
    await table.create_entity({"PartitionKey": PK, "RowKey": "sdk", **values,
                               "big": (2**40, "Edm.Int64"), "negative_big": (-(2**33), "Edm.Int64")})
    # THEN the SDK reads what the wire wrote as it reads what it wrote itself
    wire_view, sdk_view = await table.get_entity(PK, "wire"), await table.get_entity(PK, "sdk")
    assert dict(wire_view) == dict(sdk_view) | {"RowKey": "wire"}
    assert wire_view["text"] == values["text"] and wire_view["when"] == when
    assert wire_view["big"].value == 2**40 and wire_view["ratio"] == 0.25
    assert wire_view["yes"] is True and wire_view["blob"] == values["blob"]


async def test_special_doubles_round_trip(table: TableClient) -> None:
    # GIVEN doubles JSON cannot spell
    wire = TableWire(table)
    # WHEN the wire writes them and the SDK reads them back
    await wire.transact([Operation("create", {"PartitionKey": PK, "RowKey": "d", "nan": math.nan,
                                              "up": math.inf, "down": -math.inf})])
    row = await table.get_entity(PK, "d")
    # THEN they are what was written
    assert math.isnan(row["nan"]) and (row["up"], row["down"]) == (math.inf, -math.inf)


@pytest.mark.parametrize(("name", "value"), [("items", [1, 2]), ("huge", 2**63)])
async def test_values_a_table_cannot_hold_are_refused_before_sending(
        table: TableClient, name: str, value: object) -> None:
    # GIVEN the wire
    wire = TableWire(table)
    # WHEN an entity holds a list, or an integer past 64 bits
    with pytest.raises(TypeError, match=f"'{name}'"):
        await wire.transact([Operation("create", {"PartitionKey": PK, "RowKey": "x",
                                                  name: value})])
    # THEN nothing was written
    assert [row async for row in table.query_entities("PartitionKey eq @pk",
                                                      parameters={"pk": PK})] == []
