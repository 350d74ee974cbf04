"""The usual doors: the dev container and the CI workflow install and test as `.ci/run` does, and
the editor knows the test tiers."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_dev_container_has_python_3_13_and_node_and_installs_as_ci_does() -> None:
    # GIVEN the dev container and the CI entry point
    container = json.loads((REPO / ".devcontainer" / "devcontainer.json").read_text())
    ci = (REPO / ".ci" / "run").read_text()
    # THEN the image is Python 3.13, Node is a feature, and it installs with CI's own step
    assert re.search(r"python:[\w.-]*3\.13", container["image"])
    assert any("/node:" in feature for feature in container["features"])
    assert container["postCreateCommand"] == "make deps" and "\nmake deps\n" in ci


def test_the_ci_workflow_runs_the_ci_entry_point_on_python_3_13_and_node() -> None:
    # GIVEN the GitHub workflow
    workflow = (REPO / ".github" / "workflows" / "ci.yml").read_text()
    # THEN it sets up Python 3.13 and Node and runs .ci/run (make deps, make test)
    assert 'python-version: "3.13"' in workflow and "actions/setup-node" in workflow
    assert re.search(r"^\s+run: bash \.ci/run$", workflow, re.MULTILINE)
    assert "\nmake test\n" in (REPO / ".ci" / "run").read_text()


def test_the_editor_runs_each_test_tier() -> None:
    # GIVEN the VS Code settings and tasks
    settings = json.loads((REPO / ".vscode" / "settings.json").read_text())
    tasks = json.loads((REPO / ".vscode" / "tasks.json").read_text())["tasks"]
    commands = " ".join(task["command"] for task in tasks)
    # THEN pytest is the test runner on the project's venv, and each tier has a task
    assert settings["python.testing.pytestEnabled"] is True
    assert settings["python.defaultInterpreterPath"].endswith(".venv/bin/python")
    assert all(f"pytest -q tests/{tier}" in commands for tier in ("unit", "integration", "e2e"))
    tiers = {path.name for path in (REPO / "tests").iterdir() if path.is_dir() and
             (path / "__init__.py").exists()}
    assert tiers == {"unit", "integration", "e2e"}


def test_the_readme_lists_each_first_hour_message_as_the_code_words_it() -> None:
    # GIVEN the README's "When something is wrong" section, and the messages as the code makes them
    from shared.answer import APOLOGY, SETUP_PROBLEM
    from shared.model import _SETUP_ADVICE
    from shared.settings import UnknownSetting

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## When something is wrong"):readme.index("## In your own code")]
    typo = UnknownSetting(name="OPENAI_BASEURL", closest="OPENAI_BASE_URL")
    messages = [f"warning: {typo} (CHAT_STRICT_SETTINGS=on makes this an error)", SETUP_PROBLEM,
                APOLOGY, f"the model answered 401: {_SETUP_ADVICE[401][0]}",
                "refused: check the key / role", "conversation_not_found",
                "chatstate needs Python 3.13 (make PYTHON=/path/to/python3.13 ...)",
                "(JSON allows no trailing comma); fix the file, or copy local.settings.sample.json again",
                "stop that program, or set CHAT_STORAGE_CONNECTION_STRING to your storage",
                "stop what listens there, or choose another port (PORT=7072 make run)"]
    # THEN each is quoted there word for word
    assert [message for message in messages if message not in section] == []
