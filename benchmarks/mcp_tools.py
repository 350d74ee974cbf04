"""What tools from an MCP server add to a turn: discovery once, then nothing per turn.

`python -m benchmarks.run --only mcp_tools`. In this process: the real `ChatPrompt` over the real
openai SDK against the local model stand-in (latency 0, plain answers), with and without the demo
MCP server (devtools/mcp_server.py, the `mcp` SDK over real HTTP on loopback) as a tool source.
Turns alternate, one without MCP then one with, TURNS pairs; the figure is the median of the
paired differences of wall time (the turn overhead of MCP tools once cached), beside the first
turn's discovery, the discoveries the measured turns made (goal: 0), the CPU of the cached lookup
(`ChatPrompt.current_tools`) and one tool call's round trip to the server.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from devtools.fake_model import FakeModelServer
from devtools.mcp_server import DemoMcpServer
from shared.mcp import McpTools
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import McpServerSettings, load_settings
from shared.tools import tool

from .common import code_version, machine, median, now_iso, p90

TURNS = 300
WARMUP = 20
CALLS = 100
LOOKUPS = 20_000


@tool
async def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


async def run(connection_string: str) -> dict[str, Any]:
    for noisy in ("httpx2", "mcp", "uvicorn"):  # a line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model_server = FakeModelServer()
    await model_server.start()
    mcp_server = await DemoMcpServer().start()
    model = build_model(load_settings({"OPENAI_BASE_URL": model_server.base_url,
                                       "OPENAI_MODEL": "bench"}).model)
    tools = McpTools([McpServerSettings(name="demo", url=mcp_server.url, tools=("*",))])
    try:
        plain = ChatPrompt(model, functions=[add])
        with_mcp = ChatPrompt(model, functions=[add], tool_sources=[tools])
        started = time.perf_counter()
        await with_mcp.send("first turn: discovers the tools")
        first_ms = (time.perf_counter() - started) * 1000
        for index in range(WARMUP):
            await plain.send(f"warm {index}")
            await with_mcp.send(f"warm {index}")
        discoveries_before = tools.servers[0].discoveries
        differences, without_ms, with_ms = [], [], []
        for index in range(TURNS):
            started = time.perf_counter()
            await plain.send(f"turn {index}")
            middle = time.perf_counter()
            await with_mcp.send(f"turn {index}")
            ended = time.perf_counter()
            without_ms.append((middle - started) * 1000)
            with_ms.append((ended - middle) * 1000)
            differences.append(with_ms[-1] - without_ms[-1])
        discoveries = tools.servers[0].discoveries - discoveries_before
        started = time.perf_counter()
        for _ in range(LOOKUPS):
            await with_mcp.current_tools()
        lookup_us = (time.perf_counter() - started) / LOOKUPS * 1e6
        call_ms = []
        for index in range(CALLS):
            started = time.perf_counter()
            await tools.servers[0].call("search_docs", {"query": f"streaming {index}"})
            call_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await tools.close()
        await model.close()
        await mcp_server.stop()
        await model_server.stop()
    section = {
        "measured_at": now_iso(), "code": code_version(), "machine": machine(),
        "turns": TURNS,
        "first_turn_with_discovery_ms": round(first_ms, 1),
        "turn_ms_without_mcp_p50": round(median(without_ms), 2),
        "turn_ms_with_mcp_p50": round(median(with_ms), 2),
        "overhead_ms_per_turn_p50": round(median(differences), 3),
        "discoveries_in_measured_turns": discoveries,
        "cached_lookup_us": round(lookup_us, 2),
        "tool_call_ms_p50": round(median(call_ms), 2),
        "tool_call_ms_p90": round(p90(call_ms), 2),
    }
    print(f"\nMCP tools ({TURNS} turn pairs, the demo server on loopback, model latency 0)")
    print(f"  first turn, with discovery       {first_ms:8.1f} ms")
    print(f"  turn without MCP tools (p50)     {section['turn_ms_without_mcp_p50']:8.2f} ms")
    print(f"  turn with MCP tools cached (p50) {section['turn_ms_with_mcp_p50']:8.2f} ms")
    print(f"  overhead per turn (median of paired differences) "
          f"{section['overhead_ms_per_turn_p50']:.3f} ms")
    print(f"  discoveries during the measured turns: {discoveries} (goal 0)")
    print(f"  cached tool lookup per turn      {lookup_us:8.2f} µs")
    print(f"  one tool call to the server p50 / p90  {section['tool_call_ms_p50']:.2f} / "
          f"{section['tool_call_ms_p90']:.2f} ms")
    return section
