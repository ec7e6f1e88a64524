# The seven CIM services: crate, binary, NixOS module, systemd unit (cim-<name>) and
# container (cim-<name>) all use these names.
[
  "information-unit"
  "registry"
  "pipeline-engine"
  "plugin-host"
  "storage-manager"
  "ui-gateway"
  "integration-hub"
]
