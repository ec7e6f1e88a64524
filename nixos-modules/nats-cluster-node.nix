# Host profile: the nats-server of one node of the CIM hub cluster. Three of these form a
# JetStream cluster (streams R3) in the domain `hub`, and accept leaf nodes.
#
# Builds on nixpkgs' `services.nats`; everything not covered here can still be set through
# `services.nats.settings`.
#
# Each service's own NATS identity on the client port: ./nats-auth.nix. Not done yet (a later
# issue): TLS and authentication on the route and leaf-node ports. Until then keep these
# ports on a private network (`openFirewall` opens them on every interface).
{ config, lib, ... }:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    optionalAttrs
    types
    ;

  cfg = config.services.cim.nats-cluster-node;
in
{
  options.services.cim.nats-cluster-node = {
    enable = mkEnableOption "nats-server as one node of the CIM hub cluster";

    serverName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "NATS server name; must be unique in the cluster.";
    };

    clusterName = mkOption {
      type = types.str;
      default = "cim-hub";
      description = "NATS cluster name; the same on every node.";
    };

    domain = mkOption {
      type = types.strMatching "[A-Za-z0-9_-]+";
      default = "hub";
      description = "JetStream domain of the cluster; the same on every node.";
    };

    listenAddress = mkOption {
      type = types.str;
      default = "0.0.0.0";
      description = "Address of the client, route and leaf-node ports.";
    };

    port = mkOption {
      type = types.port;
      default = 4222;
      description = "Client port.";
    };

    clusterPort = mkOption {
      type = types.port;
      default = 6222;
      description = "Route port (server to server).";
    };

    leafnodePort = mkOption {
      type = types.port;
      default = 7422;
      description = "Port that leaf nodes connect to.";
    };

    routes = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "nats-route://10.0.0.11:6222"
        "nats-route://10.0.0.12:6222"
        "nats-route://10.0.0.13:6222"
      ];
      description = ''
        Route URLs of the cluster's nodes. The same list may be given to every node: a
        server recognises and skips a route to itself.
      '';
    };

    monitorListen = mkOption {
      type = types.str;
      default = "127.0.0.1:8222";
      description = "Address of nats-server's monitoring endpoint (/healthz, /varz, /jsz).";
    };

    syncInterval = mkOption {
      type = types.nullOr types.str;
      default = "always";
      description = ''
        JetStream `sync_interval`. `always` fsyncs every write before it is acknowledged.
        R3 replication survives the loss of one node, but not nodes failing together (a
        shared power outage): Jepsen's 2025 analysis of NATS 2.12 lost acknowledged writes
        that way under the default. Null keeps nats-server's default (a background fsync
        every 2 minutes), trading that risk for write throughput.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the client, route and leaf-node ports in the firewall.";
    };
  };

  config = mkIf cfg.enable {
    services.nats = {
      enable = true;
      serverName = cfg.serverName;
      port = cfg.port;
      jetstream = true; # store_dir = services.nats.dataDir (/var/lib/nats)

      settings = {
        # mkForce: some nixpkgs versions also set `host` from a `services.nats.host` option.
        host = lib.mkForce cfg.listenAddress;
        http = cfg.monitorListen;

        jetstream =
          {
            domain = cfg.domain;
          }
          // optionalAttrs (cfg.syncInterval != null) {
            sync_interval = cfg.syncInterval;
          };

        cluster = {
          name = cfg.clusterName;
          listen = "${cfg.listenAddress}:${toString cfg.clusterPort}";
          routes = cfg.routes;
        };

        leafnodes.listen = "${cfg.listenAddress}:${toString cfg.leafnodePort}";
      };
    };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [
      cfg.port
      cfg.clusterPort
      cfg.leafnodePort
    ];
  };
}
