// One private endpoint (a storage service or the Azure OpenAI account) in the private endpoints
// subnet, with the private DNS zone that makes the resource's usual host name resolve to it
// from inside the virtual network. Called once per service by main.bicep in private mode.
param name string
param location string
param tags object
@description('Resource ID of the storage account or Azure OpenAI account.')
param serviceId string
@description('Sub-resource: blob, queue, table, or account (Azure OpenAI).')
param groupId string
@description('Its private link zone, e.g. privatelink.blob.core.windows.net.')
param dnsZoneName string
param subnetId string
param vnetId string

resource dnsZone 'Microsoft.Network/privateDnsZones@2024-06-01' = {
  name: dnsZoneName
  location: 'global'
  tags: tags
}

resource dnsZoneLink 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2024-06-01' = {
  parent: dnsZone
  name: '${name}-link'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: vnetId
    }
  }
}

resource endpoint 'Microsoft.Network/privateEndpoints@2024-01-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: name
        properties: {
          privateLinkServiceId: serviceId
          groupIds: [
            groupId
          ]
        }
      }
    ]
  }
}

resource dnsZoneGroup 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-01-01' = {
  parent: endpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: groupId
        properties: {
          privateDnsZoneId: dnsZone.id
        }
      }
    ]
  }
}
