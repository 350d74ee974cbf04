"""Keeps the Bicep app settings, `shared.settings.SETTINGS` and local.settings.sample.json in step.

The Bicep is read as text (pycep lives only in infra/check.sh's own venv): every
`xxxAppSettings = [ ... ]` / `appSettings: [ ... ]` array in infra/**/*.bicep is cut out and its
`name: 'X'` entries are the app settings that a deployment sets.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

from shared.settings import SETTINGS, Setting
from tests.unit.infra_policy import policy

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
MAIN_BICEP = INFRA / "main.bicep"
LOCAL_SETTINGS_SAMPLE = REPO / "local.settings.sample.json"

#: App settings the Bicep may set although shared/settings.py does not read them: they are for
#: the Functions host or the platform, not the app.
PLATFORM_SETTINGS = {
    "AzureWebJobsStorage__*": "the Functions host's own storage, reached with the managed identity",
    "APPLICATIONINSIGHTS_*": "the host's telemetry (connection string, Entra ID auth string)",
    "PYTHON_ENABLE_OPENTELEMETRY": "the Python worker's OpenTelemetry mode: it makes the host's "
                                   "trace context the parent of the app's spans",
}

#: Settings that are neither deployed, secret, nor defaulted, and why that is fine.
UNDEPLOYED_WITHOUT_DEFAULT = {
    "OPENAI_BASE_URL": "only for OpenAI-compatible servers (local dev); Azure uses Azure OpenAI",
    "WEBSITE_SITE_NAME": "set by the Azure Functions platform itself, never by us",
    "CHAT_SUMMARY_MODEL": "a cheaper deployment, if the operator makes one; unset, the chat "
                          "deployment writes summaries",
    "HTTPS_PROXY": "a network's outbound proxy, if any; the deployed app goes out directly",
    "HTTP_PROXY": "a network's outbound proxy, if any; the deployed app goes out directly",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "a local OTLP collector; in Azure, traces and metrics go to "
                                   "Application Insights (APPLICATIONINSIGHTS_CONNECTION_STRING)",
    "CHAT_MCP_SERVERS": "no MCP servers unless the operator adds some (their URLs and header "
                        "settings are the operator's)",
    "CHAT_MODEL_PRICES": "an estimate for usage reports only; the operator's prices (their "
                         "currency, their contract), set beside the app if wanted",
}

_ARRAY_START = re.compile(r"\b\w*[aA]ppSettings\s*(?:=|:)\s*\[")
_SETTING_ENTRY = re.compile(r"\bname:\s*'(?P<name>[^']+)'\s*\n\s*value:\s*(?P<value>[^\n]+)")
_PARAM_DEFAULT = re.compile(r"^param\s+(?P<name>\w+)\s+(?:string|int)\s*=\s*(?P<default>.+?)\s*$",
                            re.MULTILINE)
_PARAM_REFERENCE = re.compile(r"^(?:string\((?P<wrapped>\w+)\)|(?P<bare>\w+))$")


# --- helpers ---------------------------------------------------------------------------------


def app_settings_in(text: str) -> list[tuple[str, str]]:
    """(name, value expression) of each entry of each app settings array in one Bicep text."""
    entries: list[tuple[str, str]] = []
    for match in _ARRAY_START.finditer(text):
        start = match.end() - 1
        block = text[start:policy._block_end(text, start)]
        entries += [(m["name"], m["value"].strip()) for m in _SETTING_ENTRY.finditer(block)]
    return entries


def bicep_app_settings() -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    for path in sorted(INFRA.rglob("*.bicep")):
        entries += app_settings_in(path.read_text(encoding="utf-8"))
    return entries


def missing_from_bicep(settings: tuple[Setting, ...], names: set[str]) -> list[str]:
    return [s.name for s in settings if s.deployed and s.name not in names]


def unknown_in_bicep(settings: tuple[Setting, ...], names: set[str]) -> list[str]:
    known = {s.name for s in settings}
    return sorted(name for name in names if name not in known
                  and not any(fnmatch(name, pattern) for pattern in PLATFORM_SETTINGS))


def _bicep_literal(raw: str) -> str:
    """A Bicep param default as the string the app would read: 'text' or a number."""
    if raw.startswith("'") and raw.endswith("'"):
        return raw[1:-1].replace("\\'", "'")
    return raw


# --- tests -------------------------------------------------------------------------------------


def test_the_bicep_app_settings_are_found() -> None:
    # GIVEN the Bicep templates under infra/
    # WHEN their app settings arrays are read
    names = [name for name, _ in bicep_app_settings()]
    # THEN the reader finds the host's settings and the app's, each once
    assert "AzureWebJobsStorage__credential" in names
    assert "CHAT_TABLE_NAME" in names
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert duplicates == [], f"app settings set twice: {duplicates}"


def test_every_deployed_setting_is_an_app_setting_in_the_bicep() -> None:
    # GIVEN the app settings the Bicep sets
    names = {name for name, _ in bicep_app_settings()}
    # WHEN each setting marked deployed=True is looked up
    missing = missing_from_bicep(SETTINGS, names)
    # THEN none is missing
    assert missing == [], f"deployed=True but not set by infra/*.bicep: {missing}"


def test_a_setting_removed_from_the_bicep_is_reported() -> None:
    # GIVEN main.bicep with the CHAT_TABLE_NAME entry taken out
    text = MAIN_BICEP.read_text(encoding="utf-8")
    pruned = re.sub(r"\{\s*name: 'CHAT_TABLE_NAME'\s*\n\s*value: [^\n]+\s*\}", "", text)
    assert pruned != text
    # WHEN the deployed settings are checked against it (and the other templates' settings)
    others = [path for path in sorted(INFRA.rglob("*.bicep")) if path != MAIN_BICEP]
    names = {name for name, _ in app_settings_in(pruned)} | {
        name for path in others for name, _ in app_settings_in(path.read_text(encoding="utf-8"))}
    # THEN the drift is caught
    assert missing_from_bicep(SETTINGS, names) == ["CHAT_TABLE_NAME"]


def test_the_bicep_sets_no_setting_the_app_does_not_know() -> None:
    # GIVEN the app settings the Bicep sets
    names = {name for name, _ in bicep_app_settings()}
    # WHEN those unknown to shared/settings.py and not the platform's are collected
    unknown = unknown_in_bicep(SETTINGS, names)
    # THEN there are none (an unknown one is a typo or a setting nobody reads)
    assert unknown == [], f"set by infra/*.bicep but not in SETTINGS: {unknown}"
    assert unknown_in_bicep(SETTINGS, names | {"CHAT_TABLE_NAM"}) == ["CHAT_TABLE_NAM"]


def test_no_secret_is_an_app_setting() -> None:
    # GIVEN the app settings the Bicep sets
    names = {name for name, _ in bicep_app_settings()}
    # WHEN the secret settings are looked up among them
    secrets = sorted(s.name for s in SETTINGS if s.secret and s.name in names)
    # THEN none is there: in Azure the managed identity replaces every key and secret
    assert secrets == []


def test_the_bicep_defaults_match_the_settings_defaults() -> None:
    # GIVEN main.bicep's param defaults and the app settings set straight from a param
    text = MAIN_BICEP.read_text(encoding="utf-8")
    defaults = {m["name"]: _bicep_literal(m["default"]) for m in _PARAM_DEFAULT.finditer(text)}
    by_name = {s.name: s for s in SETTINGS}
    compared = 0
    for name, value in app_settings_in(text):
        reference = _PARAM_REFERENCE.match(value)
        if reference is None or name not in by_name or by_name[name].default is None:
            continue
        param = reference["wrapped"] or reference["bare"]
        if param not in defaults:
            continue
        # WHEN the param's default is compared with the setting's
        # THEN they agree, so a deployment behaves like a local run
        assert defaults[param] == by_name[name].default, f"{name}: param {param}"
        compared += 1
    assert compared >= 10, f"only {compared} defaults compared: has the Bicep layout changed?"


def test_every_undeployed_setting_is_secret_defaulted_or_explained() -> None:
    # GIVEN the settings that no deployment sets
    undeployed = [s for s in SETTINGS if not s.deployed]
    # WHEN those neither secret nor defaulted are collected
    unexplained = [s.name for s in undeployed if not s.secret and s.default is None
                   and s.name not in UNDEPLOYED_WITHOUT_DEFAULT]
    # THEN each is in the explained allowlist, and the allowlist holds no stale name
    assert unexplained == [], f"undeployed, no default, not secret, not explained: {unexplained}"
    undeployed_names = {s.name for s in undeployed}
    assert set(UNDEPLOYED_WITHOUT_DEFAULT) <= undeployed_names


def test_every_setting_is_in_local_settings_sample() -> None:
    # GIVEN local.settings.sample.json, the template of local.settings.json
    if not LOCAL_SETTINGS_SAMPLE.exists():
        pytest.fail(f"{LOCAL_SETTINGS_SAMPLE.name} is missing")
    values = json.loads(LOCAL_SETTINGS_SAMPLE.read_text(encoding="utf-8"))["Values"]
    # WHEN every setting is looked up in its Values
    missing = [s.name for s in SETTINGS if s.name not in values]
    # THEN each is there, so a new developer sees every knob
    assert missing == [], f"missing from {LOCAL_SETTINGS_SAMPLE.name} Values: {missing}"


def test_the_queue_settings_are_deployed_from_the_queue_the_bicep_creates() -> None:
    # GIVEN main.bicep's app settings and param defaults
    text = MAIN_BICEP.read_text(encoding="utf-8")
    settings = dict(app_settings_in(text))
    defaults = {m["name"]: _bicep_literal(m["default"]) for m in _PARAM_DEFAULT.finditer(text)}
    by_name = {s.name: s for s in SETTINGS}
    # WHEN the settings of the queue half (issue 19) are looked up
    # THEN each is deployed: the mode and the queue from params with the settings' defaults, the
    # endpoint from the storage account whose queues the host's trigger reads
    assert settings["CHAT_ANSWER_MODE"] == "chatAnswerMode"
    assert defaults["chatAnswerMode"] == by_name["CHAT_ANSWER_MODE"].default == "queue"
    assert settings["CHAT_TURN_QUEUE"] == "chatTurnQueue"
    assert defaults["chatTurnQueue"] == by_name["CHAT_TURN_QUEUE"].default == "chat-turns"
    assert settings["CHAT_STORAGE_QUEUE_ENDPOINT"] == "storage.outputs.queueEndpoint"
    assert all(by_name[name].deployed for name in ("CHAT_ANSWER_MODE", "CHAT_TURN_QUEUE",
                                                   "CHAT_STORAGE_QUEUE_ENDPOINT"))
    # AND the host's `-poison` suffix still leaves a valid queue name (at most 63 characters)
    longest = re.search(r"@maxLength\((\d+)\)\nparam chatTurnQueue string", text)
    assert longest is not None and int(longest[1]) + len("-poison") == 63


# --- the docs' setting rows and figures -----------------------------------------------------------

README = REPO / "README.md"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
PARAMETERS = INFRA / "main.parameters.json"
RESULTS = REPO / "benchmarks" / "results.json"

_README_ROW = re.compile(r"^\| `(?P<name>[A-Z0-9_]+)` \| (?P<default>.*?) \| (?P<description>.*) \|$",
                         re.MULTILINE)
_AZD_NAME = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?:=[^}]*)?\}")
_DOC_ROW = re.compile(r"^\| `(?P<name>[A-Z0-9_]+)` \|", re.MULTILINE)
#: A figure quoted from results.json: `8.5 ms` (results.json `webhook.peak_rss_mb`).
_FIGURE = re.compile(r"`(?P<value>[\d,.]+)(?: ?(?:ms|s|MB))?`\s+\(results\.json\s+`(?P<key>[\w.]+)`\)")


def _plain(markdown: str) -> str:
    """A README cell as the code's description would say it: links, code marks and the secret
    note taken out, spaces collapsed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    text = re.sub(r"\*\*Secret:\*\*.*$", "", text).replace("`", "")
    return " ".join(text.split())


def readme_row_problems(readme: str, settings: tuple[Setting, ...]) -> list[str]:
    """Each setting whose README row is missing, or whose default or description differs from the
    code (the row may add a link or a note after the code's description)."""
    rows = {m["name"]: m for m in _README_ROW.finditer(readme)}
    problems = []
    for setting in settings:
        row = rows.get(setting.name)
        if row is None:
            problems.append(f"{setting.name}: no row")
            continue
        default = "(unset)" if setting.default is None else f"`{setting.default}`"
        if row["default"] != default:
            problems.append(f"{setting.name}: default {row['default']} in the README, {default} in code")
        if not _plain(row["description"]).startswith(_plain(setting.description)):
            problems.append(f"{setting.name}: the README's description is not the code's")
    return problems


def test_every_readme_setting_row_matches_the_code() -> None:
    # GIVEN the README's settings table and SETTINGS
    readme = README.read_text(encoding="utf-8")
    # WHEN each row's default and description are compared with the code's
    # THEN they agree
    assert readme_row_problems(readme, SETTINGS) == []


def test_a_stale_readme_row_is_reported() -> None:
    # GIVEN the README with one default and one description changed
    readme = README.read_text(encoding="utf-8")
    stale = readme.replace("| `CHAT_TURN_MAX_ATTEMPTS` | `8` |", "| `CHAT_TURN_MAX_ATTEMPTS` | `5` |")
    stale = stale.replace("| `CHAT_TABLE_NAME` | `conversations` | The table holding",
                          "| `CHAT_TABLE_NAME` | `conversations` | The tables holding")
    assert stale.count("`5` |") > readme.count("`5` |")
    # WHEN the rows are compared with the code
    problems = readme_row_problems(stale, SETTINGS)
    # THEN both drifts are caught
    assert problems == ["CHAT_TABLE_NAME: the README's description is not the code's",
                        "CHAT_TURN_MAX_ATTEMPTS: default `5` in the README, `8` in code"]


def test_every_azd_environment_name_has_a_row_in_deploy_md_and_back() -> None:
    # GIVEN the azd environment names main.parameters.json reads, and docs/deploy.md's table
    builtin = {"AZURE_ENV_NAME", "AZURE_LOCATION", "AZURE_PRINCIPAL_ID"}  # azd sets these itself
    names = {m["name"] for m in _AZD_NAME.finditer(PARAMETERS.read_text(encoding="utf-8"))} - builtin
    rows = {m["name"] for m in _DOC_ROW.finditer(DEPLOY_DOC.read_text(encoding="utf-8"))}
    # THEN each name has a row, and each row is a name
    assert sorted(names - rows) == [] and sorted(rows - names) == []


def test_every_azd_chat_parameter_sets_the_app_setting_of_its_name() -> None:
    # GIVEN main.parameters.json's entries read from a CHAT_* azd name, and the Bicep app settings
    parameters = json.loads(PARAMETERS.read_text(encoding="utf-8"))["parameters"]
    settings = dict(app_settings_in(MAIN_BICEP.read_text(encoding="utf-8")))
    chat = {param: m["name"] for param, entry in parameters.items()
            if (m := _AZD_NAME.search(str(entry["value"]))) and m["name"].startswith("CHAT_")}
    assert len(chat) >= 6
    # THEN each sets the app setting of the same name straight from the parameter
    assert {name: settings.get(name) for name in chat.values()} == {
        name: param for param, name in chat.items()}


def _result(results: dict[str, object], key: str) -> object:
    value: object = results
    for part in key.split("."):
        assert isinstance(value, dict) and part in value, f"results.json has no {key}"
        value = value[part]
    return value


def test_the_figures_of_deploy_md_are_those_of_results_json() -> None:
    # GIVEN docs/deploy.md's figures quoted from benchmarks/results.json, and the file
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    figures = [(m["value"], m["key"]) for m in _FIGURE.finditer(doc)]
    assert len(figures) >= 6, figures
    # WHEN each is looked up
    # THEN the doc quotes the value results.json holds, and none of the stale figures is left
    assert [(value, key) for value, key in figures
            if float(value.replace(",", "")) != _result(results, key)] == []
    assert not re.search(r"\b12\.1 ms|\b2\.67 s|\b110 MB", doc)
