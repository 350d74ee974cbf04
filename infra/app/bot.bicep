// The Azure Bot: a user-assigned managed identity bot (no secret anywhere) whose messaging
// endpoint is the Function App, with the Microsoft Teams channel on; and, when an app registration
// for signing users in is given, its OAuth connection (tools that act as the user, Teams SSO).
param name string
param tags object
param displayName string
param sku string
param messagingEndpoint string
param identityId string
param identityClientId string
param tenantId string
@description('Client ID of the Entra app registration users sign in to; empty: no OAuth connection.')
param signInAppId string = ''
@description('The OAuth connection\'s name (what tools name in asUser).')
param signInConnectionName string = 'sso'
@description('The unique identifier of the federated credential on that app that trusts the Bot Service token store (docs/deploy.md).')
param signInUniqueIdentifier string = ''
@description('Scopes the connection asks for, space-separated; empty: the app\'s own access_as_user (an exchangeable token for on-behalf-of).')
param signInScopes string = ''

resource bot 'Microsoft.BotService/botServices@2022-09-15' = {
  name: name
  location: 'global'
  tags: tags
  kind: 'azurebot'
  sku: {
    name: sku
  }
  properties: {
    displayName: displayName
    endpoint: messagingEndpoint
    msaAppId: identityClientId
    msaAppMSIResourceId: identityId
    msaAppTenantId: tenantId
    msaAppType: 'UserAssignedMSI'
  }
}

resource teams 'Microsoft.BotService/botServices/channels@2022-09-15' = {
  parent: bot
  name: 'MsTeamsChannel'
  location: 'global'
  properties: {
    channelName: 'MsTeamsChannel'
    properties: {
      enableCalling: false
      isEnabled: true
    }
  }
}

// The OAuth connection: Entra ID v2 with federated credentials, so no client secret exists: the
// token store signs in as the app through a federated credential (docs/deploy.md gives the steps in
// Entra). Its Token Exchange URL is the app ID URI Teams SSO needs (api://botid-<app ID>).
resource signInConnection 'Microsoft.BotService/botServices/connections@2022-09-15' = if (!empty(signInAppId)) {
  parent: bot
  name: signInConnectionName
  location: 'global'
  properties: {
    serviceProviderDisplayName: 'AAD v2 with Federated Credentials'
    serviceProviderId: 'c00b44ab-5e16-c44c-af26-2fd5bc55eb18'
    clientId: signInAppId
    scopes: empty(signInScopes) ? 'api://botid-${signInAppId}/access_as_user' : signInScopes
    parameters: [
      {
        key: 'ClientId'
        value: signInAppId
      }
      {
        key: 'UniqueIdentifier'
        value: signInUniqueIdentifier
      }
      {
        key: 'TokenExchangeUrl'
        value: 'api://botid-${signInAppId}'
      }
      {
        key: 'TenantId'
        value: tenantId
      }
    ]
  }
}

output name string = bot.name
