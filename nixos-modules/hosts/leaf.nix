# Example leaf host: nats-server as a leaf (own JetStream domain, streams R1), connected to
# the hub cluster, and all seven services next to it on loopback.
{
  # Addresses of the hub cluster's nodes; the leaf connects to their leaf-node ports.
  hubAddresses,
}:

{ config, lib, ... }:

let
  names = import ../service-names.nix;
  leaf = config.services.cim.nats-leaf;
in
{
  networking.hostName = lib.mkDefault "cim-leaf";

  services.cim =
    lib.genAttrs names (_: {
      enable = true;
      tier = "leaf";
      natsUrl = "nats://127.0.0.1:${toString leaf.port}";
      jetstreamDomain = leaf.domain;
    })
    // {
      nats-leaf = {
        enable = true;
        domain = "leaf";
        hubUrls = map (address: "nats-leaf://${address}:7422") hubAddresses;
      };
    };
}
