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
#
# The service's own options come from `cim.containers.<name>.service`: its definitions are
# handed to the container's module system unchanged, as definitions of
# `services.cim.<name>`, so that module's types check them (and name them in errors). Every
# host file the service then hands over with `LoadCredential=` (archive targets' credentials
# files, the hub's configFile and secretFiles, ...) is bind-mounted read-only at the same
# path, read back from the container's rendered unit, so no service's option layout is
# repeated here. The container's unit on the host (`container@cim-<name>.service`) carries
# the service's memory cap (plus the container's own processes) and CPU weight: inside the
# container, the service's CPUWeight= only weighs it against the container's other units.
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
    mkDefault
    mkEnableOption
    mkIf
    mkOption
    optionalAttrs
    types
    ;

  hostConfig = config;
  shared = config.cim.containers;
  cfg = config.cim.containers.${name};
  option = "cim.containers.${name}";

  httpPort = 9700 + index;
  credentialsInside = "/run/cim/nats.creds";
  environmentInside = "/run/cim/service.env";

  # What the container sets itself; in `service` they are refused, with where they belong.
  reserved = {
    enable = "the container runs the service when `${option}.enable` is set";
    package = "the package is the host's `services.cim.${name}.package`";
    natsUrl = "set `cim.containers.natsUrl`";
    jetstreamDomain = "set `cim.containers.jetstreamDomain`";
    tier = "set `cim.containers.tier`";
    httpListen = "the container listens on 0.0.0.0:${toString httpPort}";
    natsCredentialsFile = "set `${option}.natsCredentialsFile`";
    environmentFile = "set `${option}.environmentFile`";
  };

  # Like nixpkgs' types.deferredModule, for one option subtree: the value is a module that
  # carries every definition, with its file, into the container's evaluation.
  serviceDefinitions = lib.mkOptionType {
    name = "cimServiceDefinitions";
    description = "definitions of the container's services.cim.${name}";
    check = builtins.isAttrs;
    merge = _loc: defs: {
      imports = map (
        d:
        let
          bad = builtins.filter (n: reserved ? ${n}) (builtins.attrNames d.value);
          first = builtins.head bad;
        in
        if bad != [ ] then
          throw "${option}.service.${first} (in `${d.file}'): ${reserved.${first}}"
        else
          {
            _file = d.file;
            config.services.cim.${name} = d.value;
          }
      ) defs;
    };
  };

  # The container's own evaluation, as the host sees it.
  inner = hostConfig.containers."cim-${name}".config;
  innerService = inner.services.cim.${name};
  innerUnit = inner.systemd.services."cim-${name}".serviceConfig;

  # Host files the service reads: its LoadCredential= paths (but the NATS credentials,
  # mounted at a path of their own), and the plugin host's allowedDirectories.
  hostFiles = lib.unique (
    builtins.filter (p: p != credentialsInside) (
      map (c: builtins.head (builtins.match "[^:]*:(.*)" c)) (innerUnit.LoadCredential or [ ])
    )
    ++ builtins.attrValues (innerService.allowedDirectories or { })
  );

  # A systemd size (`256M`, `1G`, bytes) in MiB, rounded up; null for anything else
  # (`infinity`, `50%`).
  mebibytes =
    size:
    let
      m = builtins.match "0*([1-9][0-9]*|0)([KMGT]?)" size;
      n = builtins.fromJSON (builtins.head m);
      unit = builtins.elemAt m 1;
    in
    if m == null then
      null
    else if unit == "" then
      (n + 1048575) / 1048576
    else if unit == "K" then
      (n + 1023) / 1024
    else if unit == "M" then
      n
    else if unit == "G" then
      n * 1024
    else
      n * 1048576;
  containerOverhead = 128;
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

    service = mkOption {
      type = serviceDefinitions;
      default = { };
      example = lib.literalExpression ''
        {
          archiveTargets = [
            { name = "nas"; endpoint = "http://nas.local:9000"; bucket = "cim";
              credentialsFile = "/run/keys/cim-archive-nas"; }
          ];
          memoryMax = "512M";
        }
      '';
      description = ''
        The service's own options inside the container: definitions of
        `services.cim.${name}` there (see that module), checked by its types. Files they
        name on the host (credentials files, configuration files, plugin directories) are
        bind-mounted read-only into the container at the same path. `enable`, `package`,
        `natsUrl`, `jetstreamDomain`, `tier`, `httpListen`, `natsCredentialsFile` and
        `environmentFile` are set by the container and refused here.
      '';
    };

    memoryMax = mkOption {
      type = types.nullOr (types.strMatching "[0-9]+[KMGT]?|[0-9]+%|infinity");
      default =
        let
          mib = if cfg.enable then mebibytes innerService.memoryMax else null;
        in
        if mib == null then null else "${toString (mib + containerOverhead)}M";
      defaultText = lib.literalMD "the service's `memoryMax` plus ${toString containerOverhead}M (the container's systemd and journald), null when that is no plain size";
      example = "1G";
      description = ''
        Hard memory cap of the whole container (`MemoryMax=` of `container@cim-${name}.service`
        on the host); null: none. The service's own `memoryMax` still caps its unit inside.
      '';
    };

    cpuWeight = mkOption {
      type = types.ints.between 1 10000;
      default = if cfg.enable then innerService.cpuWeight else 100;
      defaultText = lib.literalMD "the service's `cpuWeight`";
      description = ''
        Share of CPU of the whole container under contention (`CPUWeight=` of
        `container@cim-${name}.service` on the host). The service's own `cpuWeight` only
        weighs it against the other units inside the container.
      '';
    };
  };

  config = mkIf cfg.enable {
    # The bind-mounted state directory must exist, root-only, as systemd requires of
    # /var/lib/private (where DynamicUser= services keep their StateDirectory=).
    systemd.tmpfiles.rules = [ "d ${shared.stateRoot}/${name} 0700 root root -" ];

    # Adds to the unit nixos-containers declares for the container.
    systemd.services."container@cim-${name}".serviceConfig =
      {
        CPUWeight = cfg.cpuWeight;
      }
      // optionalAttrs (cfg.memoryMax != null) { MemoryMax = cfg.memoryMax; };

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
        }
        // builtins.listToAttrs (
          map (path: {
            name = path;
            value = {
              hostPath = path;
              isReadOnly = true;
            };
          }) hostFiles
        );

      config = {
        imports = [
          ../nixos-modules/${name}.nix
          cfg.service
        ];

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
          # Report the physical node, not the container's host name (`service.node` may
          # say otherwise).
          node = mkIf (hostConfig.networking.hostName != "") (mkDefault hostConfig.networking.hostName);
        };

        networking.firewall.allowedTCPPorts = [ httpPort ];
        system.stateVersion = hostConfig.system.stateVersion;
      };
    };
  };
}
