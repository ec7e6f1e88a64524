# All CIM NixOS modules: the seven services (each off until `services.cim.<name>.enable`),
# the two NATS host profiles (off until `services.cim.nats-leaf.enable` or
# `services.cim.nats-cluster-node.enable`), and the per-service NATS users (off until
# `services.cim.nats-auth.enable`).
{
  imports = [
    ./information-unit.nix
    ./registry.nix
    ./pipeline-engine.nix
    ./plugin-host.nix
    ./storage-manager.nix
    ./ui-gateway.nix
    ./integration-hub.nix
    ./nats-leaf.nix
    ./nats-cluster-node.nix
    ./nats-auth.nix
  ];
}
