"""Fixtures of the tool tests: the model stand-in and the demo MCP server, each on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devtools.fake_model import FakeModelServer
from devtools.mcp_server import DemoMcpServer


@pytest.fixture
async def model_server() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer() as running:
        yield running


@pytest.fixture
async def mcp_server() -> AsyncIterator[DemoMcpServer]:
    server = await DemoMcpServer().start()
    try:
        yield server
    finally:
        await server.stop()
