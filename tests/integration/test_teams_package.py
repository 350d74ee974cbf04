"""The Teams app package: `make teams-package` builds a zip Teams accepts, checked against the
official manifest schema shipped in node_modules (`@microsoft/app-manifest`), with the icons Teams
asks for."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from devtools.teams_package import SCHEMAS, PackageError, build, main, manifest, validate

APP_ID = "6f1c2d3e-4a5b-4c6d-8e7f-901234567890"


def test_the_package_builds_with_the_app_id_and_validates(tmp_path: Path) -> None:
    # GIVEN the bot's app ID
    # WHEN the package is built
    path = build(APP_ID, output=tmp_path / "chatstate.zip")
    # THEN the zip holds the manifest and both icons at its root
    with zipfile.ZipFile(path) as package:
        assert sorted(package.namelist()) == ["color.png", "manifest.json", "outline.png"]
        document = json.loads(package.read("manifest.json"))
        color = Image.open(io.BytesIO(package.read("color.png")))
        outline = Image.open(io.BytesIO(package.read("outline.png"))).convert("RGBA")
    # AND the manifest carries the ID as the app's and the bot's, and passes the official schema
    assert document["id"] == APP_ID and document["bots"][0]["botId"] == APP_ID
    assert "${{" not in json.dumps(document)
    validate(document)
    # AND the bot is a bot of every scope that takes files and offers prompt starters
    bot = document["bots"][0]
    assert bot["scopes"] == ["personal", "team", "groupChat", "copilot"]
    assert bot["supportsFiles"] is True
    personal = next(entry for entry in bot["commandLists"] if "personal" in entry["scopes"])
    assert 1 <= len(personal["commands"]) <= 10
    # AND the icons are 192x192 in colour and 32x32 white on transparent
    assert color.size == (192, 192) and outline.size == (32, 32)
    pixels = {outline.getpixel((x, y)) for x in range(32) for y in range(32)}
    assert all(alpha == 0 or (red, green, blue) == (255, 255, 255)
               for red, green, blue, alpha in pixels)
    assert {alpha for *_, alpha in pixels} == {0, 255}


def test_the_bot_is_a_copilot_custom_engine_agent_by_the_official_schema(tmp_path: Path) -> None:
    # GIVEN the package built with its defaults
    path = build(APP_ID, output=tmp_path / "chatstate.zip")
    with zipfile.ZipFile(path) as package:
        document = json.loads(package.read("manifest.json"))
    # THEN it declares the bot a custom engine agent: the same ID, a bot of personal scope, the
    # short name and description Copilot shows, a disclaimer within its 500 characters
    (agent,) = document["copilotAgents"]["customEngineAgents"]
    assert agent["type"] == "bot" and agent["id"] == APP_ID == document["bots"][0]["botId"]
    assert "personal" in document["bots"][0]["scopes"]
    assert document["name"]["short"] and document["description"]["short"]
    assert 0 < len(agent["disclaimer"]["text"]) <= 500
    # AND its manifest version's official schema knows customEngineAgents (1.20 on), and holds
    # the declaration to it: a type other than bot is refused
    schema = (SCHEMAS / f"v{document['manifestVersion']}" / "MicrosoftTeams.schema.json").read_text()
    assert "customEngineAgents" in schema
    assert "customEngineAgents" not in (SCHEMAS / "v1.19" / "MicrosoftTeams.schema.json").read_text()
    validate(document)
    agent["type"] = "declarative"
    with pytest.raises(PackageError, match="copilotAgents/customEngineAgents/0/type"):
        validate(document)


def test_copilot_off_leaves_the_agent_out_and_still_validates(tmp_path: Path) -> None:
    # GIVEN make teams-package COPILOT=off
    output = tmp_path / "chatstate.zip"
    assert main({"CLIENT_ID": APP_ID}, ["--copilot", "off", "--output", str(output)]) == 0
    # WHEN the package is read
    with zipfile.ZipFile(output) as package:
        document = json.loads(package.read("manifest.json"))
    # THEN it has no Copilot agent and no copilot scope, and passes the schema
    assert "copilotAgents" not in document and "copilot" not in document["bots"][0]["scopes"]
    validate(document)


def test_a_manifest_off_the_schema_is_refused() -> None:
    # GIVEN the manifest with a scope Teams does not know
    document = manifest(APP_ID)
    document["bots"][0]["scopes"] = ["personal", "everywhere"]
    # WHEN it is validated
    # THEN the schema check names where it fails
    with pytest.raises(PackageError, match="bots/0/scopes/1"):
        validate(document)


def test_an_app_id_that_is_not_a_guid_is_refused() -> None:
    # GIVEN a CLIENT_ID that is no Microsoft App ID
    # WHEN the manifest is filled in
    # THEN the error names the setting
    with pytest.raises(PackageError, match="CLIENT_ID"):
        manifest("my-bot")


def test_without_client_id_the_build_fails_with_one_line_naming_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN no CLIENT_ID anywhere
    # WHEN make teams-package runs
    status = main({})
    # THEN it fails with one line that names the setting
    error = capsys.readouterr().err
    assert status == 1 and error.count("\n") == 1 and "CLIENT_ID" in error
