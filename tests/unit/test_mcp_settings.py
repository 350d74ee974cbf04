"""CHAT_MCP_SERVERS: one setting lists the MCP servers; every mistake stops start-up naming it."""

from __future__ import annotations

import json

import pytest

from shared.errors import SettingsError
from shared.settings import load_settings


def servers(*entries: object, **environ: str) -> dict[str, str]:
    return {"CHAT_MCP_SERVERS": json.dumps(list(entries)), **environ}


def test_a_server_entry_is_read_with_its_headers_from_other_settings() -> None:
    # GIVEN one server whose API key header names another setting
    environ = servers({"name": "docs", "url": "https://docs.example.com/mcp",
                       "tools": ["search_docs"], "headers": {"X-Api-Key": "DOCS_MCP_KEY"},
                       "entraAudience": "api://docs", "allowDestructive": ["purge"],
                       "timeoutSeconds": 5, "refreshSeconds": 60},
                      DOCS_MCP_KEY="secret-value")
    # WHEN the settings are read
    (server,) = load_settings(environ).mcp_servers
    # THEN the header holds that setting's value, which no repr shows
    assert server.headers == (("X-Api-Key", "secret-value"),)
    assert "secret-value" not in repr(server)
    assert (server.name, server.tools, server.allow_destructive, server.entra_scope,
            server.timeout_seconds, server.refresh_seconds) == (
        "docs", ("search_docs",), ("purge",), "api://docs/.default", 5.0, 60.0)
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
