// An Azure OpenAI account (Entra ID only, no keys) with one chat model deployment; the app's
// identity may call it.
param name string
param location string
param tags object
param deploymentName string
param modelName string
param modelVersion string
param deploymentSku string
param capacity int
param identityPrincipalId string
@description('Private mode: public network access off; the app calls the model through a private endpoint.')
param vnetEnabled bool = false

var openAiUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd' // Cognitive Services OpenAI User

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  sku: {
    name: 'S0'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    // Public mode: the app calls the public endpoint and Entra ID (no keys) is the gate. Private
    // mode: only the private endpoint in the app's virtual network.
    publicNetworkAccess: vnetEnabled ? 'Disabled' : 'Enabled'
    networkAcls: {
      defaultAction: vnetEnabled ? 'Deny' : 'Allow'
    }
  }
}

resource deployment 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = {
  parent: account
  name: deploymentName
  sku: {
    name: deploymentSku
    capacity: capacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: modelName
      version: modelVersion
    }
  }
}

resource openAiUserRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, identityPrincipalId, openAiUser)
  scope: account
  properties: {
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', openAiUser)
  }
}

output id string = account.id
output endpoint string = account.properties.endpoint
output deploymentName string = deployment.name
