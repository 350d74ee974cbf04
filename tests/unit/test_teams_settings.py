"""The Teams app's settings: suggested replies, the welcome, and the bounds of files and images."""

from __future__ import annotations

import pytest

from shared.errors import SettingsError
from shared.settings import load_settings


def test_the_defaults_suggest_welcome_and_take_a_few_small_files() -> None:
    # GIVEN no settings
    settings = load_settings({})
    # THEN suggestions and the welcome are on, images go to the model, four files of 4 MB at
    # most, from SharePoint (without the token) or the Bot Connector's hosts (with it)
    assert settings.suggested_replies and settings.welcome == "on"
    files = settings.attachments
    assert (files.max_files, files.max_bytes, files.model_images) == (4, 4_000_000, True)
    assert files.file_hosts == ("*.sharepoint.com",)


def test_outside_teams_keeps_the_welcome_for_other_channels_only() -> None:
    # GIVEN CHAT_WELCOME=outside-teams
    settings = load_settings({"CHAT_WELCOME": "Outside-Teams"})
    # THEN Teams gets no welcome (the app's prompt starters greet there); Web Chat does
    assert not settings.welcomes("msteams") and settings.welcomes("webchat")
    assert not load_settings({"CHAT_WELCOME": "off"}).welcomes("webchat")


@pytest.mark.parametrize(("name", "value"), [
    ("CHAT_WELCOME", "sometimes"), ("CHAT_SUGGESTED_REPLIES", "maybe"),
    ("CHAT_MODEL_IMAGES", "vision"), ("CHAT_FILE_MAX_BYTES", "10"), ("CHAT_FILE_MAX_COUNT", "0"),
    ("CHAT_FILE_HOSTS", "https://contoso.sharepoint.com/sites"), ("CHAT_FILE_HOSTS", " , ")])
def test_a_bad_value_is_refused_naming_the_setting(name: str, value: str) -> None:
    # GIVEN a setting out of its range or form
    # WHEN the settings are read
    # THEN the error names it
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})
