"""The settings module: defaults, validation that names the setting, model selection."""

from __future__ import annotations

import pytest

from shared.errors import SettingsError
from shared.settings import SETTINGS, ModelProvider, Setting, load_settings, unknown_settings


def test_defaults_run_locally_on_azurite_and_the_offline_stand_in() -> None:
    settings = load_settings({})
    assert settings.storage.connection_string == "UseDevelopmentStorage=true"
    assert settings.storage.table_name == "conversations"
    assert settings.model.provider is ModelProvider.OFFLINE
    assert settings.bot.auth_enabled is False and settings.in_azure is False
    assert settings.model.history_token_budget == 8000 and settings.port == 7071


@pytest.mark.parametrize(("env", "named"), [
    ({"CHAT_HISTORY_TOKEN_BUDGET": "lots"}, "CHAT_HISTORY_TOKEN_BUDGET"),
    ({"CHAT_HISTORY_TOKEN_BUDGET": "3"}, "CHAT_HISTORY_TOKEN_BUDGET"),
    ({"CHAT_MODEL_TIMEOUT_SECONDS": "-1"}, "CHAT_MODEL_TIMEOUT_SECONDS"),
    ({"CHAT_TABLE_NAME": "no-dashes"}, "CHAT_TABLE_NAME"),
    ({"CHAT_STORAGE_TABLE_ENDPOINT": "not a url"}, "CHAT_STORAGE_TABLE_ENDPOINT"),
    ({"CHAT_STORAGE_CONNECTION_STRING": "garbage"}, "CHAT_STORAGE_CONNECTION_STRING"),
    ({"AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com"}, "AZURE_OPENAI_DEPLOYMENT"),
    ({"AZURE_OPENAI_DEPLOYMENT": "d"}, "AZURE_OPENAI_ENDPOINT"),
    ({"OPENAI_MODEL": "gpt-4o"}, "OPENAI_API_KEY"),
    ({"BOT_APP_TYPE": "Sideways"}, "BOT_APP_TYPE"),
    ({"BOT_APP_TYPE": "SingleTenant", "CLIENT_ID": "x"}, "TENANT_ID"),
    ({"WEBSITE_SITE_NAME": "my-app"}, "AZURE_OPENAI_ENDPOINT"),
    ({"PORT": "70000"}, "PORT"),
    ({"BOT_SERVICE_URL_HOSTS": "https://smba.trafficmanager.net"}, "BOT_SERVICE_URL_HOSTS"),
    ({"BOT_SERVICE_URL_HOSTS": "smba.trafficmanager.net:443"}, "BOT_SERVICE_URL_HOSTS"),
    ({"BOT_SERVICE_URL_HOSTS": "*.net"}, "BOT_SERVICE_URL_HOSTS"),
    ({"BOT_SERVICE_URL_HOSTS": "*"}, "BOT_SERVICE_URL_HOSTS"),
    ({"BOT_SERVICE_URL_HOSTS": " , "}, "BOT_SERVICE_URL_HOSTS"),
])
def test_a_bad_setting_fails_start_up_with_its_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert caught.value.setting == named and named in str(caught.value)


def test_service_url_hosts_default_to_the_public_clouds_and_can_be_replaced() -> None:
    # GIVEN no setting, then a sovereign cloud's hosts
    # THEN the public cloud's Bot Connector hosts, then exactly the given ones, lower case
    assert load_settings({}).bot.service_url_hosts == (
        "smba.trafficmanager.net", "smba.infra.gcc.teams.microsoft.com", "*.botframework.com")
    gcc_high = load_settings({"BOT_SERVICE_URL_HOSTS":
                              "SMBA.infra.gov.teams.microsoft.us, *.botframework.azure.us"})
    assert gcc_high.bot.service_url_hosts == ("smba.infra.gov.teams.microsoft.us",
                                              "*.botframework.azure.us")


def test_any_model_setting_turns_the_offline_stand_in_off() -> None:
    assert load_settings({"OPENAI_API_KEY": "sk-x"}).model.provider is ModelProvider.OPENAI
    local = load_settings({"OPENAI_BASE_URL": "http://localhost:11434/v1", "OPENAI_MODEL": "llama3.2"})
    assert local.model.provider is ModelProvider.OPENAI and local.model.model == "llama3.2"
    azure = load_settings({"AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com",
                           "AZURE_OPENAI_DEPLOYMENT": "chat", "WEBSITE_SITE_NAME": "app"})
    assert azure.model.provider is ModelProvider.AZURE and azure.in_azure


def test_blank_values_count_as_unset() -> None:
    assert load_settings({"OPENAI_API_KEY": "  ", "CHAT_TABLE_NAME": ""}).model.provider is ModelProvider.OFFLINE


def test_every_setting_is_described() -> None:
    names = [setting.name for setting in SETTINGS]
    assert len(names) == len(set(names))
    assert all(setting.description for setting in SETTINGS)


def test_the_sample_local_settings_run_offline() -> None:
    import json
    from pathlib import Path

    sample = json.loads((Path(__file__).parents[2] / "local.settings.sample.json").read_text())
    settings = load_settings(sample["Values"])
    assert settings.model.provider is ModelProvider.OFFLINE and not settings.bot.auth_enabled


def test_the_readme_documents_every_setting() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert [s.name for s in SETTINGS if f"| `{s.name}` |" not in readme] == []


def test_a_proxy_variable_makes_storage_honour_the_environment_proxies() -> None:
    # GIVEN no proxy, then HTTPS_PROXY, then HTTP_PROXY
    # THEN only a given proxy makes the storage transport look proxies up
    assert load_settings({}).env_proxy is False
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy"):
        assert load_settings({name: "http://proxy:3128"}).env_proxy is True, name


def test_summary_settings_default_on_with_the_chat_model() -> None:
    # GIVEN a model and no summary settings
    # WHEN the settings are read
    settings = load_settings({"OPENAI_API_KEY": "sk-x", "OPENAI_MODEL": "gpt-4o"})
    # THEN summaries are on, written by the chat model, within 1,000 tokens
    assert settings.summary.enabled and settings.summary.model == "gpt-4o"
    assert settings.summary.token_budget == 1000
    # AND a summary model and off are honoured
    other = load_settings({"OPENAI_API_KEY": "sk-x", "CHAT_SUMMARY": "OFF",
                           "CHAT_SUMMARY_MODEL": "gpt-4o-mini"})
    assert not other.summary.enabled and other.summary.model == "gpt-4o-mini"


def test_a_bad_summary_setting_is_named() -> None:
    # GIVEN a summary switch that is neither on nor off, and a budget out of range
    # WHEN the settings are read
    # THEN the error names the setting
    with pytest.raises(SettingsError, match="CHAT_SUMMARY"):
        load_settings({"CHAT_SUMMARY": "maybe"})
    with pytest.raises(SettingsError, match="CHAT_SUMMARY_TOKEN_BUDGET"):
        load_settings({"CHAT_SUMMARY_TOKEN_BUDGET": "10"})


# --- mistyped names ----------------------------------------------------------------------------


@pytest.mark.parametrize(("typo", "meant"), [
    ("OPENAI_BASEURL", "OPENAI_BASE_URL"),
    ("CHAT_HISTORY_TOKEN_BUGDET", "CHAT_HISTORY_TOKEN_BUDGET"),
    ("AZURE_OPENAI_DEPLOYMNET", "AZURE_OPENAI_DEPLOYMENT"),
    ("BOT_APPTYPE", "BOT_APP_TYPE"),
])
def test_a_mistyped_setting_is_warned_about_naming_the_real_one(
        typo: str, meant: str, caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN an environment with a misspelled setting name
    # WHEN the settings are read
    with caplog.at_level("WARNING", logger="shared.settings"):
        settings = load_settings({typo: "x"})
    # THEN start-up goes on, with one warning naming the typo and the closest real setting
    assert settings.model.provider is ModelProvider.OFFLINE
    [line] = caplog.messages
    assert line == (f"warning: {typo} is not a chatstate setting (did you mean {meant}?); it is "
                    "ignored (CHAT_STRICT_SETTINGS=on makes this an error)")


def test_under_strict_settings_a_mistyped_setting_stops_start_up() -> None:
    # GIVEN CHAT_STRICT_SETTINGS on and a misspelled name
    # WHEN the settings are read
    with pytest.raises(SettingsError) as caught:
        load_settings({"CHAT_STRICT_SETTINGS": "on", "OPENAI_BASEURL": "http://x/v1"})
    # THEN the error names the typo and the real setting
    assert caught.value.setting == "OPENAI_BASEURL"
    assert str(caught.value) == ("setting OPENAI_BASEURL: is not a chatstate setting (did you mean "
                                 "OPENAI_BASE_URL?); CHAT_STRICT_SETTINGS is on")


def test_names_outside_our_prefixes_and_other_libraries_names_are_left_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN the Azure SDK's, OpenTelemetry's, the platform's and the openai SDK's own variables
    env = {"AZURE_TENANT_ID": "t", "OTEL_TRACES_SAMPLER": "always_on", "WEBSITE_HOSTNAME": "h",
           "OPENAI_LOG": "debug", "CHATSTATE_TEST_STORAGE": "x", "FUNCTIONS_WORKER_RUNTIME": "python"}
    # WHEN the settings are read
    with caplog.at_level("WARNING", logger="shared.settings"):
        load_settings({**env, "CHAT_STRICT_SETTINGS": "on"})
    # THEN nothing is warned about or refused
    assert unknown_settings(env) == [] and caplog.messages == []


def test_a_setting_added_to_the_registry_is_known_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a new setting in SETTINGS (as another engineer would add one), in a new family too
    from shared import settings as module

    added = (Setting(name="CHAT_NEW_KNOB", description="new"),
             Setting(name="MCP_SERVER_URL", description="new"), Setting(name="MCP_TOKEN", description="new"))
    monkeypatch.setattr(module, "SETTINGS", module.SETTINGS + added)
    monkeypatch.setattr(module, "_BY_NAME", {s.name: s for s in module.SETTINGS})
    # WHEN names are checked
    unknown = unknown_settings({"CHAT_NEW_KNOB": "1", "MCP_SERVER_URL": "u", "MCP_TOKNE": "t"})
    # THEN the new names are known, and a typo of the new family is caught
    assert [(u.name, u.closest) for u in unknown] == [("MCP_TOKNE", "MCP_TOKEN")]


def test_our_prefixes_come_from_the_registry() -> None:
    from shared.settings import _our_prefixes

    assert {"CHAT_", "OPENAI_", "AZURE_OPENAI_", "BOT_"} <= set(_our_prefixes())
    assert "AZURE_" not in _our_prefixes() and "OTEL_" not in _our_prefixes()
