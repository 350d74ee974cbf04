"""The production rules of infra/policy.py (run by `make infra-check`): each holds on the templates,
and each catches the template it was written against.

policy.py is standard library only, so it is imported here from infra/ by path. The checkov scans
of both network modes run in infra/check.sh only (checkov lives in its own venv).
"""

from __future__ import annotations

import json
import re

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


def test_the_deploy_guide_names_the_concurrency_default() -> None:
    """GIVEN docs/deploy.md, where the default is reasoned
    WHEN its parameter table is read
    THEN it states the same default as policy.py and main.bicep."""
    guide = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    row = re.search(r"^\| `httpPerInstanceConcurrency` \| (\d+) \|", guide, re.MULTILINE)
    assert row is not None, "docs/deploy.md: no `httpPerInstanceConcurrency` row"
    assert int(row[1]) == policy.HTTP_CONCURRENCY_DEFAULT


# --- least privilege -------------------------------------------------------------------------


def test_storage_roles_sit_on_containers_and_the_table() -> None:
    """GIVEN the templates' role assignments
    WHEN their storage data roles are collected
    THEN blob roles sit on containers, table roles on tables, and none on the account."""
    assignments = [a for a in policy.role_assignments(_templates()) if a.role in policy.ROLE_NAMES]
    scopes = {(policy.ROLE_NAMES[a.role], a.scope.type) for a in assignments if a.scope is not None}
    assert scopes == {
        ("Storage Blob Data Owner", "Microsoft.Storage/storageAccounts/blobServices/containers"),
        ("Storage Table Data Contributor", "Microsoft.Storage/storageAccounts/tableServices/tables"),
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


def test_a_table_role_moved_to_the_account_is_reported() -> None:
    """GIVEN app/storage.bicep with the app's table role scoped to the account again
    WHEN the storage role rule reads it
    THEN the rule reports the scope and the app's missing grant on the conversations table (the
    deploying user's grant there does not count)."""
    templates = _templates()
    storage = templates["app/storage.bicep"]
    moved = re.sub(r"(resource appTableRole [^\n]*\n[^\n]*\n  scope: )conversationsTable", r"\1storage", storage)
    assert moved != storage
    problems = policy.storage_role_problems({**templates, "app/storage.bicep": moved})
    assert problems == [
        "app/storage.bicep: appTableRole (Storage Table Data Contributor): scoped to storage "
        "(Microsoft.Storage/storageAccounts), not to a table",
        "the app's identity has no Storage Table Data Contributor on the conversations table (param tableName)",
    ]


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
