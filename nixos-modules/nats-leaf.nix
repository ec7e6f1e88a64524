# Host profile: the nats-server of a CIM leaf node. One server with JetStream under its own
# domain (streams R1), optionally connected to the hub cluster as a NATS leaf node, so that
# streams can be sourced/mirrored across domains (leaf -> cluster) and local work keeps
# going while the uplink is down.
#
# Builds on nixpkgs' `services.nats`; everything not covered here can still be set through
# `services.nats.settings`.
{ config, lib, ... }:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    optionalAttrs
    types
    ;

  cfg = config.services.cim.nats-leaf;

  # nats.service gets the hub credentials through LoadCredential=; nats-server reads them
  # from the unit's credentials directory.
  hubCredentials = "/run/credentials/nats.service/hub.creds";
in
{
  options.services.cim.nats-leaf = {
    enable = mkEnableOption "nats-server as a CIM leaf node (JetStream, own domain)";

    serverName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "NATS server name; unique among all servers the leaf connects to.";
    };

    domain = mkOption {
      type = types.strMatching "[A-Za-z0-9_-]+";
      default = "leaf";
      description = ''
        JetStream domain of this leaf. It must differ from the hub's (`hub`) and from the other
        leaves' domains that share the hub. Services on this host use it as `jetstreamDomain`.
      '';
    };

    listenAddress = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address the client port listens on. The services on this host connect over loopback;
        `containers/` sets `0.0.0.0` so that nixos-containers reach it over their veth (the
        host firewall still closes the port to everything else).
      '';
    };

    port = mkOption {
      type = types.port;
      default = 4222;
      description = "Client port.";
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
        Null keeps nats-server's default (a background fsync every 2 minutes).
      '';
    };

    hubUrls = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "nats-leaf://10.0.0.11:7422"
        "nats-leaf://10.0.0.12:7422"
        "nats-leaf://10.0.0.13:7422"
      ];
      description = "Leaf-node ports of the hub cluster. Empty: a standalone leaf with no uplink.";
    };

    hubCredentialsFile = mkOption {
      type = types.nullOr (
        types.pathWith {
          inStore = false;
          absolute = true;
        }
      );
      default = null;
      example = "/run/keys/cim-leaf-hub.creds";
      description = ''
        Credentials this leaf presents to the hub. Handed to nats.service with
        `LoadCredential=`, so the file never enters the Nix store.
      '';
    };
  };

  config = mkIf cfg.enable {
    services.nats = {
      enable = true;
      serverName = cfg.serverName;
      port = cfg.port;
      jetstream = true; # store_dir = services.nats.dataDir (/var/lib/nats)

      settings =
        {
          # mkForce: some nixpkgs versions also set `host` from a `services.nats.host` option.
          host = lib.mkForce cfg.listenAddress;
          http = cfg.monitorListen;

          jetstream =
            {
              domain = cfg.domain;
            }
            // optionalAttrs (cfg.syncInterval != null) {
              # Durability: fsync every write before acknowledging it. Jepsen's 2025 analysis
              # of NATS 2.12 lost acknowledged writes under the default 2-minute fsync
              # interval, and a single-node leaf has no replicas to fall back on.
              sync_interval = cfg.syncInterval;
            };
        }
        // optionalAttrs (cfg.hubUrls != [ ]) {
          leafnodes.remotes = [
            (
              {
                urls = cfg.hubUrls;
              }
              // optionalAttrs (cfg.hubCredentialsFile != null) {
                credentials = hubCredentials;
              }
            )
          ];
        };
    };

    systemd.services.nats.serviceConfig = mkIf (cfg.hubCredentialsFile != null) {
      LoadCredential = "hub.creds:${cfg.hubCredentialsFile}";
    };
  };
}
