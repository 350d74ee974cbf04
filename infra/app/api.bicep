// The Flex Consumption (FC1) plan and the Linux Python Function App. The runtime is set by
// functionAppConfig (Flex Consumption rejects FUNCTIONS_WORKER_RUNTIME); the host reaches its
// storage with the user-assigned identity, never a key.
param name string
param planName string
param location string
param tags object
param identityId string
param identityClientId string
param storageBlobEndpoint string
param storageQueueEndpoint string
param storageTableEndpoint string
param deploymentContainerName string
param applicationInsightsConnectionString string
@description('The app\'s own settings, as [{ name, value }], added to the host settings below.')
param appSettings array
param pythonVersion string = '3.13'
param instanceMemoryMB int = 2048
param maximumInstanceCount int = 100
@description('Concurrent HTTP invocations one instance takes before the platform adds another.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int
@description('Always-ready instances of the queue-triggered `answer` function (its own scale group); 0 for none.')
@minValue(0)
param answerAlwaysReady int = 0
@description('Subnet (delegated to Microsoft.App/environments) the app joins; empty for none.')
param virtualNetworkSubnetId string = ''

// Settings of the Functions host and its telemetry (not the app's: see shared/settings.py).
var hostAppSettings = [
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identityClientId
  }
  {
    name: 'AzureWebJobsStorage__blobServiceUri'
    value: storageBlobEndpoint
  }
  {
    name: 'AzureWebJobsStorage__queueServiceUri'
    value: storageQueueEndpoint
  }
  {
    name: 'AzureWebJobsStorage__tableServiceUri'
    value: storageTableEndpoint
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: applicationInsightsConnectionString
  }
  {
    // Application Insights has local auth off: telemetry is sent with the identity's token.
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'ClientId=${identityClientId};Authorization=AAD'
  }
  {
    // The Python worker's OpenTelemetry mode (with host.json's telemetryMode): the host's trace
    // context becomes the parent of the app's spans. The app exports them itself
    // (shared/telemetry.py, the Azure Monitor distro).
    name: 'PYTHON_ENABLE_OPENTELEMETRY'
    value: 'true'
  }
]

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  // azd deploys the `api` service of azure.yaml to the app with this tag.
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    // Private mode: outbound calls (storage, the model) leave through this subnet and its private
    // endpoints. Inbound stays public: Bot Framework must reach /api/messages.
    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId
    siteConfig: {
      ftpsState: 'Disabled'
      http20Enabled: true
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      appSettings: concat(hostAppSettings, appSettings)
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}/${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
        // Python apps default to 1 here: one chat per instance, the async worker idle while the
        // model answers. docs/deploy.md explains the default main.bicep passes.
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
        // The queue-triggered `answer` function scales in its own group, apart from the HTTP
        // functions; always-ready instances of it skip the scale-out wait of a first message
        // after idle, and are billed while idle (docs/deploy.md: always-ready instances).
        alwaysReady: answerAlwaysReady > 0 ? [
          {
            name: 'function:answer'
            instanceCount: answerAlwaysReady
          }
        ] : []
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
