"""Production rules for the Bicep templates that checkov has no check for; run by infra/check.sh.

Standard library only, so `tests/unit/test_infra_policy.py` imports it from the app's venv. The Bicep
is read as text, like `tests/unit/test_infra_drift.py` does: our own templates, in our own layout.

    python3 infra/policy.py                    # check infra/: exit 1 and one line per problem
    python3 infra/policy.py render DIR MODE    # DIR's *.bicep with `vnetEnabled` fixed (see render)

Rules (docs/deploy.md gives the reasons):

- HTTP concurrency: `perInstanceConcurrency` comes from main.bicep's `httpPerInstanceConcurrency`,
  whose default is HTTP_CONCURRENCY_DEFAULT.
- Least privilege: no storage data role at the storage account (or a whole service); blob roles on
  containers, table roles on tables, queue roles on queues. The app's identity holds Storage Blob
  Data Owner on every container the Functions host uses (HOST_CONTAINERS and the deployment
  package's) and Storage Table Data Contributor on the conversations table.
- Private mode: main.bicep's `vnetEnabled` defaults to false and azd's VNET_ENABLED sets it; the
  checkov skips of the network checks apply to the public mode only (check.sh scans both modes).
- The turn queue (issue 19): the app's identity holds Storage Queue Data Contributor on the turn
  queue and at least Storage Queue Data Message Sender on its poison queue (both declared, queue
  scoped like every storage role above), and Storage Table Data Contributor on the inbox table of
  accepted activities beside the conversations table; the webhook enqueues (CHAT_STORAGE_QUEUE_ENDPOINT) to the
  account whose queues the host's trigger reads (AzureWebJobsStorage__queueServiceUri), and
  CHAT_TURN_QUEUE is the queue the storage module creates.
- Always-ready: main.bicep's `answerAlwaysReady` defaults to ALWAYS_READY_DEFAULT, azd's
  ANSWER_ALWAYS_READY sets it, and app/api.bicep gives it to the `function:answer` scale group.
- Budgets (issue 28): each of BUDGET_PARAMETERS is a string parameter of main.bicep that is empty
  by default (no limit: a deployment never refuses anyone unasked), azd sets it from the app
  setting's own name, and it is the app setting of that name.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

INFRA = Path(__file__).resolve().parent

#: The default of main.bicep's httpPerInstanceConcurrency; docs/deploy.md explains the figure.
HTTP_CONCURRENCY_DEFAULT = 16

#: Always-ready instances of the `answer` function by default; docs/deploy.md explains the figure.
ALWAYS_READY_DEFAULT = 0
#: The queue-triggered function that runs a turn: its Flex Consumption scale group.
ANSWER_SCALE_GROUP = "function:answer"

#: Blob containers the Functions host writes with AzureWebJobsStorage: its locks, timer schedules
#: and leases (azure-webjobs-hosts) and its key store (azure-webjobs-secrets).
HOST_CONTAINERS = ("azure-webjobs-hosts", "azure-webjobs-secrets")

ROLE_NAMES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": "Storage Blob Data Reader",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "19e7f393-937e-4f77-808e-94535e297925": "Storage Queue Data Reader",
    "8a0f0c08-91a1-4084-bc3d-661d67233fed": "Storage Queue Data Message Processor",
    "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a": "Storage Queue Data Message Sender",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "76199698-9eea-4c19-bc75-cec21354c6b6": "Storage Table Data Reader",
}
#: How the storage module names the app's identity in a role assignment's principalId.
APP_PRINCIPAL = "identityPrincipalId"
BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
QUEUE_DATA_MESSAGE_SENDER = "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a"
#: The storage module's names of the turn queue and its poison queue, as `Resource.names` holds them.
TURN_QUEUE = "param:turnQueueName"
POISON_QUEUE = "${turnQueueName}-poison"
#: The inbox of accepted activities beside the conversations table (shared/inbox.py's name for it).
INBOX_TABLE = "${take(tableName, 58)}inbox"

#: The narrowest scope Bicep can give each storage data role, by the role name's service word.
NARROWEST_SCOPE = {
    "Blob": "Microsoft.Storage/storageAccounts/blobServices/containers",
    "Queue": "Microsoft.Storage/storageAccounts/queueServices/queues",
    "Table": "Microsoft.Storage/storageAccounts/tableServices/tables",
}

#: Checks whose skips must be limited to the public mode: the private mode must pass them.
NETWORK_CHECKS = ("CKV_AZURE_35", "CKV_AZURE_59", "CKV_AZURE_134")

_RESOURCE = re.compile(
    r"^resource\s+(?P<symbol>\w+)\s+'(?P<type>[^'@]+)@[^']+'\s*(?P<existing>existing\s*)?=\s*"
    r"(?P<loop>\[\s*for\s+(?:\((?P<item_i>\w+)\s*,\s*\w+\)|(?P<item>\w+))\s+in\s+(?P<source>[\w.]+)\s*:\s*)?"
    r"(?:if\s*\([^\n]*\)\s*)?\{",
    re.MULTILINE,
)
_GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_ROLE_CONSTANT = re.compile(rf"^\s*(?:var\s+)?(?P<name>\w+)\s*[:=]\s*'(?P<guid>{_GUID})'", re.MULTILINE)
_ROLE_REFERENCE = re.compile(r"roleDefinitions'\s*,\s*(?P<ref>[\w.\[\]]+)\s*\)")
_SCOPE = re.compile(r"^\s{2}scope:\s*(?P<symbol>\w+)(?:\[[^\]]*\])?\s*$", re.MULTILINE)
_PRINCIPAL = re.compile(r"^\s+principalId:\s*(?P<principal>\S+)\s*$", re.MULTILINE)
_NAME = re.compile(r"^\s{2}name:\s*(?P<name>\S[^\n]*?)\s*$", re.MULTILINE)
_LIST_VAR = re.compile(r"^var\s+(?P<name>\w+)\s*=\s*\[(?P<body>[^\]]*)\]", re.MULTILINE)
_CONDITIONAL = re.compile(
    r"\bvnetEnabled\s*\?\s*(?P<private>'[^'\n]*'|true|false|null|\d+)\s*:\s*(?P<public>'[^'\n]*'|true|false|null|\d+)"
)


# --- reading Bicep ---------------------------------------------------------------------------


def _block_end(text: str, start: int) -> int:
    """Index just past the `}` closing the block whose `{` is at `start` (strings, comments skipped)."""
    depth, index = 0, start
    while index < len(text):
        char = text[index]
        if char == "'":
            index += 1
            while index < len(text) and text[index] != "'":
                index += 2 if text[index] == "\\" else 1
        elif text.startswith("//", index):
            index = text.find("\n", index)
            if index == -1:
                break
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise ValueError(f"unclosed block at offset {start}")


@dataclass(frozen=True)
class Resource:
    """One `resource` declaration of one Bicep file."""

    file: str
    symbol: str
    type: str
    body: str
    names: tuple[str, ...]  # literal names ('x'), `param:x` for a param, or the raw expression
    loop_item: str | None = None  # `[for <item> in <source>: ...]`
    loop_source: tuple[str, ...] = ()  # the items of <source> when it is a list var


def resources_in(file: str, text: str) -> list[Resource]:
    """Every resource declared in one Bicep text, with the names it can take."""
    lists = {m["name"]: tuple(item.strip("'") for item in re.findall(r"'[^']*'|[\w.]+", m["body"]))
             for m in _LIST_VAR.finditer(text)}
    params = set(re.findall(r"^param\s+(\w+)", text, re.MULTILINE))
    found = []
    for match in _RESOURCE.finditer(text):
        body = text[match.end() - 1:_block_end(text, match.end() - 1)]
        name_match = _NAME.search(body)
        raw = name_match["name"] if name_match else ""
        item = match["item"] or match["item_i"]
        if item and raw == item and match["source"] in lists:
            names = lists[match["source"]]
        elif raw.startswith("'") and raw.endswith("'"):
            names = (raw[1:-1],)
        elif raw in params:
            names = (f"param:{raw}",)
        else:
            names = (raw,)
        found.append(Resource(file, match["symbol"], match["type"], body, names,
                              item, lists.get(match["source"] or "", ())))
    return found


def role_constants(text: str) -> dict[str, str]:
    """Names bound to role definition GUIDs in one Bicep text (`var x = '<guid>'` or `x: '<guid>'`)."""
    return {m["name"]: m["guid"] for m in _ROLE_CONSTANT.finditer(text)}


@dataclass(frozen=True)
class RoleAssignment:
    file: str
    symbol: str
    role: str  # the role definition GUID, or the unresolved expression
    scope: Resource | None  # None: the deployment's resource group
    principal: str  # the principalId expression, e.g. identityPrincipalId (the app's identity)


def role_assignments(templates: dict[str, str]) -> list[RoleAssignment]:
    """Every role assignment in the templates, its role resolved and its scope's resource found."""
    found = []
    for file, text in templates.items():
        declared = {r.symbol: r for r in resources_in(file, text)}
        constants = role_constants(text)
        for resource in declared.values():
            if resource.type != "Microsoft.Authorization/roleAssignments":
                continue
            reference = _ROLE_REFERENCE.search(resource.body)
            ref = reference["ref"] if reference else "?"
            refs = resource.loop_source if ref == resource.loop_item else (ref,)
            scope = _SCOPE.search(resource.body)
            principal = _PRINCIPAL.search(resource.body)
            for each in refs:
                found.append(RoleAssignment(file, resource.symbol, constants.get(each.split(".")[-1], each),
                                            declared.get(scope["symbol"]) if scope else None,
                                            principal["principal"] if principal else "?"))
    return found


def read_templates(infra: Path = INFRA) -> dict[str, str]:
    return {str(path.relative_to(infra)): path.read_text(encoding="utf-8")
            for path in sorted(infra.rglob("*.bicep"))}


# --- rules -----------------------------------------------------------------------------------


def _app_parameter_problems(main: str, name: str, documented: int) -> list[str]:
    """main.bicep's int parameter `name` defaults to the `documented` figure and goes to the app module."""
    problems = []
    default = re.search(rf"^param\s+{name}\s+int\s*=\s*(\d+)\s*$", main, re.MULTILINE)
    if default is None:
        problems.append(f"main.bicep: no `param {name} int = <default>`")
    elif int(default[1]) != documented:
        problems.append(f"main.bicep: {name} defaults to {default[1]}, not {documented} (docs/deploy.md)")
    if not re.search(rf"^\s+{name}:\s*{name}\s*$", main, re.MULTILINE):
        problems.append(f"main.bicep: {name} is not passed to the app module")
    return problems


def http_concurrency_problems(main: str, api: str) -> list[str]:
    """The app's HTTP concurrency is main.bicep's parameter, with the documented default."""
    problems = _app_parameter_problems(main, "httpPerInstanceConcurrency", HTTP_CONCURRENCY_DEFAULT)
    trigger = re.search(r"triggers:\s*\{\s*http:\s*\{\s*perInstanceConcurrency:\s*(\w+)\s*\}", api)
    if trigger is None:
        problems.append("app/api.bicep: functionAppConfig.scaleAndConcurrency sets no "
                        "triggers.http.perInstanceConcurrency (Python apps then serve 1 request per instance)")
    elif trigger[1] != "httpPerInstanceConcurrency":
        problems.append(f"app/api.bicep: perInstanceConcurrency is {trigger[1]}, not the parameter")
    return problems


def storage_role_problems(templates: dict[str, str]) -> list[str]:
    """Storage data roles sit on containers, queues or tables, and cover what the app needs."""
    problems = []
    blob_owner_on: set[str] = set()
    table_contributor_on: set[str] = set()
    queue_contributor_on: set[str] = set()
    queue_sender_on: set[str] = set()
    for assignment in role_assignments(templates):
        name = ROLE_NAMES.get(assignment.role)
        if name is None:
            continue
        where = f"{assignment.file}: {assignment.symbol} ({name})"
        narrowest = next(scope for word, scope in NARROWEST_SCOPE.items() if f" {word} " in name)
        noun = narrowest.rsplit("/", 1)[1][:-1]  # .../containers -> container
        if assignment.scope is None:
            problems.append(f"{where}: assigned at the resource group, not to a {noun}")
        elif assignment.scope.type != narrowest:
            problems.append(f"{where}: scoped to {assignment.scope.symbol} ({assignment.scope.type}), not to a {noun}")
        elif assignment.principal != APP_PRINCIPAL:
            continue
        elif assignment.role == BLOB_DATA_OWNER:
            blob_owner_on.update(assignment.scope.names)
        elif assignment.role == TABLE_DATA_CONTRIBUTOR:
            table_contributor_on.update(assignment.scope.names)
        elif assignment.role == QUEUE_DATA_CONTRIBUTOR:
            queue_contributor_on.update(assignment.scope.names)
        elif assignment.role == QUEUE_DATA_MESSAGE_SENDER:
            queue_sender_on.update(assignment.scope.names)
    for container in (*HOST_CONTAINERS, "param:deploymentContainerName"):
        if container not in blob_owner_on:
            problems.append(f"the app's identity has no Storage Blob Data Owner on the host's container {container}")
    if "param:tableName" not in table_contributor_on:
        problems.append("the app's identity has no Storage Table Data Contributor on the conversations table "
                        "(param tableName)")
    if INBOX_TABLE not in table_contributor_on:
        problems.append(f"the app's identity has no Storage Table Data Contributor on the inbox table ({INBOX_TABLE})")
    if TURN_QUEUE not in queue_contributor_on:
        problems.append("the app's identity has no Storage Queue Data Contributor on the turn queue (param "
                        "turnQueueName): the queue trigger must get, delete and update its messages")
    if POISON_QUEUE not in queue_contributor_on | queue_sender_on:
        problems.append("the app's identity has no Storage Queue Data Message Sender on the poison queue "
                        f"({POISON_QUEUE}): the host could not move a failed turn there")
    return problems


def queue_wiring_problems(main: str, api: str) -> list[str]:
    """The app enqueues to the queue and the account the host's queue trigger reads."""
    problems = []
    if not re.search(r"^\s+turnQueueName:\s*chatTurnQueue\s*$", main, re.MULTILINE):
        problems.append("main.bicep: the storage module's turnQueueName is not the chatTurnQueue parameter")
    wanted = {
        "CHAT_TURN_QUEUE": "chatTurnQueue",
        "CHAT_STORAGE_QUEUE_ENDPOINT": "storage.outputs.queueEndpoint",
    }
    for setting, value in wanted.items():
        if not re.search(rf"name:\s*'{setting}'\s*\n\s*value:\s*{re.escape(value)}\s*$", main, re.MULTILINE):
            problems.append(f"main.bicep: the app setting {setting} is not {value}")
    if not re.search(r"^\s+storageQueueEndpoint:\s*storage\.outputs\.queueEndpoint\s*$", main, re.MULTILINE):
        problems.append("main.bicep: the app module's storageQueueEndpoint is not storage.outputs.queueEndpoint, "
                        "so the queue trigger may read another account than the webhook writes")
    # The trigger's connection is AzureWebJobsStorage, with the identity: these three make it one.
    for setting, value in (("AzureWebJobsStorage__queueServiceUri", "storageQueueEndpoint"),
                           ("AzureWebJobsStorage__credential", "'managedidentity'"),
                           ("AzureWebJobsStorage__clientId", "identityClientId")):
        if not re.search(rf"name:\s*'{setting}'\s*\n\s*value:\s*{re.escape(value)}\s*$", api, re.MULTILINE):
            problems.append(f"app/api.bicep: {setting} is not {value} (the queue trigger's connection is "
                            "AzureWebJobsStorage, with the app's identity)")
    return problems


def always_ready_problems(main: str, api: str, parameters: dict[str, object]) -> list[str]:
    """The `answer` function's always-ready instances: a parameter, its default, azd's name, the group."""
    problems = _app_parameter_problems(main, "answerAlwaysReady", ALWAYS_READY_DEFAULT)
    value = parameters.get("parameters", {}).get("answerAlwaysReady", {})  # type: ignore[union-attr]
    if not isinstance(value, dict) or not str(value.get("value", "")).startswith("${ANSWER_ALWAYS_READY"):
        problems.append("main.parameters.json: answerAlwaysReady is not set from ${ANSWER_ALWAYS_READY}")
    entry = re.search(r"alwaysReady:[^\n]*\[\s*\{\s*name:\s*'(?P<group>[^']*)'\s*\n\s*instanceCount:\s*(?P<count>\w+)",
                      api)
    if entry is None:
        problems.append("app/api.bicep: functionAppConfig.scaleAndConcurrency sets no alwaysReady entry")
    else:
        if entry["group"] != ANSWER_SCALE_GROUP:
            problems.append(f"app/api.bicep: the alwaysReady entry is for {entry['group']}, not {ANSWER_SCALE_GROUP}")
        if entry["count"] != "answerAlwaysReady":
            problems.append(f"app/api.bicep: the alwaysReady instanceCount is {entry['count']}, not the parameter")
    return problems


def private_mode_problems(main: str, parameters: dict[str, object], skips: list[dict[str, object]]) -> list[str]:
    """vnetEnabled exists, is off by default, azd sets it, and network skips are public-only."""
    problems = []
    if not re.search(r"^param\s+vnetEnabled\s+bool\s*=\s*false\s*$", main, re.MULTILINE):
        problems.append("main.bicep: no `param vnetEnabled bool = false`")
    value = parameters.get("parameters", {}).get("vnetEnabled", {})  # type: ignore[union-attr]
    if not isinstance(value, dict) or not str(value.get("value", "")).startswith("${VNET_ENABLED"):
        problems.append("main.parameters.json: vnetEnabled is not set from ${VNET_ENABLED}")
    for entry in skips:
        if entry.get("id") in NETWORK_CHECKS and entry.get("modes") != ["public"]:
            problems.append(f"checkov-skips.yaml: {entry.get('id')} must be skipped in the public mode only "
                            "(modes: [public])")
    return problems


#: main.bicep's budget parameters and the app settings (and azd names) they set.
BUDGET_PARAMETERS = {"chatUserDailyTokenLimit": "CHAT_USER_DAILY_TOKEN_LIMIT",
                     "chatUserTurnsPerMinute": "CHAT_USER_TURNS_PER_MINUTE",
                     "chatTenantDailyTokenLimit": "CHAT_TENANT_DAILY_TOKEN_LIMIT"}


def budget_problems(main: str, parameters: dict[str, object]) -> list[str]:
    """The budgets: off by default, set by azd under the setting's name, passed to the app."""
    problems = []
    given = parameters.get("parameters", {})
    for param, setting in BUDGET_PARAMETERS.items():
        if not re.search(rf"^param\s+{param}\s+string\s*=\s*''\s*$", main, re.MULTILINE):
            problems.append(f"main.bicep: no `param {param} string = ''` (a budget is off unless set)")
        value = given.get(param, {}) if isinstance(given, dict) else {}
        if not isinstance(value, dict) or value.get("value") != f"${{{setting}}}":
            problems.append(f"main.parameters.json: {param} is not set from ${{{setting}}}")
        if not re.search(rf"name:\s*'{setting}'\s*\n\s*value:\s*{param}\s*$", main, re.MULTILINE):
            problems.append(f"main.bicep: the app setting {setting} is not set from {param}")
    return problems


def render(text: str, *, vnet_enabled: bool) -> str:
    """`text` with each `vnetEnabled ? <literal> : <literal>` replaced by the operand of one mode.

    checkov reads a bare parameter as its default but evaluates no `?:`; this gives it each mode
    to scan. A conditional with a non-literal operand is left as it is.
    """
    side = "private" if vnet_enabled else "public"
    return _CONDITIONAL.sub(lambda m: m[side], text)


def problems_in(infra: Path = INFRA) -> list[str]:
    templates = read_templates(infra)
    parameters = json.loads((infra / "main.parameters.json").read_text(encoding="utf-8"))
    return [
        *http_concurrency_problems(templates["main.bicep"], templates["app/api.bicep"]),
        *storage_role_problems(templates),
        *private_mode_problems(templates["main.bicep"], parameters, _skip_entries(infra / "checkov-skips.yaml")),
        *queue_wiring_problems(templates["main.bicep"], templates["app/api.bicep"]),
        *always_ready_problems(templates["main.bicep"], templates["app/api.bicep"], parameters),
        *budget_problems(templates["main.bicep"], parameters),
    ]


def _skip_entries(path: Path) -> list[dict[str, object]]:
    """The skip file's entries: `- id:` lines and the `modes:` line under each (no YAML library here)."""
    entries: list[dict[str, object]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"^\s*-\s+id:\s*(\S+)\s*$", line):
            entries.append({"id": match[1]})
        elif (match := re.match(r"^\s+modes:\s*\[([^\]]*)\]\s*$", line)) and entries:
            entries[-1]["modes"] = [mode.strip() for mode in match[1].split(",") if mode.strip()]
    return entries


def main(argv: list[str]) -> int:
    if argv[:1] == ["render"]:
        directory, mode = Path(argv[1]), argv[2]
        if mode not in ("public", "private"):
            sys.exit(f"mode must be public or private, not {mode}")
        for path in directory.rglob("*.bicep"):
            path.write_text(render(path.read_text(encoding="utf-8"), vnet_enabled=mode == "private"),
                            encoding="utf-8")
        return 0
    problems = problems_in()
    for problem in problems:
        print(f"FAIL  {problem}")
    print(f"policy: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
