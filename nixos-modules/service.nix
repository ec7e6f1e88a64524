# Generator for the NixOS module of one CIM service. Every service binary takes the same
# options (crates/cim-runtime/src/config.rs), so one function writes all seven modules:
#
#   import ./service.nix { name = "registry"; description = "..."; httpPort = 9702; }
#
# returns a NixOS module that declares `services.cim.<name>` and, when enabled, a hardened
# systemd unit `cim-<name>.service`.
#
# The `package` option has no default here: the flake's `nixosModules.<name>` sets it to the
# flake's own build (`lib.mkDefault`), and anyone importing this file directly sets it.
{
  # Crate, binary and option name, e.g. "information-unit".
  name,
  # One line for the unit's Description=.
  description,
  # Default port of the health/metrics endpoint (/livez /readyz /metrics) on 127.0.0.1.
  # The binary's own default is port 0 (any free port); a unit gets a fixed one so that
  # monitoring can find it.
  httpPort,
  # WebAssembly JIT compilers need pages that are writable and then executable; every other
  # service runs with MemoryDenyWriteExecute=true.
  needsJit ? false,
  # The service's own options (`--<service>-<option>` flags), declared under
  # `services.cim.<name>`: a function of `lib` returning option declarations ...
  extraOptions ? (_lib: { }),
  # ... and how they become the binary's `CIM_<SERVICE>_<OPTION>` variables (a function of
  # `lib` and the service's config).
  extraEnvironmentOf ? (_lib: _cfg: { }),
  # ... and the files among them that systemd hands to the service with LoadCredential=
  # (secrets, and files that should stay root-only): a function of `lib` and the service's
  # config returning "ID:PATH" strings. The service reads each one as `%d/ID` (systemd
  # expands %d in Environment= to /run/credentials/cim-<name>.service), so the variable that
  # names the file must say `%d/ID`, never the host path. IDs must differ from `nats.creds`.
  extraCredentialsOf ? (_lib: _cfg: [ ]),
}:

{
  config,
  lib,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    optional
    optionalAttrs
    types
    ;

  cfg = config.services.cim.${name};
  unit = "cim-${name}";

  # What the binary checks at start (cim_events::token::validate_token): no '.', no
  # wildcards, no whitespace, printable ASCII, at most 128 bytes.
  token = types.strMatching "[!-)+--/-=?-~]{1,128}";

  natsOnThisHost = config.services.nats.enable or false;

  # Every LoadCredential= of the unit, one line each: this service's NATS identity and the
  # service module's own files.
  credentials =
    optional (cfg.natsCredentialsFile != null) "nats.creds:${cfg.natsCredentialsFile}"
    ++ extraCredentialsOf lib cfg;
  credentialIds = map (c: builtins.head (builtins.match "([^:]*):.*" c)) credentials;
  duplicateIds = builtins.filter (
    id: builtins.length (builtins.filter (x: x == id) credentialIds) > 1
  ) credentialIds;
in
{
  options.services.cim.${name} = extraOptions lib // {
    enable = mkEnableOption "the CIM ${name} service";

    package = mkOption {
      type = types.package;
      description = ''
        Package that provides `bin/${name}`. The flake's `nixosModules.${name}` sets this to
        `packages.<system>.${name}`.
      '';
    };

    natsUrl = mkOption {
      type = types.str;
      default = "nats://127.0.0.1:4222";
      example = "nats://10.0.0.11:4222,nats://10.0.0.12:4222";
      description = "NATS server URL(s), comma-separated (`CIM_NATS_URL`).";
    };

    natsCredentialsFile = mkOption {
      # A string, never a Nix path: a path literal would be copied into the world-readable
      # Nix store. The file is handed to the unit with LoadCredential=.
      type = types.nullOr (
        types.pathWith {
          inStore = false;
          absolute = true;
        }
      );
      default = null;
      example = "/run/keys/cim-${name}.creds";
      description = ''
        NATS credentials file (JWT + NKey seed) of this service's own NATS identity. systemd
        reads it as root and passes it to the service through `LoadCredential=`, so the file
        can stay root-only and never enters the Nix store. The service sees it as
        `CIM_NATS_CREDS=%d/nats.creds`.
      '';
    };

    environmentFile = mkOption {
      # Like natsCredentialsFile: a string, so that the file stays out of the Nix store.
      type = types.nullOr (
        types.pathWith {
          inStore = false;
          absolute = true;
        }
      );
      default = null;
      example = "/run/keys/cim-${name}.env";
      description = ''
        File of `KEY=value` lines that systemd reads (as root) when the unit starts
        (`EnvironmentFile=`); its settings override the unit's own environment. For secrets,
        e.g. this service's NATS user and password from `services.cim.nats-auth`:
        `CIM_NATS_URL=nats://${name}:<password>@127.0.0.1:4222`. It never enters the Nix store.
      '';
    };

    jetstreamDomain = mkOption {
      type = types.nullOr token;
      default = null;
      example = "leaf";
      description = "JetStream domain to use (`CIM_JS_DOMAIN`): the leaf's own, or `hub` on the cluster.";
    };

    tier = mkOption {
      type = types.enum [
        "leaf"
        "cluster"
      ];
      default = "leaf";
      description = "Where the service runs (`CIM_TIER`): `leaf` creates R1 streams, `cluster` R3.";
    };

    httpListen = mkOption {
      type = types.str;
      default = "127.0.0.1:${toString httpPort}";
      description = "Address of the health and metrics endpoint: /livez, /readyz, /metrics (`CIM_HTTP_LISTEN`).";
    };

    node = mkOption {
      type = types.nullOr token;
      # Set here rather than left to the binary: ProcSubset=pid hides /proc/sys, where the
      # binary would read the host name.
      default = if config.networking.hostName != "" then config.networking.hostName else null;
      defaultText = lib.literalMD "`config.networking.hostName`, or null when that is empty";
      example = "leaf-1";
      description = ''
        Node name the service reports (`CIM_NODE`). With null the binary falls back to
        `localhost`, because this unit cannot read /proc/sys/kernel/hostname.
      '';
    };

    shutdownGrace = mkOption {
      type = types.ints.positive;
      default = 10;
      description = ''
        Seconds in-flight work may take to finish after SIGTERM (`CIM_SHUTDOWN_GRACE`).
        The unit's `TimeoutStopSec` is this plus 5 seconds, so systemd never kills a service
        that is still inside its grace period.
      '';
    };

    heartbeatInterval = mkOption {
      type = types.strMatching "[0-9]+(ms|s|m|h)?";
      default = "5s";
      description = "Interval of heartbeats and readiness checks (`CIM_HEARTBEAT_INTERVAL`), at least 100ms.";
    };

    maxInFlight = mkOption {
      type = types.ints.between 1 65536;
      default = 64;
      description = "Most requests handled at once by this instance (`CIM_MAX_IN_FLIGHT`); more wait in NATS.";
    };

    memoryMax = mkOption {
      type = types.str;
      default = "256M";
      example = "1G";
      description = "Hard memory cap of the unit (systemd `MemoryMax=`). Memory is the scarce resource.";
    };

    cpuWeight = mkOption {
      type = types.ints.between 1 10000;
      default = 100;
      description = "Share of CPU under contention (systemd `CPUWeight=`); CPU may be overcommitted.";
    };

    extraEnvironment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        RUST_LOG = "info";
      };
      description = ''
        More environment variables, e.g. service-specific `CIM_<SERVICE>_<OPTION>` settings.
        They are written into the unit file in the Nix store: never put secrets here.
      '';
    };
  };

  config = mkIf cfg.enable {
    systemd.services.${unit} = {
      description = "CIM ${name}: ${description}";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ] ++ optional natsOnThisHost "nats.service";

      environment =
        {
          CIM_NATS_URL = cfg.natsUrl;
          CIM_TIER = cfg.tier;
          CIM_HTTP_LISTEN = cfg.httpListen;
          CIM_SHUTDOWN_GRACE = "${toString cfg.shutdownGrace}s";
          CIM_HEARTBEAT_INTERVAL = cfg.heartbeatInterval;
          CIM_MAX_IN_FLIGHT = toString cfg.maxInFlight;
        }
        // optionalAttrs (cfg.natsCredentialsFile != null) {
          # %d is systemd's credentials directory of this unit (/run/credentials/<unit>).
          CIM_NATS_CREDS = "%d/nats.creds";
        }
        // optionalAttrs (cfg.jetstreamDomain != null) { CIM_JS_DOMAIN = cfg.jetstreamDomain; }
        // optionalAttrs (cfg.node != null) { CIM_NODE = cfg.node; }
        // extraEnvironmentOf lib cfg
        // cfg.extraEnvironment;

      serviceConfig =
        {
          ExecStart = "${cfg.package}/bin/${name}";
          Restart = "on-failure";
          RestartSec = "2s";
          # Exit 64 is invalid configuration: restarting cannot fix it.
          RestartPreventExitStatus = 64;
          # SIGTERM is the graceful stop (the binary drains and exits 0).
          KillSignal = "SIGTERM";
          TimeoutStopSec = cfg.shutdownGrace + 5;

          MemoryMax = cfg.memoryMax;
          CPUWeight = cfg.cpuWeight;

          # No state a restart would lose lives here (it is all in JetStream); this is scratch
          # space only, e.g. caches. With DynamicUser it is /var/lib/private/cim-<name>.
          StateDirectory = unit;
          StateDirectoryMode = "0700";

          # Hardening.
          DynamicUser = true;
          UMask = "0077";
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          PrivateUsers = true;
          ProtectHostname = true;
          ProtectClock = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
          ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = !needsJit;
          RemoveIPC = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
          ];
          SystemCallErrorNumber = "EPERM";
        }
        // optionalAttrs (credentials != [ ]) {
          LoadCredential =
            if duplicateIds == [ ] then
              credentials
            else
              throw "services.cim.${name}: the credential ID `${builtins.head duplicateIds}' is used twice in LoadCredential=";
        }
        // optionalAttrs (cfg.environmentFile != null) {
          EnvironmentFile = cfg.environmentFile;
        };
    };
  };
}
