# Generator for the nixos-container of one CIM service:
#
#   import ./container.nix { name = "registry"; index = 2; }
#
# returns a host module that declares `cim.containers.<name>` and, when enabled, the
# declarative container `containers.cim-<name>`: its own network namespace (a veth pair to
# the host), the service's NixOS module inside, NATS reached at the host's address.
#
# The service's package is the one the host's own `services.cim.<name>.package` resolves to
# (the flake's build when the host imports `nixosModules.containers`), so one place pins it.
{
  # Service name, as in nixos-modules/service-names.nix.
  name,
  # 1..7: picks the container's default address (10.233.0.<10 + index>) and its health
  # port (9700 + index, the same as the service module's default).
  index,
}:

{ config, lib, ... }:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    optionalAttrs
    types
    ;

  hostConfig = config;
  shared = config.cim.containers;
  cfg = config.cim.containers.${name};

  httpPort = 9700 + index;
  credentialsInside = "/run/cim/nats.creds";
  environmentInside = "/run/cim/service.env";
  nonStorePath = types.nullOr (
    types.pathWith {
      inStore = false;
      absolute = true;
    }
  );
in
{
  options.cim.containers.${name} = {
    enable = mkEnableOption "the CIM ${name} service in its own nixos-container `cim-${name}`";

    localAddress = mkOption {
      type = types.str;
      default = "10.233.0.${toString (10 + index)}";
      description = "IPv4 address of the container's end of the veth pair.";
    };

    natsCredentialsFile = mkOption {
      type = nonStorePath;
      default = null;
      example = "/run/keys/cim-${name}.creds";
      description = ''
        NATS credentials file on the host. It is bind-mounted read-only into the container
        and handed to the service with `LoadCredential=`; it never enters the Nix store.
      '';
    };

    environmentFile = mkOption {
      type = nonStorePath;
      default = null;
      example = "/run/keys/cim-${name}.env";
      description = ''
        Environment file on the host (e.g. `CIM_NATS_URL` with the service's NATS user and
        password, see `services.cim.nats-auth`). It is bind-mounted read-only into the
        container and becomes the service's `environmentFile`. The URL must name the host's
        address as the containers see it (`cim.containers.hostAddress`).
      '';
    };
  };

  config = mkIf cfg.enable {
    # The bind-mounted state directory must exist, root-only, as systemd requires of
    # /var/lib/private (where DynamicUser= services keep their StateDirectory=).
    systemd.tmpfiles.rules = [ "d ${shared.stateRoot}/${name} 0700 root root -" ];

    containers."cim-${name}" = {
      autoStart = true;
      privateNetwork = true;
      hostAddress = shared.hostAddress;
      localAddress = cfg.localAddress;

      bindMounts =
        {
          # The service's scratch state (/var/lib/private/cim-<name>) lives on the host.
          "/var/lib/private" = {
            hostPath = "${shared.stateRoot}/${name}";
            isReadOnly = false;
          };
        }
        // optionalAttrs (cfg.natsCredentialsFile != null) {
          ${credentialsInside} = {
            hostPath = cfg.natsCredentialsFile;
            isReadOnly = true;
          };
        }
        // optionalAttrs (cfg.environmentFile != null) {
          ${environmentInside} = {
            hostPath = cfg.environmentFile;
            isReadOnly = true;
          };
        };

      config = {
        imports = [ ../nixos-modules/${name}.nix ];

        services.cim.${name} = {
          enable = true;
          package = hostConfig.services.cim.${name}.package;
          natsUrl = shared.natsUrl;
          natsCredentialsFile = if cfg.natsCredentialsFile != null then credentialsInside else null;
          environmentFile = if cfg.environmentFile != null then environmentInside else null;
          jetstreamDomain = shared.jetstreamDomain;
          tier = shared.tier;
          # Reachable from the host over the veth pair (for health checks and scraping).
          httpListen = "0.0.0.0:${toString httpPort}";
          # Report the physical node, not the container's host name.
          node = mkIf (hostConfig.networking.hostName != "") hostConfig.networking.hostName;
        };

        networking.firewall.allowedTCPPorts = [ httpPort ];
        system.stateVersion = hostConfig.system.stateVersion;
      };
    };
  };
}
