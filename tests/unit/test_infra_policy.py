"""The production rules of infra/policy.py (run by `make infra-check`): each holds on the templates,
and each catches the template it was written against.

policy.py is standard library only, so it is imported here from infra/ by path. The checkov scans
of both network modes run in infra/check.sh only (checkov lives in its own venv).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.unit.infra_policy import REPO, policy

INFRA = REPO / "infra"


#: app/storage.bicep's role assignments before issue 13: every role on the whole account.
ACCOUNT_WIDE_ROLES = """
var roles = {
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner
  queueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88' // Storage Queue Data Contributor
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor
}
var identityRoles = [
  roles.blobDataOwner
  roles.queueDataContributor
  roles.tableDataContributor
]

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
}

resource identityRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for roleId in identityRoles: {
  name: guid(storage.id, identityPrincipalId, roleId)
  scope: storage
  properties: {
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
  }
}]
"""


def _templates() -> dict[str, str]:
    return dict(policy.read_templates(INFRA))


# --- all rules -------------------------------------------------------------------------------


def test_the_templates_break_no_rule() -> None:
    """GIVEN infra/ as committed
    WHEN every rule of infra/policy.py is checked
    THEN there is no problem (check.sh runs the same)."""
    assert policy.problems_in(INFRA) == []


# --- HTTP concurrency ------------------------------------------------------------------------


def test_the_app_takes_its_http_concurrency_from_the_parameter() -> None:
    """GIVEN main.bicep and app/api.bicep
    WHEN the HTTP concurrency rule reads them
    THEN perInstanceConcurrency is the parameter, with the documented default."""
    templates = _templates()
    assert policy.http_concurrency_problems(templates["main.bicep"], templates["app/api.bicep"]) == []
    assert re.search(rf"^param httpPerInstanceConcurrency int = {policy.HTTP_CONCURRENCY_DEFAULT}$",
                     templates["main.bicep"], re.MULTILINE)


def test_an_app_without_http_concurrency_is_reported() -> None:
    """GIVEN app/api.bicep without triggers.http.perInstanceConcurrency (as before issue 13)
    WHEN the HTTP concurrency rule reads it
    THEN it reports that Python apps then serve one request per instance."""
    templates = _templates()
    api = re.sub(r"\n\s*// Python apps default to 1[^\n]*\n[^\n]*\n\s*triggers: \{.*?\n        \}", "",
                 templates["app/api.bicep"], flags=re.DOTALL)
    assert "perInstanceConcurrency" not in api
    problems = policy.http_concurrency_problems(templates["main.bicep"], api)
    assert any("1 request per instance" in problem for problem in problems)


def test_another_concurrency_default_is_reported() -> None:
    """GIVEN main.bicep with the platform's Python default of 1
    WHEN the HTTP concurrency rule reads it
    THEN the default is reported as differing from the documented one."""
    templates = _templates()
    main = templates["main.bicep"].replace(
        f"param httpPerInstanceConcurrency int = {policy.HTTP_CONCURRENCY_DEFAULT}",
        "param httpPerInstanceConcurrency int = 1")
    problems = policy.http_concurrency_problems(main, templates["app/api.bicep"])
    assert problems == [f"main.bicep: httpPerInstanceConcurrency defaults to 1, not "
                        f"{policy.HTTP_CONCURRENCY_DEFAULT} (docs/deploy.md)"]


@pytest.mark.parametrize(("param", "default"), [
    ("httpPerInstanceConcurrency", policy.HTTP_CONCURRENCY_DEFAULT),
    ("answerAlwaysReady", policy.ALWAYS_READY_DEFAULT),
])
def test_the_deploy_guide_names_the_concurrency_default(param: str, default: int) -> None:
    """GIVEN docs/deploy.md, where the defaults of the hosting parameters are reasoned
    WHEN its parameter tables are read
    THEN each states the same default as policy.py and main.bicep."""
    guide = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    row = re.search(rf"^\| `{param}` \| (\d+) \|", guide, re.MULTILINE)
    assert row is not None, f"docs/deploy.md: no `{param}` row"
    assert int(row[1]) == default


# --- least privilege -------------------------------------------------------------------------


def test_storage_roles_sit_on_containers_and_the_table() -> None:
    """GIVEN the templates' role assignments
    WHEN their storage data roles are collected
    THEN blob roles sit on containers, table roles on tables, queue roles on queues, none on the account."""
    assignments = [a for a in policy.role_assignments(_templates()) if a.role in policy.ROLE_NAMES]
    scopes = {(policy.ROLE_NAMES[a.role], a.scope.type) for a in assignments if a.scope is not None}
    assert scopes == {
        ("Storage Blob Data Owner", "Microsoft.Storage/storageAccounts/blobServices/containers"),
        ("Storage Table Data Contributor", "Microsoft.Storage/storageAccounts/tableServices/tables"),
        ("Storage Queue Data Contributor", "Microsoft.Storage/storageAccounts/queueServices/queues"),
        ("Storage Queue Data Message Sender", "Microsoft.Storage/storageAccounts/queueServices/queues"),
    }
    assert all(a.scope is not None for a in assignments)


def test_the_host_containers_include_the_timer_leases() -> None:
    """GIVEN app/storage.bicep
    WHEN the containers the app's Blob Data Owner covers are collected
    THEN they are the host's two (timer leases live in azure-webjobs-hosts) and the package's."""
    covered = {name for a in policy.role_assignments(_templates())
               if a.role == policy.BLOB_DATA_OWNER and a.principal == policy.APP_PRINCIPAL
               and a.scope is not None for name in a.scope.names}
    assert covered == {"azure-webjobs-hosts", "azure-webjobs-secrets", "param:deploymentContainerName"}


def test_account_wide_roles_are_reported() -> None:
    """GIVEN the role assignments app/storage.bicep had before issue 13 (all on the account)
    WHEN the storage role rule reads them
    THEN each role is reported at the account, and the missing narrow grants too."""
    problems = policy.storage_role_problems({"app/storage.bicep": ACCOUNT_WIDE_ROLES})
    for role, narrowest in (("Storage Blob Data Owner", "container"), ("Storage Queue Data Contributor", "queue"),
                            ("Storage Table Data Contributor", "table")):
        assert (f"app/storage.bicep: identityRoleAssignments ({role}): scoped to storage "
                f"(Microsoft.Storage/storageAccounts), not to a {narrowest}") in problems
    assert "the app's identity has no Storage Blob Data Owner on the host's container azure-webjobs-hosts" in problems
    assert ("the app's identity has no Storage Table Data Contributor on the conversations table (param tableName)"
            in problems)
    assert any(problem.startswith("the app's identity has no Storage Queue Data Contributor on the turn queue")
               for problem in problems)


@pytest.mark.parametrize(("symbol", "scope", "expected"), [
    ("appTableRole", "conversationsTable", [
        "app/storage.bicep: appTableRole (Storage Table Data Contributor): scoped to storage "
        "(Microsoft.Storage/storageAccounts), not to a table",
        "the app's identity has no Storage Table Data Contributor on the conversations table (param tableName)",
    ]),
    ("appTurnQueueRole", "turnQueue", [
        "app/storage.bicep: appTurnQueueRole (Storage Queue Data Contributor): scoped to storage "
        "(Microsoft.Storage/storageAccounts), not to a queue",
        "the app's identity has no Storage Queue Data Contributor on the turn queue (param turnQueueName): "
        "the queue trigger must get, delete and update its messages",
    ]),
])
def test_a_table_role_moved_to_the_account_is_reported(symbol: str, scope: str, expected: list[str]) -> None:
    """GIVEN app/storage.bicep with the app's table role (or turn queue role) scoped to the account
    WHEN the storage role rule reads it
    THEN the rule reports the scope and the app's missing grant on the conversations table (the
    deploying user's grant there does not count), or on the turn queue."""
    templates = _templates()
    storage = templates["app/storage.bicep"]
    moved = re.sub(rf"(resource {symbol} [^\n]*\n[^\n]*\n  scope: ){scope}", r"\1storage", storage)
    assert moved != storage
    assert policy.storage_role_problems({**templates, "app/storage.bicep": moved}) == expected


# --- private mode ----------------------------------------------------------------------------


def test_render_picks_one_side_of_each_literal_conditional() -> None:
    """GIVEN Bicep with `vnetEnabled ? <literal> : <literal>` and one non-literal conditional
    WHEN it is rendered for each mode
    THEN the literal ones become that mode's value, the other is left for checkov as it was."""
    text = ("publicNetworkAccess: vnetEnabled ? 'Disabled' : 'Enabled'\n"
            "defaultAction: vnetEnabled ? 'Deny' : 'Allow'\n"
            "subnet: vnetEnabled ? vnet.outputs.appSubnetId : ''\n")
    assert policy.render(text, vnet_enabled=True) == (
        "publicNetworkAccess: 'Disabled'\ndefaultAction: 'Deny'\nsubnet: vnetEnabled ? vnet.outputs.appSubnetId : ''\n")
    public = policy.render(text, vnet_enabled=False)
    assert public.startswith("publicNetworkAccess: 'Enabled'\ndefaultAction: 'Allow'\n")


def test_the_network_properties_checkov_reads_render_in_both_modes() -> None:
    """GIVEN app/storage.bicep and app/openai.bicep
    WHEN each is rendered for the private mode
    THEN their publicNetworkAccess and defaultAction are literals checkov can read: off and Deny."""
    templates = _templates()
    for name in ("app/storage.bicep", "app/openai.bicep"):
        private = policy.render(templates[name], vnet_enabled=True)
        public = policy.render(templates[name], vnet_enabled=False)
        assert "publicNetworkAccess: 'Disabled'" in private and "defaultAction: 'Deny'" in private, name
        assert "publicNetworkAccess: 'Enabled'" in public and "defaultAction: 'Allow'" in public, name


def test_network_skips_outside_the_public_mode_are_reported() -> None:
    """GIVEN main.bicep without vnetEnabled, azd parameters without it, and a network skip for all modes
    WHEN the private mode rule reads them
    THEN each is reported."""
    problems = policy.private_mode_problems(
        "param location string\n", {"parameters": {}}, [{"id": "CKV_AZURE_59", "reason": "x"}])
    assert problems == [
        "main.bicep: no `param vnetEnabled bool = false`",
        "main.parameters.json: vnetEnabled is not set from ${VNET_ENABLED}",
        "checkov-skips.yaml: CKV_AZURE_59 must be skipped in the public mode only (modes: [public])",
    ]


def test_azd_sets_vnet_enabled_off_by_default() -> None:
    """GIVEN infra/main.parameters.json
    WHEN its vnetEnabled entry is read
    THEN azd's VNET_ENABLED sets it, false when unset."""
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    assert parameters["parameters"]["vnetEnabled"] == {"value": "${VNET_ENABLED=false}"}


# --- the turn queue (issue 19) -----------------------------------------------------------------


def _queue_grants(principal: str) -> set[tuple[str, str]]:
    return {(policy.ROLE_NAMES[a.role], name) for a in policy.role_assignments(_templates())
            if a.principal == principal and a.scope is not None
            and a.scope.type == "Microsoft.Storage/storageAccounts/queueServices/queues" for name in a.scope.names}


def test_the_app_holds_queue_roles_on_the_turn_queue_and_its_poison_queue_only() -> None:
    """GIVEN app/storage.bicep
    WHEN the queue roles of the app's identity and of the deploying user are collected
    THEN the app may work the turn queue (Contributor: the trigger updates messages) and only add to
    the poison queue; the user may add to the turn queue (re-queue) and work the poison queue."""
    assert _queue_grants(policy.APP_PRINCIPAL) == {
        ("Storage Queue Data Contributor", policy.TURN_QUEUE),
        ("Storage Queue Data Message Sender", policy.POISON_QUEUE),
    }
    assert _queue_grants("userPrincipalId") == {
        ("Storage Queue Data Message Sender", policy.TURN_QUEUE),
        ("Storage Queue Data Contributor", policy.POISON_QUEUE),
    }


def test_the_poison_queue_is_the_turn_queue_plus_the_hosts_suffix() -> None:
    """GIVEN app/storage.bicep's queues
    WHEN their names are read
    THEN the poison queue is named as the Functions host names it (<queue>-poison), so the grant
    on it is the queue the host writes."""
    queues = {r.symbol: r.names for r in policy.resources_in("app/storage.bicep", _templates()["app/storage.bicep"])
              if r.type == "Microsoft.Storage/storageAccounts/queueServices/queues"}
    assert queues == {"turnQueue": (policy.TURN_QUEUE,), "poisonQueue": (policy.POISON_QUEUE,)}


def test_a_trigger_with_only_the_documented_reader_roles_is_reported() -> None:
    """GIVEN app/storage.bicep with the app's turn queue role lowered to Message Sender (which,
    like the Reader and Message Processor roles, cannot update a message)
    WHEN the storage role rule reads it
    THEN it reports that the trigger lacks Contributor on the turn queue."""
    templates = _templates()
    storage = templates["app/storage.bicep"]
    lowered = re.sub(r"(resource appTurnQueueRole .*?)roles\.queueDataContributor(.*?)roles\.queueDataContributor",
                     r"\1roles.queueDataMessageSender\2roles.queueDataMessageSender", storage, count=1, flags=re.DOTALL)
    assert lowered != storage
    problems = policy.storage_role_problems({**templates, "app/storage.bicep": lowered})
    assert problems == [
        "the app's identity has no Storage Queue Data Contributor on the turn queue (param turnQueueName): "
        "the queue trigger must get, delete and update its messages",
    ]


def test_a_missing_poison_queue_grant_is_reported() -> None:
    """GIVEN app/storage.bicep without the app's role on the poison queue
    WHEN the storage role rule reads it
    THEN it reports that the host could not move a failed turn there."""
    templates = _templates()
    storage = templates["app/storage.bicep"]
    pruned = re.sub(r"resource appPoisonQueueRole .*?\n\}\n", "", storage, count=1, flags=re.DOTALL)
    assert pruned != storage
    assert policy.storage_role_problems({**templates, "app/storage.bicep": pruned}) == [
        f"the app's identity has no Storage Queue Data Message Sender on the poison queue ({policy.POISON_QUEUE}): "
        "the host could not move a failed turn there",
    ]


def test_the_webhook_enqueues_where_the_trigger_reads() -> None:
    """GIVEN main.bicep and app/api.bicep
    WHEN the queue wiring rule reads them
    THEN CHAT_TURN_QUEUE is the queue created, and the webhook's queue endpoint is the account the
    host's AzureWebJobsStorage trigger connection reads."""
    templates = _templates()
    assert policy.queue_wiring_problems(templates["main.bicep"], templates["app/api.bicep"]) == []


def test_a_queue_endpoint_of_another_account_is_reported() -> None:
    """GIVEN main.bicep whose CHAT_STORAGE_QUEUE_ENDPOINT and CHAT_TURN_QUEUE point elsewhere
    WHEN the queue wiring rule reads it
    THEN both are reported: the trigger would never see the webhook's messages."""
    templates = _templates()
    main = templates["main.bicep"]
    moved = re.sub(r"(name: 'CHAT_STORAGE_QUEUE_ENDPOINT'\n\s*value: )storage\.outputs\.queueEndpoint",
                   r"\1'https://other.queue.core.windows.net'", main)
    moved = re.sub(r"(name: 'CHAT_TURN_QUEUE'\n\s*value: )chatTurnQueue", r"\1'turns'", moved)
    assert moved.count("other.queue") == 1 and "'turns'" in moved
    assert policy.queue_wiring_problems(moved, templates["app/api.bicep"]) == [
        "main.bicep: the app setting CHAT_TURN_QUEUE is not chatTurnQueue",
        "main.bicep: the app setting CHAT_STORAGE_QUEUE_ENDPOINT is not storage.outputs.queueEndpoint",
    ]


def test_a_trigger_connection_without_the_identity_is_reported() -> None:
    """GIVEN app/api.bicep without AzureWebJobsStorage__clientId and with the queue URI of another account
    WHEN the queue wiring rule reads it
    THEN both are reported: the host could not read the turn queue with the app's identity."""
    templates = _templates()
    api = re.sub(r"\{\s*name: 'AzureWebJobsStorage__clientId'\s*\n\s*value: [^\n]+\s*\}", "",
                 templates["app/api.bicep"])
    api = api.replace("value: storageQueueEndpoint", "value: 'https://other.queue.core.windows.net'")
    assert "AzureWebJobsStorage__clientId" not in api and "other.queue" in api
    assert policy.queue_wiring_problems(templates["main.bicep"], api) == [
        "app/api.bicep: AzureWebJobsStorage__queueServiceUri is not storageQueueEndpoint (the queue trigger's "
        "connection is AzureWebJobsStorage, with the app's identity)",
        "app/api.bicep: AzureWebJobsStorage__clientId is not identityClientId (the queue trigger's "
        "connection is AzureWebJobsStorage, with the app's identity)",
    ]


# --- always-ready instances of the `answer` function ----------------------------------------


def _parameters() -> dict[str, object]:
    loaded: dict[str, object] = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    return loaded


def test_the_answer_function_has_its_always_ready_parameter() -> None:
    """GIVEN main.bicep, app/api.bicep and main.parameters.json
    WHEN the always-ready rule reads them
    THEN the parameter has the documented default, azd sets it, and the `function:answer` group gets it."""
    templates = _templates()
    assert policy.always_ready_problems(templates["main.bicep"], templates["app/api.bicep"], _parameters()) == []
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    assert parameters["parameters"]["answerAlwaysReady"] == {
        "value": f"${{ANSWER_ALWAYS_READY={policy.ALWAYS_READY_DEFAULT}}}"}


def test_always_ready_for_another_group_or_unset_by_azd_is_reported() -> None:
    """GIVEN app/api.bicep giving the always-ready instances to the HTTP group, a default of 1, and
    azd parameters without the entry
    WHEN the always-ready rule reads them
    THEN each is reported."""
    templates = _templates()
    api = templates["app/api.bicep"].replace("name: 'function:answer'", "name: 'http'")
    main = templates["main.bicep"].replace(f"param answerAlwaysReady int = {policy.ALWAYS_READY_DEFAULT}",
                                           "param answerAlwaysReady int = 1")
    assert api != templates["app/api.bicep"] and main != templates["main.bicep"]
    assert policy.always_ready_problems(main, api, {"parameters": {}}) == [
        f"main.bicep: answerAlwaysReady defaults to 1, not {policy.ALWAYS_READY_DEFAULT} (docs/deploy.md)",
        "main.parameters.json: answerAlwaysReady is not set from ${ANSWER_ALWAYS_READY}",
        "app/api.bicep: the alwaysReady entry is for http, not function:answer",
    ]


def test_the_app_may_work_the_inbox_table_beside_the_conversations() -> None:
    """GIVEN app/storage.bicep
    WHEN the tables the app's Table Data Contributor covers are collected
    THEN they are the conversations table and the inbox of accepted activities, nothing else."""
    covered = {name for a in policy.role_assignments(_templates())
               if a.role == policy.TABLE_DATA_CONTRIBUTOR and a.principal == policy.APP_PRINCIPAL
               and a.scope is not None for name in a.scope.names}
    assert covered == {"param:tableName", policy.INBOX_TABLE}


def test_a_missing_inbox_table_grant_is_reported() -> None:
    """GIVEN app/storage.bicep without the app's role on the inbox table
    WHEN the storage role rule reads it
    THEN it reports the missing grant (the webhook could not accept a message)."""
    templates = _templates()
    storage = templates["app/storage.bicep"]
    pruned = re.sub(r"resource appInboxTableRole .*?\n\}\n", "", storage, count=1, flags=re.DOTALL)
    assert pruned != storage
    assert policy.storage_role_problems({**templates, "app/storage.bicep": pruned}) == [
        f"the app's identity has no Storage Table Data Contributor on the inbox table ({policy.INBOX_TABLE})",
    ]


# --- budgets (issue 28) -------------------------------------------------------------------------


def test_the_budgets_are_off_by_default_and_set_by_azd_under_their_own_names() -> None:
    """GIVEN main.bicep and main.parameters.json
    WHEN the budget rule reads them
    THEN each budget parameter is empty by default, azd sets it, and it is its app setting."""
    assert policy.budget_problems(_templates()["main.bicep"], _parameters()) == []
    assert set(policy.BUDGET_PARAMETERS.values()) == {
        "CHAT_USER_DAILY_TOKEN_LIMIT", "CHAT_USER_TURNS_PER_MINUTE", "CHAT_TENANT_DAILY_TOKEN_LIMIT"}


def test_a_budget_on_by_default_unset_by_azd_or_not_passed_on_is_reported() -> None:
    """GIVEN main.bicep with a user budget of 50,000 tokens by default, the tenant's app setting
    set from another parameter, and azd parameters without the per-minute entry
    WHEN the budget rule reads them
    THEN each is reported."""
    main = _templates()["main.bicep"]
    changed = main.replace("param chatUserDailyTokenLimit string = ''",
                           "param chatUserDailyTokenLimit string = '50000'")
    changed = changed.replace("name: 'CHAT_TENANT_DAILY_TOKEN_LIMIT'\n    value: chatTenantDailyTokenLimit",
                              "name: 'CHAT_TENANT_DAILY_TOKEN_LIMIT'\n    value: chatDailyTokenLimit")
    assert changed.count("'50000'") == 1 and "value: chatTenantDailyTokenLimit" not in changed
    parameters = _parameters()
    entries = dict(parameters["parameters"])  # type: ignore[call-overload]
    del entries["chatUserTurnsPerMinute"]
    assert policy.budget_problems(changed, {"parameters": entries}) == [
        "main.bicep: no `param chatUserDailyTokenLimit string = ''` (a budget is off unless set)",
        "main.parameters.json: chatUserTurnsPerMinute is not set from ${CHAT_USER_TURNS_PER_MINUTE}",
        "main.bicep: the app setting CHAT_TENANT_DAILY_TOKEN_LIMIT is not set from "
        "chatTenantDailyTokenLimit",
    ]
