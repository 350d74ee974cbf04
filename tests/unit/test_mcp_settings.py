"""CHAT_MCP_SERVERS: one setting lists the MCP servers; every mistake stops start-up naming it."""

from __future__ import annotations

import json

import pytest

from shared.errors import SettingsError
from shared.policy import ToolPolicy, mcp_tool_policy
from shared.settings import McpServerSettings, load_settings


def servers(*entries: object, **environ: str) -> dict[str, str]:
    return {"CHAT_MCP_SERVERS": json.dumps(list(entries)), **environ}


def test_a_server_entry_is_read_with_its_headers_from_other_settings() -> None:
    # GIVEN one server whose API key header names another setting
    environ = servers({"name": "docs", "url": "https://docs.example.com/mcp",
                       "tools": ["search_docs"], "headers": {"X-Api-Key": "DOCS_MCP_KEY"},
                       "entraAudience": "api://docs", "trusted": True, "policy": "ask",
                       "toolPolicies": {"search_docs": "auto"},
                       "timeoutSeconds": 5, "refreshSeconds": 60},
                      DOCS_MCP_KEY="secret-value")
    # WHEN the settings are read
    (server,) = load_settings(environ).mcp_servers
    # THEN the header holds that setting's value, which no repr shows
    assert server.headers == (("X-Api-Key", "secret-value"),)
    assert "secret-value" not in repr(server)
    assert (server.name, server.tools, server.trusted, server.policy, server.tool_policies,
            server.entra_scope, server.timeout_seconds, server.refresh_seconds) == (
        "docs", ("search_docs",), True, ToolPolicy.ASK, (("search_docs", ToolPolicy.AUTO),),
        "api://docs/.default", 5.0, 60.0)
    assert load_settings({}).mcp_servers == ()


@pytest.mark.parametrize(("value", "reason"), [
    ("not json", "is not valid JSON"),
    ('{"name": "a"}', "must be a JSON list"),
    (json.dumps([{"name": "a", "url": "https://a.example.com/mcp"}]), 'needs "tools"'),
    (json.dumps([{"name": "a b", "url": "https://a.example.com", "tools": ["*"]}]), '"name"'),
    (json.dumps([{"name": "a", "url": "ftp://a.example.com", "tools": ["*"]}]), "http(s) URL"),
    (json.dumps([{"name": "a", "url": "http://a.example.com/mcp", "tools": ["*"]}]),
     "must be https"),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"], "tool": []}]),
     "unknown key(s) ['tool']"),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"],
                  "headers": {"Authorization": "Bearer sk-live-123"}}]),
     "never the value itself"),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"],
                  "headers": {"X-Key": "UNSET_SETTING"}}]), "UNSET_SETTING, which is not set"),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"],
                  "timeoutSeconds": 0}]), '"timeoutSeconds" must be'),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"]},
                 {"name": "a", "url": "https://b.example.com", "tools": ["*"]}]),
     "names a server twice"),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"], "trusted": "yes"}]),
     '"trusted" must be true or false'),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"], "policy": "maybe"}]),
     '"policy" must be auto, ask or never'),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"],
                  "toolPolicies": {"x": "always"}}]), "the policy of 'x' must be auto, ask or never"),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["*"],
                  "toolPolicies": ["x"]}]), '"toolPolicies" must be an object'),
    (json.dumps([{"name": "a", "url": "https://a.example.com", "tools": ["search"],
                  "toolPolicies": {"serach": "auto"}}]),
     "\"toolPolicies\" names 'serach', which \"tools\" does not allow"),
])
def test_a_bad_server_list_stops_start_up_naming_the_setting(value: str, reason: str) -> None:
    # GIVEN a CHAT_MCP_SERVERS with one mistake WHEN the settings are read
    with pytest.raises(SettingsError) as raised:
        load_settings({"CHAT_MCP_SERVERS": value})
    # THEN the error names the setting and the mistake, and never echoes a secret
    assert "CHAT_MCP_SERVERS" in str(raised.value) and reason in str(raised.value)
    assert "sk-live-123" not in str(raised.value)


def test_in_azure_an_mcp_server_must_be_https_even_on_loopback() -> None:
    # GIVEN an http loopback server, in Azure
    environ = servers({"name": "a", "url": "http://127.0.0.1:8931/mcp", "tools": ["*"]},
                      WEBSITE_SITE_NAME="app", AZURE_OPENAI_ENDPOINT="https://r.openai.azure.com",
                      AZURE_OPENAI_DEPLOYMENT="d", CLIENT_ID="bot")
    # WHEN the settings are read THEN it is refused; locally it is allowed
    with pytest.raises(SettingsError, match="must be https"):
        load_settings(environ)
    local = servers({"name": "a", "url": "http://127.0.0.1:8931/mcp", "tools": ["*"]})
    assert load_settings(local).mcp_servers[0].url == "http://127.0.0.1:8931/mcp"


def test_allow_destructive_stops_start_up_saying_how_to_migrate() -> None:
    # GIVEN a server entry written before tool policies, allowing a destructive tool
    environ = servers({"name": "tickets", "url": "https://t.example.com/mcp", "tools": ["*"],
                       "allowDestructive": ["close_ticket"]})
    # WHEN the settings are read THEN start-up stops, with the policy that does the same
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    message = str(raised.value)
    assert "CHAT_MCP_SERVERS" in message and "server 'tickets'" in message
    assert '"toolPolicies": {"close_ticket": "auto"}' in message and '"trusted"' in message
    # AND the migration it proposes is a setting that loads
    fixed = servers({"name": "tickets", "url": "https://t.example.com/mcp", "tools": ["*"],
                     "toolPolicies": {"close_ticket": "auto"}})
    assert load_settings(fixed).mcp_servers[0].tool_policies == (("close_ticket", ToolPolicy.AUTO),)


def server(**options: object) -> McpServerSettings:
    fields: dict = {"name": "s", "url": "https://s.example.com/mcp", "tools": ("*",), **options}
    return McpServerSettings(**fields)


#: (readOnlyHint, destructiveHint) of a read-only tool, an additive one, a destructive one, and
#: one that says nothing (MCP's defaults: may write, destructively).
READ_ONLY, ADDITIVE, DESTRUCTIVE, SILENT = (True, None), (False, False), (False, True), (None, None)


@pytest.mark.parametrize(("options", "hints", "expected"), [
    # an untrusted server: its annotations count for nothing
    ({}, READ_ONLY, ToolPolicy.ASK),
    ({}, ADDITIVE, ToolPolicy.ASK),
    ({}, SILENT, ToolPolicy.ASK),
    # a trusted server: read-only and non-destructive tools run, the others ask
    ({"trusted": True}, READ_ONLY, ToolPolicy.AUTO),
    ({"trusted": True}, ADDITIVE, ToolPolicy.AUTO),
    ({"trusted": True}, DESTRUCTIVE, ToolPolicy.ASK),
    ({"trusted": True}, SILENT, ToolPolicy.ASK),
    # the configuration wins over the annotations: the server's policy, then the tool's
    ({"policy": ToolPolicy.AUTO}, DESTRUCTIVE, ToolPolicy.AUTO),
    ({"trusted": True, "policy": ToolPolicy.ASK}, READ_ONLY, ToolPolicy.ASK),
    ({"policy": ToolPolicy.ASK, "tool_policies": (("t", ToolPolicy.NEVER),)}, READ_ONLY,
     ToolPolicy.NEVER),
    ({"tool_policies": (("t", ToolPolicy.AUTO),)}, DESTRUCTIVE, ToolPolicy.AUTO),
    ({"tool_policies": (("other", ToolPolicy.AUTO),)}, READ_ONLY, ToolPolicy.ASK),
    # the allow-list first: a tool it leaves out has no policy at all
    ({"tools": ("other",), "policy": ToolPolicy.AUTO}, READ_ONLY, None),
])
def test_a_tools_policy_comes_from_the_configuration_then_a_trusted_servers_annotations(
        options: dict, hints: tuple[bool | None, bool | None], expected: ToolPolicy | None) -> None:
    # GIVEN a server configured so, and a tool "t" annotated so
    # WHEN its policy is decided THEN it is the expected one
    read_only, destructive = hints
    assert mcp_tool_policy(server(**options), "t", read_only=read_only,
                           destructive=destructive) is expected
