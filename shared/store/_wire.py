"""The entity-group transaction built by hand, lighter on CPU than the SDK's (benchmarks/README.md).

`TableClient.submit_transaction` builds the multipart body and parses the answer with the `email`
package; here they are plain strings, sent through the Tables SDK's own pipeline (its signing,
retries and transport) and raising azure-core exceptions, which `_table_base.py` translates
(`_translated`). A commit takes 1.1 ms of client CPU (`store_calls` in benchmarks/results.json;
benchmarks/README.md has the history). Every other storage request goes through `TableClient`
itself.

The body is the one the SDK sends (tests/integration/test_wire.py compares them line by line, with boundaries
and dates set aside); entities are JSON with OData type annotations where JSON alone would be
ambiguous (Int64, DateTime, Double).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from azure.core.exceptions import HttpResponseError
from azure.core.rest import AsyncHttpResponse, HttpRequest
from azure.data.tables.aio import TableClient

__all__ = ["Operation", "TableWire", "TransactionFailed"]

OperationKind = Literal["create", "replace", "merge", "delete"]

_API_VERSION = "2019-02-02"
_JSON = "application/json"
_MINIMAL = "application/json;odata=minimalmetadata"
_INT32 = range(-(2**31), 2**31)
_INT64 = range(-(2**63), 2**63)
_SPECIAL_DOUBLES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3})", re.MULTILINE)

@dataclass(frozen=True, slots=True)
class Operation:
    """One write of an entity-group transaction. `etag` None: create; "*": unconditional."""

    kind: OperationKind
    entity: Mapping[str, Any]
    etag: str | None = None


class TransactionFailed(HttpResponseError):
    """An entity-group transaction was refused; nothing of it was written.

    `status_code` and `error_code` are those of the operation that failed (`index`, when the
    service names it), not of the envelope.
    """

    def __init__(self, message: str, *, status_code: int, error_code: str | None,
                 index: int | None, response: AsyncHttpResponse) -> None:
        super().__init__(message=message, response=response)
        self.status_code = status_code
        self.error_code = error_code
        self.index = index


class TableWire:
    """Entity-group transactions on one table, over `table`'s pipeline (credential, retries)."""

    def __init__(self, table: TableClient) -> None:
        self._table = table
        account = urlsplit(table.url)
        self._account_url = f"{account.scheme}://{account.netloc}{account.path.rstrip('/')}"
        self._sas = account.query
        self._table_path = quote(table.table_name)

    async def _send(self, request: HttpRequest) -> AsyncHttpResponse:
        # `TableClient._client` is the generated client: `send_request` runs the SDK's pipeline.
        # Streamed, so that its content-decoding policy leaves the body alone; read here.
        response: AsyncHttpResponse = await self._table._client.send_request(request, stream=True)
        await response.read()
        return response

    def _url(self, path: str, query: str = "") -> str:
        query = "&".join(part for part in (query, self._sas) if part)
        return f"{self._account_url}/{path}" + (f"?{query}" if query else "")

    def _entity_url(self, partition_key: str, row_key: str) -> str:
        keys = (f"(PartitionKey='{quote(partition_key.replace(chr(39), chr(39) * 2), safe='')}',"
                f"RowKey='{quote(row_key.replace(chr(39), chr(39) * 2), safe='')}')")
        return self._url(self._table_path + keys)

    # -- entity-group transaction --------------------------------------------------------------

    async def transact(self, operations: Sequence[Operation]) -> None:
        """Apply every operation or none (one partition, at most 100 operations)."""
        batch, changeset = f"batch_{uuid.uuid4()}", f"changeset_{uuid.uuid4()}"
        body = self.transaction_body(operations, batch=batch, changeset=changeset)
        request = HttpRequest("POST", self._url("$batch"), headers={
            "x-ms-version": _API_VERSION, "DataServiceVersion": "3.0",
            "MaxDataServiceVersion": "3.0;NetFx",
            "Content-Type": f"multipart/mixed; boundary={batch}", "Accept": _JSON,
        }, content=body)
        response = await self._send(request)
        if response.status_code != 202:
            raise _error(response)
        _check_parts(response)

    def transaction_body(self, operations: Sequence[Operation], *, batch: str,
                         changeset: str) -> bytes:
        date = formatdate(usegmt=True)
        lines = [f"--{batch}", f"Content-Type: multipart/mixed; boundary={changeset}", ""]
        for index, operation in enumerate(operations):
            lines += [f"--{changeset}", "Content-Type: application/http",
                      "Content-Transfer-Encoding: binary", f"Content-ID: {index}", ""]
            lines += self._operation_lines(operation, date)
        lines += [f"--{changeset}--", "", f"--{batch}--", ""]
        return "\r\n".join(lines).encode()

    def _operation_lines(self, operation: Operation, date: str) -> list[str]:
        entity = operation.entity
        common = [f"x-ms-version: {_API_VERSION}", "DataServiceVersion: 3.0"]
        stamps = [f"x-ms-date: {date}", f"Date: {date}"]
        if operation.kind == "delete":
            url = self._entity_url(entity["PartitionKey"], entity["RowKey"])
            return [f"DELETE {url} HTTP/1.1", *common, f"Accept: {_MINIMAL}",
                    f"If-Match: {operation.etag or '*'}", *stamps, "", ""]
        body = json.dumps(to_json(entity))
        if operation.kind == "create":
            return [f"POST {self._url(self._table_path)} HTTP/1.1", f"Content-Type: {_JSON}",
                    f"Content-Length: {len(body)}", *common, f"Accept: {_MINIMAL}",
                    "Prefer: return-no-content", *stamps, "", body]
        method = "PUT" if operation.kind == "replace" else "PATCH"
        url = self._entity_url(entity["PartitionKey"], entity["RowKey"])
        return [f"{method} {url} HTTP/1.1", f"Content-Type: {_JSON}",
                f"Content-Length: {len(body)}", *common, f"Accept: {_JSON}",
                f"If-Match: {operation.etag or '*'}", *stamps, "", body]


def _check_parts(response: AsyncHttpResponse) -> None:
    """Raise `TransactionFailed` for the first operation the service answered with an error."""
    content = response.content
    for match in _STATUS_LINE.finditer(content):
        status = int(match.group(1))
        if 200 <= status < 300:
            continue
        part = content[match.start():]
        head, _, rest = part.partition(b"\r\n\r\n")
        code, message = _error_details(rest.split(b"\r\n--", 1)[0], headers=head)
        index = None
        if (prefix := re.match(r"(\d+):", message)) is not None:
            index = int(prefix.group(1))
        raise TransactionFailed(f"({code}) {message}".strip(), status_code=status,
                                error_code=code, index=index, response=response)


def _error_details(body: bytes, *, headers: bytes = b"") -> tuple[str | None, str]:
    """The service's error code and message from an OData error body (or error headers)."""
    code: str | None = None
    message = ""
    try:
        error = json.loads(body)["odata.error"]
        code = error.get("code")
        message = str((error.get("message") or {}).get("value", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        message = body.decode("utf-8", "replace").strip()
    if code is None and (found := re.search(rb"(?im)^x-ms-error-code:\s*(\S+)", headers)):
        code = found.group(1).decode()
    return code, message


def _error(response: AsyncHttpResponse) -> TransactionFailed:
    code, message = _error_details(response.content)
    code = code or response.headers.get("x-ms-error-code")
    text = f"({code}) {message}".strip() if code else message or response.reason or "request failed"
    return TransactionFailed(text, status_code=response.status_code, error_code=code, index=None,
                             response=response)


# -- entities as JSON --------------------------------------------------------------------------


def to_json(entity: Mapping[str, Any]) -> dict[str, Any]:
    """`entity` as the service's JSON: str, bool, int, float, datetime and bytes values."""
    out: dict[str, Any] = {}
    for name, value in entity.items():
        if value is None:
            continue
        if isinstance(value, bool | str):
            out[name] = value
        elif isinstance(value, int):
            if value in _INT32:
                out[name] = value
            elif value in _INT64:
                out[name], out[f"{name}@odata.type"] = str(value), "Edm.Int64"
            else:
                raise TypeError(f"property {name!r}: {value} does not fit in 64 bits")
        elif isinstance(value, float):
            # JSON has no NaN or infinities: the service takes them as strings.
            special = _SPECIAL_DOUBLES.get(repr(value))
            out[name], out[f"{name}@odata.type"] = special or value, "Edm.Double"
        elif isinstance(value, datetime):
            out[name], out[f"{name}@odata.type"] = _datetime_text(value), "Edm.DateTime"
        elif isinstance(value, bytes):
            out[name], out[f"{name}@odata.type"] = base64.b64encode(value).decode(), "Edm.Binary"
        else:
            raise TypeError(f"property {name!r}: a table cannot store {type(value).__name__}")
    return out


def _datetime_text(value: datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
