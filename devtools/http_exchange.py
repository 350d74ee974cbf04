"""The Functions host's conversions between an HTTP exchange and the worker's `RpcHttp`.

Request to the worker (the host's rules, which `azure.functions`' own converter then reads):
- header names lower-cased; a repeated header is one value, joined with `,`; an empty one is left out;
- query keys case-insensitive; a repeated key is one value, joined with `,`; an empty value is left out;
- `url` as sent: still percent-escaped, with the query string;
- route parameters from routing (`devtools.routes`: `%2F` stays literal, other escapes decoded);
- the body as bytes, except a chunked request's, which arrives empty (a known host limit).

Response from the worker: its status and headers; each cookie the converter took out of the
`Set-Cookie` headers becomes its own `Set-Cookie` again; a plain string or bytes return is a 200.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import unquote_plus

from devtools import rpc


def request_data(*, method: str, scheme: str, host: str, raw_path: str, query_string: str,
                 headers: Iterable[tuple[str, str]], route_params: dict[str, str],
                 body: bytes) -> rpc.TypedData:
    """The HTTP trigger's value, as the host sends it in an InvocationRequest."""
    joined = _joined(headers)
    chunked = "chunked" in joined.get("transfer-encoding", "").lower()
    url = f"{scheme}://{host}{raw_path}" + (f"?{query_string}" if query_string else "")
    return rpc.TypedData(http=rpc.RpcHttp(
        method=method, url=url, headers=joined, query=query(query_string), params=route_params,
        body=None if chunked or not body else rpc.TypedData(bytes=body)))


def query(query_string: str) -> dict[str, str]:
    """ASP.NET Core's query collection as the host hands it over: joined, empties dropped."""
    pairs = []
    for item in query_string.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        pairs.append((unquote_plus(key), unquote_plus(value)))
    return _joined(pairs)


def response_parts(value: rpc.TypedData | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of the HTTP response for the function's return value."""
    kind = value.WhichOneof("data") if value is not None else None
    if value is None or kind is None:
        return 204, [], b""
    if kind != "http":
        return 200, [], _bytes(getattr(value, kind))
    http: rpc.RpcHttp = value.http
    headers = [(name, str(header)) for name, header in http.headers.items()]
    headers += [("set-cookie", set_cookie(cookie)) for cookie in http.cookies]
    body = http.body
    content = b"" if body is None or body.WhichOneof("data") is None else _bytes(getattr(body, body.WhichOneof("data")))
    return int(http.status_code or 200), headers, content


def set_cookie(cookie: rpc.RpcHttpCookie) -> str:
    """One `Set-Cookie` value, attributes in ASP.NET Core's order (it writes the host's cookies)."""
    parts = [f"{cookie.name}={cookie.value}"]
    if cookie.expires is not None:
        when = datetime.fromtimestamp(cookie.expires.value.seconds, tz=UTC)
        parts.append(f"expires={format_datetime(when, usegmt=True)}")
    if cookie.max_age is not None:
        parts.append(f"max-age={int(cookie.max_age.value)}")
    if cookie.domain is not None and cookie.domain.value:
        parts.append(f"domain={cookie.domain.value}")
    parts.append(f"path={cookie.path.value if cookie.path is not None and cookie.path.value else '/'}")
    if cookie.secure is not None and cookie.secure.value:
        parts.append("secure")
    same_site = {rpc.RpcHttpCookie.SameSite.Lax: "lax", rpc.RpcHttpCookie.SameSite.Strict: "strict",
                 rpc.RpcHttpCookie.SameSite.ExplicitNone: "none"}.get(cookie.same_site or 0)
    if same_site:
        parts.append(f"samesite={same_site}")
    if cookie.http_only is not None and cookie.http_only.value:
        parts.append("httponly")
    return "; ".join(parts)


def _joined(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Values of one name (case-insensitive; lower-cased for headers by the caller) joined with ','."""
    grouped: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for name, value in pairs:
        key = names.setdefault(name.lower(), name)
        grouped.setdefault(key, []).append(value)
    joined = {name: ",".join(values) for name, values in grouped.items()}
    return {name: value for name, value in joined.items() if value}


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")
