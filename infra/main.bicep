// chatstate: a Teams chat bot on Azure Functions Flex Consumption that keeps each conversation in
// Table Storage and answers with Azure OpenAI. One user-assigned managed identity is the app's
// only credential, for storage, the model and the bot: no keys or secrets anywhere.
//
// Deploy with `azd up`, or `az deployment group create -g <group> -f infra/main.bicep
// -p environmentName=<name>` (see docs/deploy.md).
targetScope = 'resourceGroup'

@minLength(1)
@maxLength(64)
@description('Name of the environment (azd env name); part of the resource token and a tag.')
param environmentName string

@description('Region of every resource (the bot is global); must offer Flex Consumption.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string = resourceGroup().location

@description('Object ID of the deploying user, given table data access to inspect conversations; empty for none.')
param principalId string = ''

@allowed(['User', 'Group', 'ServicePrincipal'])
param principalType string = 'User'

// --- storage ---
@minLength(3)
@maxLength(63)
@description('The conversations table (CHAT_TABLE_NAME).')
param tableName string = 'conversations'

// --- model ---
@description('Endpoint of an existing Azure OpenAI account to use instead of creating one; empty creates one.')
param existingOpenAiEndpoint string = ''

@description('Chat deployment name on the existing account (defaults to openAiDeploymentName).')
param existingOpenAiDeployment string = ''

@description('Resource ID of the existing account, to grant the app Cognitive Services OpenAI User on it; empty to grant it yourself.')
param existingOpenAiResourceId string = ''

@description('Region of the created Azure OpenAI account (model availability differs by region); empty: location.')
param openAiLocation string = ''

param openAiDeploymentName string = 'gpt-4o-mini'
param openAiModelName string = 'gpt-4o-mini'
param openAiModelVersion string = '2024-07-18'

@allowed(['GlobalStandard', 'Standard', 'DataZoneStandard'])
param openAiDeploymentSku string = 'GlobalStandard'

@description('Capacity of the model deployment, in thousands of tokens per minute.')
@minValue(1)
param openAiCapacity int = 30

@description('OPENAI_API_VERSION')
param openAiApiVersion string = '2024-10-21'

// --- chat behaviour (shared/settings.py describes each; defaults match it) ---
param chatInstructions string = 'You are a helpful, concise assistant in a chat.'
@minValue(16)
param chatHistoryTokenBudget int = 8000
@minValue(1)
@maxValue(5000)
param chatHistoryMaxMessages int = 200
@minValue(1)
param chatMaxReplyTokens int = 1000
@description('Seconds; may be fractional.')
param chatModelTimeoutSeconds string = '30'
@minValue(0)
@maxValue(10)
param chatModelMaxRetries int = 2
@minValue(1)
@maxValue(20)
param chatMaxToolRounds int = 5
@description('Seconds; may be fractional.')
param chatToolTimeoutSeconds string = '10'
@minValue(1)
@maxValue(20)
param chatTurnMaxAttempts int = 8
@allowed(['on', 'off'])
param chatSummary string = 'on'
@minValue(64)
@maxValue(5000)
param chatSummaryTokenBudget int = 1000
@description('NCRONTAB schedule of the retention timer (CHAT_RETENTION_SCHEDULE); retention itself is off until CHAT_RETENTION_DAYS is set.')
param chatRetentionSchedule string = '0 30 3 * * *'

// --- retention, spend limits, streaming and feedback (azd: the app settings' own names) ---
@description('CHAT_RETENTION_DAYS: delete conversations idle longer than this many days (1-36500); empty: keep them.')
param chatRetentionDays string = ''
@description('CHAT_MAX_TURNS_PER_MINUTE: answered turns per conversation per UTC minute; empty: no limit.')
param chatMaxTurnsPerMinute string = ''
@description('CHAT_DAILY_TOKEN_LIMIT: model tokens per conversation per UTC day; empty: no limit.')
param chatDailyTokenLimit string = ''
@description('CHAT_USER_DAILY_TOKEN_LIMIT: model tokens per user per UTC day, across their conversations, reserved before each call; empty: no limit.')
param chatUserDailyTokenLimit string = ''
@description('CHAT_USER_TURNS_PER_MINUTE: answered turns per user per UTC minute, across their conversations; empty: no limit.')
param chatUserTurnsPerMinute string = ''
@description('CHAT_TENANT_DAILY_TOKEN_LIMIT: model tokens per Entra tenant per UTC day, all its users together; empty: no limit.')
param chatTenantDailyTokenLimit string = ''
@description('CHAT_STREAMING: stream replies in Teams personal chats.')
@allowed(['on', 'off'])
param chatStreaming string = 'on'
@description('CHAT_STREAMING_INFORMATIVE: the update a streamed turn shows at once.')
@maxLength(1000)
param chatStreamingInformative string = 'Thinking…'
@description('CHAT_FEEDBACK: like/dislike buttons on AI replies, ratings stored with the turn.')
@allowed(['on', 'off'])
param chatFeedback string = 'on'

// --- bot and hosting ---
@allowed(['F0', 'S1'])
param botSku string = 'F0'
param botDisplayName string = 'chatstate'

// --- network ---
@description('Private mode: VNet integration, private endpoints for storage and Azure OpenAI, their public network access off (azd: VNET_ENABLED).')
param vnetEnabled bool = false

@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100
@description('Chats one instance serves at once (Flex Consumption HTTP perInstanceConcurrency; the Python default is 1). docs/deploy.md explains 16.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 16

// --- durable queue: the webhook accepts, the `answer` function runs the turn (issue 19) ---
@description('queue: POST /api/messages enqueues a message activity and returns at once, the queue-triggered `answer` function runs the turn; inline: the turn runs inside the POST (CHAT_ANSWER_MODE).')
@allowed(['queue', 'inline'])
param chatAnswerMode string = 'queue'
@description('The Storage queue of accepted turns (CHAT_TURN_QUEUE); the host moves failed messages to <name>-poison, so at most 56 characters.')
@minLength(3)
@maxLength(56)
param chatTurnQueue string = 'chat-turns'
@description('together: messages that arrive while a turn of the same conversation runs are answered together in the next turn; each: one by one, in order (CHAT_BURST).')
@allowed(['together', 'each'])
param chatBurst string = 'together'
@description('Seconds a worker holds a conversation unless it renews the hold: what a crashed worker costs its conversation (CHAT_HOLD_SECONDS).')
@minValue(5)
@maxValue(600)
param chatHoldSeconds int = 30
@description('Seconds a worker answers one conversation before it hands the rest to a new queue message; keep it well under functionTimeout (CHAT_DRAIN_SECONDS).')
@minValue(5)
@maxValue(3600)
param chatDrainSeconds int = 60
@description('Always-ready instances of the `answer` function (Flex Consumption alwaysReady `function:answer`), billed around the clock at the baseline rate; 0 scales it to zero. docs/deploy.md explains the trade-off (azd: ANSWER_ALWAYS_READY).')
@minValue(0)
@maxValue(100)
param answerAlwaysReady int = 0

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = '${abbrs.webSitesFunctions}chatstate-${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var useExistingOpenAi = !empty(existingOpenAiEndpoint)
var effectiveOpenAiLocation = empty(openAiLocation) ? location : openAiLocation
// A well-formed ID when none is given, so the unused scope below still evaluates.
var existingOpenAiIdParts = split(empty(existingOpenAiResourceId) ? resourceId('Microsoft.CognitiveServices/accounts', 'none') : existingOpenAiResourceId, '/')

// The app's only credential: storage, Azure OpenAI, telemetry, and the bot's own app identity.
resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${abbrs.managedIdentityUserAssignedIdentities}chatstate-${resourceToken}'
  location: location
  tags: tags
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
    tableName: tableName
    identityPrincipalId: identity.properties.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
    vnetEnabled: vnetEnabled
    turnQueueName: chatTurnQueue
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
    identityPrincipalId: identity.properties.principalId
  }
}

module openAi 'app/openai.bicep' = if (!useExistingOpenAi) {
  name: 'openai'
  params: {
    name: '${abbrs.cognitiveServicesOpenAi}${resourceToken}'
    location: effectiveOpenAiLocation
    tags: tags
    deploymentName: openAiDeploymentName
    modelName: openAiModelName
    modelVersion: openAiModelVersion
    deploymentSku: openAiDeploymentSku
    capacity: openAiCapacity
    identityPrincipalId: identity.properties.principalId
    vnetEnabled: vnetEnabled
  }
}

module existingOpenAiAccess 'app/openai-access.bicep' = if (useExistingOpenAi && !empty(existingOpenAiResourceId)) {
  name: 'openai-access'
  scope: resourceGroup(existingOpenAiIdParts[2], existingOpenAiIdParts[4])
  params: {
    accountName: last(existingOpenAiIdParts)
    identityPrincipalId: identity.properties.principalId
  }
}

// Private mode: the app joins a virtual network and reaches storage (blob for the host and the
// package, queue, table for the conversations) and the created Azure OpenAI account through
// private endpoints; their public network access is off (app/storage.bicep, app/openai.bicep).
module vnet 'app/vnet.bicep' = if (vnetEnabled) {
  name: 'vnet'
  params: {
    name: '${abbrs.networkVirtualNetworks}${resourceToken}'
    location: location
    tags: tags
  }
}

// Empty in the public mode (pycep, which check.sh parses with, reads no `[for ...: if (...)]`).
var storageEndpointServices = vnetEnabled ? [
  'blob'
  'queue'
  'table'
] : []

module storageEndpoints 'app/private-endpoint.bicep' = [for service in storageEndpointServices: {
  name: 'pe-storage-${service}'
  params: {
    name: '${abbrs.networkPrivateEndpoints}${service}-${resourceToken}'
    location: location
    tags: tags
    serviceId: storage.outputs.id
    groupId: service
    dnsZoneName: 'privatelink.${service}.${environment().suffixes.storage}'
    subnetId: vnet.outputs.privateEndpointSubnetId
    vnetId: vnet.outputs.id
  }
}]

module openAiEndpoint 'app/private-endpoint.bicep' = if (vnetEnabled && !useExistingOpenAi) {
  name: 'pe-openai'
  params: {
    name: '${abbrs.networkPrivateEndpoints}openai-${resourceToken}'
    location: location
    tags: tags
    serviceId: openAi.outputs.id
    groupId: 'account'
    dnsZoneName: 'privatelink.openai.azure.com'
    subnetId: vnet.outputs.privateEndpointSubnetId
    vnetId: vnet.outputs.id
  }
}

// Every setting shared/settings.py marks deployed=True; tests/unit/test_infra_drift.py keeps them in step.
var chatAppSettings = [
  {
    name: 'CHAT_STORAGE_TABLE_ENDPOINT'
    value: storage.outputs.tableEndpoint
  }
  {
    name: 'CHAT_TABLE_NAME'
    value: tableName
  }
  {
    name: 'AZURE_CLIENT_ID'
    value: identity.properties.clientId
  }
  {
    name: 'AZURE_OPENAI_ENDPOINT'
    value: useExistingOpenAi ? existingOpenAiEndpoint : openAi.outputs.endpoint
  }
  {
    name: 'AZURE_OPENAI_DEPLOYMENT'
    value: useExistingOpenAi && !empty(existingOpenAiDeployment) ? existingOpenAiDeployment : openAiDeploymentName
  }
  {
    name: 'OPENAI_API_VERSION'
    value: openAiApiVersion
  }
  {
    name: 'CHAT_INSTRUCTIONS'
    value: chatInstructions
  }
  {
    name: 'CHAT_HISTORY_TOKEN_BUDGET'
    value: string(chatHistoryTokenBudget)
  }
  {
    name: 'CHAT_HISTORY_MAX_MESSAGES'
    value: string(chatHistoryMaxMessages)
  }
  {
    name: 'CHAT_MAX_REPLY_TOKENS'
    value: string(chatMaxReplyTokens)
  }
  {
    name: 'CHAT_MODEL_TIMEOUT_SECONDS'
    value: chatModelTimeoutSeconds
  }
  {
    name: 'CHAT_MODEL_MAX_RETRIES'
    value: string(chatModelMaxRetries)
  }
  {
    name: 'CHAT_MAX_TOOL_ROUNDS'
    value: string(chatMaxToolRounds)
  }
  {
    name: 'CHAT_TOOL_TIMEOUT_SECONDS'
    value: chatToolTimeoutSeconds
  }
  {
    name: 'CHAT_SUMMARY'
    value: chatSummary
  }
  {
    name: 'CHAT_SUMMARY_TOKEN_BUDGET'
    value: string(chatSummaryTokenBudget)
  }
  {
    name: 'CLIENT_ID'
    value: identity.properties.clientId
  }
  {
    name: 'TENANT_ID'
    value: tenant().tenantId
  }
  {
    name: 'BOT_APP_TYPE'
    value: 'UserAssignedMSI'
  }
  {
    name: 'CHAT_TURN_MAX_ATTEMPTS'
    value: string(chatTurnMaxAttempts)
  }
  {
    // The timer trigger reads it as %CHAT_RETENTION_SCHEDULE%: the host needs it set.
    name: 'CHAT_RETENTION_SCHEDULE'
    value: chatRetentionSchedule
  }
  {
    name: 'CHAT_ANSWER_MODE'
    value: chatAnswerMode
  }
  {
    // The queue trigger reads it as %CHAT_TURN_QUEUE% (through AzureWebJobsStorage, app/api.bicep);
    // the webhook enqueues to it through CHAT_STORAGE_QUEUE_ENDPOINT.
    name: 'CHAT_TURN_QUEUE'
    value: chatTurnQueue
  }
  {
    name: 'CHAT_STORAGE_QUEUE_ENDPOINT'
    value: storage.outputs.queueEndpoint
  }
  {
    name: 'CHAT_BURST'
    value: chatBurst
  }
  {
    name: 'CHAT_HOLD_SECONDS'
    value: string(chatHoldSeconds)
  }
  {
    name: 'CHAT_DRAIN_SECONDS'
    value: string(chatDrainSeconds)
  }
  // retention, spend limits, streaming and feedback: empty means off (shared/settings.py)
  {
    name: 'CHAT_RETENTION_DAYS'
    value: chatRetentionDays
  }
  {
    name: 'CHAT_MAX_TURNS_PER_MINUTE'
    value: chatMaxTurnsPerMinute
  }
  {
    name: 'CHAT_DAILY_TOKEN_LIMIT'
    value: chatDailyTokenLimit
  }
  // budgets across conversations (docs/operate.md "Budgets"): empty means off
  {
    name: 'CHAT_USER_DAILY_TOKEN_LIMIT'
    value: chatUserDailyTokenLimit
  }
  {
    name: 'CHAT_USER_TURNS_PER_MINUTE'
    value: chatUserTurnsPerMinute
  }
  {
    name: 'CHAT_TENANT_DAILY_TOKEN_LIMIT'
    value: chatTenantDailyTokenLimit
  }
  {
    name: 'CHAT_STREAMING'
    value: chatStreaming
  }
  {
    name: 'CHAT_STREAMING_INFORMATIVE'
    value: chatStreamingInformative
  }
  {
    name: 'CHAT_FEEDBACK'
    value: chatFeedback
  }
]

module api 'app/api.bicep' = {
  name: 'api'
  params: {
    name: functionAppName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
    identityId: identity.id
    identityClientId: identity.properties.clientId
    storageBlobEndpoint: storage.outputs.blobEndpoint
    storageQueueEndpoint: storage.outputs.queueEndpoint
    storageTableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerName: deploymentContainerName
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    appSettings: chatAppSettings
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    answerAlwaysReady: answerAlwaysReady
    virtualNetworkSubnetId: vnetEnabled ? vnet.outputs.appSubnetId : ''
  }
  // Private mode: storage takes no public traffic, so the host's first start needs the endpoints.
  dependsOn: [
    storageEndpoints
    openAiEndpoint
  ]
}

module bot 'app/bot.bicep' = {
  name: 'bot'
  params: {
    name: '${abbrs.botServicesBots}${resourceToken}'
    tags: tags
    displayName: botDisplayName
    sku: botSku
    messagingEndpoint: 'https://${api.outputs.defaultHostName}/api/messages'
    identityId: identity.id
    identityClientId: identity.properties.clientId
    tenantId: tenant().tenantId
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = resourceGroup().name
output SERVICE_API_NAME string = api.outputs.name
output AZURE_FUNCTION_APP_NAME string = api.outputs.name
output FUNCTION_APP_URL string = 'https://${api.outputs.defaultHostName}'
output BOT_NAME string = bot.outputs.name
output BOT_APP_ID string = identity.properties.clientId
output BOT_MESSAGING_ENDPOINT string = 'https://${api.outputs.defaultHostName}/api/messages'
output CHAT_STORAGE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output CHAT_TABLE_NAME string = storage.outputs.tableName
output CHAT_STORAGE_QUEUE_ENDPOINT string = storage.outputs.queueEndpoint
output CHAT_TURN_QUEUE string = storage.outputs.turnQueueName
output AZURE_OPENAI_ENDPOINT string = useExistingOpenAi ? existingOpenAiEndpoint : openAi.outputs.endpoint
output AZURE_OPENAI_DEPLOYMENT string = useExistingOpenAi && !empty(existingOpenAiDeployment) ? existingOpenAiDeployment : openAiDeploymentName
output MANAGED_IDENTITY_CLIENT_ID string = identity.properties.clientId
