// Storage for the app: the Functions host (blobs), the Flex Consumption deployment package
// container, and the conversations table. Entra ID only: shared keys are off. Each data role sits
// on the one container or table it is for (docs/deploy.md has the table; infra/policy.py checks).
param name string
param location string
param tags object
param deploymentContainerName string
param tableName string
@description('Principal ID of the app\'s user-assigned identity.')
param identityPrincipalId string
@description('Principal ID of the deploying user, given table access to inspect data; empty for none.')
param userPrincipalId string = ''
@allowed(['User', 'Group', 'ServicePrincipal'])
param userPrincipalType string = 'User'
@description('Private mode: public network access off; the app comes in through private endpoints.')
param vnetEnabled bool = false

var roles = {
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor
}
// The containers the Functions host writes through AzureWebJobsStorage: azure-webjobs-hosts holds
// its host lock, timer schedules and timer leases (one run per occurrence across instances),
// azure-webjobs-secrets its function keys. Declared here so each can be a role's scope.
var hostContainerNames = [
  'azure-webjobs-hosts'
  'azure-webjobs-secrets'
]

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    // Geo-redundant: the conversations are the only state this app keeps.
    name: 'Standard_GRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    dnsEndpointType: 'Standard'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    // Public mode: the app reaches storage over its public endpoint and Entra ID (no keys) is the
    // gate. Private mode: only the private endpoints in the app's virtual network.
    publicNetworkAccess: vnetEnabled ? 'Disabled' : 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: vnetEnabled ? 'Deny' : 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource hostContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for containerName in hostContainerNames: {
  parent: blobService
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource conversationsTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: tableName
}

// The platform writes the deployment package here with the app's identity and the host reads it.
resource deploymentBlobRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deploymentContainer.id, identityPrincipalId, roles.blobDataOwner)
  scope: deploymentContainer
  properties: {
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataOwner)
  }
}

// The host's own blobs (AzureWebJobsStorage): Storage Blob Data Owner is the role the Functions
// docs name for the host and for timer triggers, here on its two containers only.
resource hostBlobRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (containerName, i) in hostContainerNames: {
  name: guid(hostContainers[i].id, identityPrincipalId, roles.blobDataOwner)
  scope: hostContainers[i]
  properties: {
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataOwner)
  }
}]

// The app's conversations (CHAT_TABLE_NAME), and nothing else in table storage.
resource appTableRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(conversationsTable.id, identityPrincipalId, roles.tableDataContributor)
  scope: conversationsTable
  properties: {
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.tableDataContributor)
  }
}

resource userTableRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(conversationsTable.id, userPrincipalId, roles.tableDataContributor)
  scope: conversationsTable
  properties: {
    principalId: userPrincipalId
    principalType: userPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.tableDataContributor)
  }
}

output name string = storage.name
output blobEndpoint string = 'https://${storage.name}.blob.${environment().suffixes.storage}'
output queueEndpoint string = 'https://${storage.name}.queue.${environment().suffixes.storage}'
output tableEndpoint string = 'https://${storage.name}.table.${environment().suffixes.storage}'
output id string = storage.id
output tableName string = conversationsTable.name
