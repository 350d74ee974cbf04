// Storage for the app: the Functions host (blobs), the Flex Consumption deployment package
// container, the conversations table, for the turns accepted but not yet answered an inbox
// table and a queue (with its poison queue), and the sign-in table (sign-ins asked for, single
// sign-on exchanges claimed; never a token).
// Entra ID only: shared keys are off. Each data role sits on the one container, table or queue it
// is for (docs/deploy.md has the table; infra/policy.py checks).
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
@description('The queue of accepted message activities that the `answer` function runs (CHAT_TURN_QUEUE); the host moves a message that fails maxDequeueCount times to <name>-poison.')
@minLength(3)
@maxLength(56)
param turnQueueName string = 'chat-turns'

var roles = {
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor
  queueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88' // Storage Queue Data Contributor
  queueDataMessageSender: 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a' // Storage Queue Data Message Sender
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

// Accepted message activities, kept until their turn is delivered (shared/inbox.py names it after
// the conversations table: its first 58 characters + 'inbox'); the queue message points at a row.
resource inboxTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: '${take(tableName, 58)}inbox'
}

// Sign-ins asked for and single sign-on exchanges claimed (shared/signin_store.py names it after the
// conversations table: its first 57 characters + 'signin'). Users' tokens stay in the Bot Service
// token store, never here.
resource signInTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: '${take(tableName, 57)}signin'
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

// Accepted message activities: the webhook enqueues one per message (CHAT_TURN_QUEUE) and the
// queue-triggered `answer` function runs the turn (function_app.py).
resource turnQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: turnQueueName
}

// Where the Functions host moves a message after its last attempt (host.json maxDequeueCount):
// the host names it after the trigger's queue plus '-poison'. Declared so that it can be a role's
// scope and the host never needs to create it (docs/deploy.md: the poison queue).
resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: '${turnQueueName}-poison'
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

// The inbox of accepted activities: the webhook writes a row, the `answer` function reads and
// removes it, the retention timer purges leftovers.
resource appInboxTableRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(inboxTable.id, identityPrincipalId, roles.tableDataContributor)
  scope: inboxTable
  properties: {
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.tableDataContributor)
  }
}

// The sign-in table: the webhook notes sign-ins asked for and claims exchanges; the retention timer
// and a user's removal delete its rows.
resource appSignInTableRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(signInTable.id, identityPrincipalId, roles.tableDataContributor)
  scope: signInTable
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

// The turn queue, for the app and the host's queue trigger (AzureWebJobsStorage): the webhook adds
// messages; the trigger reads the queue's length to scale, gets and deletes messages, and updates
// them (it renews a running message's visibility, and releases a failed one for its next attempt:
// Update Message needs .../queues/messages/write, which Storage Queue Data Reader and Message
// Processor, the roles the Functions docs list for a trigger, do not hold; MicrosoftDocs/azure-docs
// issue 120932). Storage Queue Data Contributor is the one built-in role with all of these.
resource appTurnQueueRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(turnQueue.id, identityPrincipalId, roles.queueDataContributor)
  scope: turnQueue
  properties: {
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.queueDataContributor)
  }
}

// The poison queue: the host only adds the failed message there (it deletes it from the turn queue).
resource appPoisonQueueRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(poisonQueue.id, identityPrincipalId, roles.queueDataMessageSender)
  scope: poisonQueue
  properties: {
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.queueDataMessageSender)
  }
}

// The deploying user looks at failed turns (peek, then take off) in the poison queue and puts them
// back on the turn queue (docs/deploy.md: the poison queue).
resource userPoisonQueueRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(poisonQueue.id, userPrincipalId, roles.queueDataContributor)
  scope: poisonQueue
  properties: {
    principalId: userPrincipalId
    principalType: userPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.queueDataContributor)
  }
}

resource userTurnQueueRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(turnQueue.id, userPrincipalId, roles.queueDataMessageSender)
  scope: turnQueue
  properties: {
    principalId: userPrincipalId
    principalType: userPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.queueDataMessageSender)
  }
}

output name string = storage.name
output blobEndpoint string = 'https://${storage.name}.blob.${environment().suffixes.storage}'
output queueEndpoint string = 'https://${storage.name}.queue.${environment().suffixes.storage}'
output tableEndpoint string = 'https://${storage.name}.table.${environment().suffixes.storage}'
output id string = storage.id
output tableName string = conversationsTable.name
output inboxTableName string = inboxTable.name
output signInTableName string = signInTable.name
output turnQueueName string = turnQueue.name
