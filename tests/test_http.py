"""The outbound HTTP client (httpx's API over aiohttp) against local servers."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator

import httpx2
import pytest
from aiohttp import web

from shared.http import http_client


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"method": request.method, "body": body.decode(),
                                  "header": request.headers.get("x-test")}, status=201)

    async def compressed(request: web.Request) -> web.Response:
        payload = json.dumps({"text": "hello " * 200}).encode()
        return web.Response(body=gzip.compress(payload), content_type="application/json",
                            headers={"Content-Encoding": "gzip"})

    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response()

    async def refusing(request: web.Request) -> web.Response:
        return web.Response(status=503, reason="Busy Now", text="try later")

    async def path(request: web.Request) -> web.Response:
        return web.Response(text=request.raw_path)

    app = web.Application()
    app.router.add_get("/v3/conversations/{rest:.*}", path)
    app.router.add_post("/echo", echo)
    app.router.add_get("/gzip", compressed)
    app.router.add_get("/silent", silent)
    app.router.add_get("/busy", refusing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_request_and_its_answer_pass_through_intact(server: str) -> None:
    # GIVEN the client
    async with http_client() as client:
        # WHEN it posts JSON with a header of its own
        response = await client.post(f"{server}/echo", json={"a": "é"}, headers={"x-test": "yes"})
    # THEN the server saw the body and header, and the status and JSON come back
    assert response.status_code == 201
    assert response.json() == {"method": "POST", "body": '{"a":"é"}', "header": "yes"}


async def test_a_compressed_answer_is_decoded_once(server: str) -> None:
    # GIVEN a server answering with a gzip body
    async with http_client() as client:
        # WHEN it is fetched
        response = await client.get(f"{server}/gzip")
    # THEN the JSON reads as sent, and no header claims an encoding still to undo
    assert response.json() == {"text": "hello " * 200}
    assert "content-encoding" not in response.headers


async def test_an_error_status_keeps_its_reason_and_body(server: str) -> None:
    async with http_client() as client:
        response = await client.get(f"{server}/busy")
    assert (response.status_code, response.reason_phrase, response.text) == (
        503, "Busy Now", "try later")


async def test_failures_become_httpx_errors(server: str) -> None:
    # GIVEN a port where nothing listens, and a server that never answers
    async with http_client(timeout=httpx2.Timeout(0.3)) as client:
        # WHEN each is called
        # THEN the refusal is a connect error, and the silence a read timeout
        with pytest.raises(httpx2.ConnectError):
            await client.get("http://127.0.0.1:9/")
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(f"{server}/silent")


async def test_an_escaped_path_is_sent_as_given(server: str) -> None:
    # GIVEN a Teams thread ID escaped into a path segment, as the connector writes it
    escaped = "19%3Aabc%40thread.skype%3Bmessageid%3D123"
    async with http_client() as client:
        # WHEN it is requested
        response = await client.get(f"{server}/v3/conversations/{escaped}/activities")
    # THEN the server sees the escapes, not the characters they stand for
    assert response.text == f"/v3/conversations/{escaped}/activities"


async def test_proxy_variables_are_honoured_only_when_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a local "proxy" that answers every request itself, named by HTTP_PROXY
    async def proxy(request: web.Request) -> web.Response:
        return web.Response(text=f"via proxy: {request.url}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    try:
        # WHEN a client asked to honour them fetches a host that does not exist
        async with http_client(env_proxy=True) as client:
            response = await client.get("http://chatstate.invalid/x")
        # THEN the proxy answered it
        assert response.text == "via proxy: http://chatstate.invalid/x"
        # AND a client not asked to goes direct, and cannot reach that host
        async with http_client() as client:
            with pytest.raises(httpx2.ConnectError):
                await client.get("http://chatstate.invalid/x")
    finally:
        await runner.cleanup()
