"""The outbound HTTP client of a worker: httpx's API (what the openai SDK takes) over aiohttp.

httpx's own connection pool spends CPU on every open connection for every request it places
(it polls each one for expiry); with a few hundred turns in flight that was a third of a worker's
CPU (benchmarks/README.md). aiohttp's pool does not. Replies are read whole (nothing here streams),
and aiohttp's errors become the httpx errors the openai SDK and our callers already handle.
"""

from __future__ import annotations

import aiohttp
import httpx2
import yarl

__all__ = ["AiohttpTransport", "http_client"]

# Accept-Encoding is left to aiohttp, which offers only the encodings it can undo.
#: Response headers that describe the wire encoding aiohttp has already undone.
_WIRE_HEADERS = {b"content-encoding", b"content-length", b"transfer-encoding"}


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """An httpx transport that sends each request with one shared `aiohttp.ClientSession`."""

    def __init__(self, *, max_connections: int = 200) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections,
                                             ssl=httpx2.create_ssl_context())
            # trust_env stays off (on, it costs two thread hops per request): with a proxy
            # variable set, `http_client` uses httpx's own transport instead of this one.
            self._session = aiohttp.ClientSession(connector=connector,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeout = request.extensions.get("timeout", {})
        body = await request.aread()
        try:
            # Encoded as given: a re-parse would undo escapes such as %3B in a conversation ID.
            async with self._client().request(
                    request.method, yarl.URL(str(request.url), encoded=True),
                    headers=[(name.decode("latin-1"), value.decode("latin-1"))
                             for name, value in request.headers.raw
                             if name.lower() != b"accept-encoding"],
                    data=body or None, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, connect=timeout.get("pool"),
                                                  sock_connect=timeout.get("connect"),
                                                  sock_read=timeout.get("read"))) as response:
                content = await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise httpx2.ConnectError(str(exc), request=request) from exc
        except aiohttp.ConnectionTimeoutError as exc:  # never sent: safe to retry any method
            raise httpx2.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx2.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientPayloadError as exc:
            raise httpx2.ReadError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx2.RemoteProtocolError(str(exc) or type(exc).__name__,
                                             request=request) from exc
        headers = [(name, value) for name, value in response.raw_headers
                   if name.lower() not in _WIRE_HEADERS]
        return httpx2.Response(response.status, headers=headers, content=content, request=request,
                               extensions={"http_version": b"HTTP/1.1",
                                           "reason_phrase": (response.reason or "").encode()})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def http_client(*, timeout: httpx2.Timeout | None = None, max_connections: int = 200,
                follow_redirects: bool = False, env_proxy: bool = False) -> httpx2.AsyncClient:
    """An httpx client on `AiohttpTransport`; with `env_proxy`, on httpx's own transport, which
    applies the environment's proxy variables (NO_PROXY included) as httpx documents."""
    if env_proxy:
        return httpx2.AsyncClient(timeout=timeout or httpx2.Timeout(10.0),
                                  follow_redirects=follow_redirects,
                                  limits=httpx2.Limits(max_connections=max_connections))
    return httpx2.AsyncClient(transport=AiohttpTransport(max_connections=max_connections),
                              timeout=timeout or httpx2.Timeout(10.0),
                              follow_redirects=follow_redirects)
