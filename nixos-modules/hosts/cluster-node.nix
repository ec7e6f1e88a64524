# Example hub cluster node: one of three nats-servers in the JetStream domain `hub`
# (streams R3), accepting leaf nodes, with a replica of each of the seven services.
{
  # 1, 2 or 3.
  index,
  # Addresses of all three nodes, this one included.
  addresses,
  # JetStream domains of the leaves attached to the hub whose streams the cluster's storage
  # managers mirror (`services.cim.storage-manager.sourceLeaves`), e.g. [ "leaf" ].
  leafDomains ? [ ],
}:

{ config, lib, ... }:

let
  names = import ../service-names.nix;
  node = config.services.cim.nats-cluster-node;
in
{
  networking.hostName = lib.mkDefault "cim-node-${toString index}";

  services.cim = lib.mkMerge [
    (lib.genAttrs names (_: {
      enable = true;
      tier = "cluster";
      natsUrl = "nats://127.0.0.1:${toString node.port}";
      jetstreamDomain = node.domain;
    }))
    { storage-manager.sourceLeaves = leafDomains; }
    {
      nats-cluster-node = {
        enable = true;
        routes = map (address: "nats-route://${address}:${toString node.clusterPort}") addresses;
        # The routes must reach the other nodes. There is no TLS or authentication on these
        # ports yet (a later issue): the nodes' network must be private.
        openFirewall = true;
      };
    }
  ];
}
