"""Settings of tools that act as the user: `asUser` on an MCP server, the token service's URL, and
the federated credential values docs/deploy.md's steps print."""

from __future__ import annotations

import json

import pytest

from devtools.signin_setup import token_store_subject
from shared.errors import SettingsError
from shared.settings import UserAccess, load_settings


def servers(**entry: object) -> dict[str, str]:
    return {"CHAT_MCP_SERVERS": json.dumps([{"name": "me", "url": "https://mcp.example/mcp",
                                             "tools": ["*"], **entry}])}


def test_as_user_names_a_connection_and_an_audience_exchanged_on_behalf_of() -> None:
    # GIVEN a server acting as the user, with an Entra audience, and the sign-in app
    settings = load_settings({**servers(asUser={"connection": "sso",
                                                "audience": "api://tickets"}),
                              "CHAT_SIGNIN_APP_ID": "sso-app"})
    # WHEN it is read THEN the access names the connection and the audience's .default scope
    assert settings.mcp_servers[0].as_user == UserAccess(connection="sso",
                                                         scope="api://tickets/.default")
    assert settings.signin.app_id == "sso-app"
    # AND without an audience, the connection's token goes as it is
    plain = load_settings(servers(asUser={"connection": "github"}))
    assert plain.mcp_servers[0].as_user == UserAccess(connection="github")


@pytest.mark.parametrize(("as_user", "environment", "said"), [
    ({"connection": "sso", "audience": "api://tickets"}, {}, "needs CHAT_SIGNIN_APP_ID"),
    ({"audience": "api://tickets"}, {}, "needs a \"connection\""),
    ({"connection": "sso", "scopes": ["x"]}, {}, "must be {\"connection\""),
    ({"connection": "bad/name"}, {}, "needs a \"connection\""),
    ("sso", {}, "must be {\"connection\""),
])
def test_a_wrong_as_user_stops_start_up_naming_what_is_wrong(
        as_user: object, environment: dict[str, str], said: str) -> None:
    # GIVEN a server whose asUser is wrong WHEN settings load THEN the error says what to fix
    with pytest.raises(SettingsError, match="CHAT_MCP_SERVERS") as caught:
        load_settings({**servers(asUser=as_user), **environment})
    assert said in str(caught.value)


def test_the_token_service_url_is_https_or_a_local_stand_in() -> None:
    # GIVEN the default, a regional service, and a loopback stand-in
    assert load_settings({}).signin.token_service_url == "https://token.botframework.com"
    europe = load_settings({"CHAT_TOKEN_SERVICE_URL": "https://europe.token.botframework.com/"})
    assert europe.signin.token_service_url == "https://europe.token.botframework.com"
    assert load_settings({"CHAT_TOKEN_SERVICE_URL": "http://127.0.0.1:8932"}).signin
    # WHEN it is plain http elsewhere, or in Azure THEN start-up stops naming the setting
    for environment in ({"CHAT_TOKEN_SERVICE_URL": "http://token.example"},
                        {"CHAT_TOKEN_SERVICE_URL": "http://127.0.0.1:8932",
                         "WEBSITE_SITE_NAME": "app", "AZURE_OPENAI_ENDPOINT": "https://o",
                         "AZURE_OPENAI_DEPLOYMENT": "d"}):
        with pytest.raises(SettingsError, match="CHAT_TOKEN_SERVICE_URL"):
            load_settings(environment)


def test_the_token_store_subject_encodes_guids_as_entra_does() -> None:
    # GIVEN the tenant whose encoding Microsoft's docs show (v4j5cvGGr0GRqy180BHbRw)
    # WHEN the token store's subject is made THEN it is the documented form
    assert token_store_subject("72f988bf-86f1-41af-91ab-2d7cd011db47", "chatstate-sso") == \
        "/eid1/c/pub/t/v4j5cvGGr0GRqy180BHbRw/a/9ExAW52n_ky4ZiS_jhpJIQ/chatstate-sso"
