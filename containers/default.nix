# Host module: one declarative nixos-container per CIM service, each off until
# `cim.containers.<name>.enable = true`. The containers talk to the nats-server on the host
# (a CIM leaf, or a hub cluster node) over their veth pair.
#
# Outbound traffic beyond the host (S3 for storage-manager, webhooks for integration-hub)
# needs NAT on the host, which depends on its interfaces and is left to it, e.g.
#   networking.nat = { enable = true; internalInterfaces = [ "ve-+" ]; externalInterface = "eth0"; };
{ config, lib, ... }:

let
  inherit (lib)
    any
    mkDefault
    mkIf
    mkOption
    types
    ;

  names = import ../nixos-modules/service-names.nix;
  cfg = config.cim.containers;
  anyEnabled = any (name: cfg.${name}.enable) names;

  leaf = config.services.cim.nats-leaf;
  hub = config.services.cim.nats-cluster-node;
in
{
  imports = [
    # The host needs the service options too: the containers take their packages from them.
    ../nixos-modules
    ./information-unit.nix
    ./registry.nix
    ./pipeline-engine.nix
    ./plugin-host.nix
    ./storage-manager.nix
    ./ui-gateway.nix
    ./integration-hub.nix
  ];

  options.cim.containers = {
    hostAddress = mkOption {
      type = types.str;
      default = "10.233.0.1";
      description = "IPv4 address of the host's end of every container's veth pair.";
    };

    natsUrl = mkOption {
      type = types.str;
      default = "nats://${cfg.hostAddress}:${toString config.services.nats.port}";
      defaultText = lib.literalExpression ''"nats://''${config.cim.containers.hostAddress}:''${toString config.services.nats.port}"'';
      description = "NATS URL(s) the services in the containers connect to.";
    };

    jetstreamDomain = mkOption {
      type = types.nullOr types.str;
      default =
        if leaf.enable then
          leaf.domain
        else if hub.enable then
          hub.domain
        else
          null;
      defaultText = lib.literalMD "the domain of the host's NATS profile (`nats-leaf` or `nats-cluster-node`)";
      description = "JetStream domain of the services in the containers.";
    };

    tier = mkOption {
      type = types.enum [
        "leaf"
        "cluster"
      ];
      default = if hub.enable then "cluster" else "leaf";
      defaultText = lib.literalMD "`cluster` on a hub cluster node, else `leaf`";
      description = "Tier of the services in the containers.";
    };

    stateRoot = mkOption {
      type = types.str;
      default = "/var/lib/cim-containers";
      description = "Host directory holding each container's bind-mounted service state.";
    };
  };

  config = mkIf anyEnabled {
    # The leaf's nats-server listens on loopback by default; the containers come in over
    # their veth pairs.
    services.cim.nats-leaf.listenAddress = mkDefault "0.0.0.0";

    # ... and only there: the firewall stays closed on every other interface. "+" is the
    # iptables wildcard (the default firewall backend); untried with networking.nftables.
    networking.firewall.interfaces."ve-+".allowedTCPPorts = [ config.services.nats.port ];
  };
}
