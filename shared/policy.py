"""Whether a tool call runs by itself, waits for a person's approval, or never runs.

Every tool has a policy: `auto` (runs when the model calls it), `ask` (the turn pauses and a
person approves or denies the exact call: `shared/pause.py`, `shared/approval_card.py`) or
`never` (not offered to the model, refused if called). A `@tool` function declares its own
(`@tool(policy="ask")`, default `auto`: the code is ours). An MCP server's tools get theirs from
CHAT_MCP_SERVERS, in this order:

    "toolPolicies": {"<tool>": "..."}   the tool by name
    "policy": "..."                     every tool of that server
    "trusted": true                     the server's own annotations: read-only
                                        (`readOnlyHint`) or non-destructive (`destructiveHint:
                                        false`) tools are auto, every other tool asks
    otherwise                           ask

A server that is not marked trusted is not believed: its `readOnlyHint` counts for nothing, as
the MCP specification says of annotations from an untrusted server. `mcp_tool_policy` decides;
the discovery (`shared/mcp.py`) and the call (`Function.invoke`) both rely on it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import McpServerSettings

__all__ = ["ToolPolicy", "mcp_tool_policy"]


class ToolPolicy(StrEnum):
    AUTO = "auto"
    ASK = "ask"
    NEVER = "never"


def mcp_tool_policy(server: McpServerSettings, tool: str, *, read_only: bool | None,
                    destructive: bool | None) -> ToolPolicy | None:
    """The policy of `tool` on `server`; None when the server's allow-list (`tools`) leaves it out.

    `read_only` and `destructive` are the server's annotations (None: not given); they count
    only when the server is trusted. MCP's defaults: a tool may write (`readOnlyHint` false) and
    destroy (`destructiveHint` true) unless it says otherwise."""
    if "*" not in server.tools and tool not in server.tools:
        return None
    named = dict(server.tool_policies).get(tool)
    if named is not None:
        return named
    if server.policy is not None:
        return server.policy
    if server.trusted and (read_only is True or destructive is False):
        return ToolPolicy.AUTO
    return ToolPolicy.ASK
