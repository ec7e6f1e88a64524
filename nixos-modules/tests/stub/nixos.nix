# Stand-ins for the NixOS options that the CIM modules read or set (no nixpkgs code): the
# shapes, types and merge behaviour of those few options, declared with `lib` (the stand-in
# ./lib.nix, or nixpkgs' real lib on a machine that has it). This is NOT NixOS: the real
# `systemd.services`, `services.nats` and `containers` modules are only exercised on a Nix
# machine (docs/deploy.md, "What remains unverified").
{
  lib,
  # The package set the modules see as `pkgs` (./nixpkgs.nix's legacyPackages.<system>).
  pkgs,
  # Some nixpkgs versions of services.nats have a `host` option that sets settings.host;
  # the profiles must work with and without it.
  natsHasHostOption ? false,
}:

let
  inherit (lib) mkOption types;

  # pkgs.formats.json { }.type: any JSON value; attribute sets merge, lists concatenate.
  jsonValue =
    types.nullOr (
      types.oneOf [
        types.bool
        types.int
        types.float
        types.str
        types.path
        (types.attrsOf jsonValue)
        (types.listOf jsonValue)
      ]
    )
    // {
      description = "JSON value";
    };

  # A systemd unit setting (nixos/lib/systemd-unit-options.nix, simplified): lists
  # concatenate, scalars must agree.
  unitOption = types.oneOf [
    types.bool
    types.int
    types.str
    types.path
    types.package
    (types.listOf types.str)
  ];

  serviceType = types.submodule {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      wantedBy = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wants = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      after = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      environment = mkOption {
        type = types.attrsOf (
          types.nullOr (
            types.oneOf [
              types.str
              types.path
              types.package
            ]
          )
        );
        default = { };
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
    };
  };

  eval =
    modules:
    lib.evalModules {
      modules = [
        nixosOptions
        natsModule
      ]
      ++ modules;
      specialArgs = { inherit pkgs; };
    };

  nixosOptions = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      networking.hostName = mkOption {
        type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
        default = "nixos";
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      networking.firewall.interfaces = mkOption {
        type = types.attrsOf (
          types.submodule {
            options.allowedTCPPorts = mkOption {
              type = types.listOf types.port;
              default = [ ];
            };
          }
        );
        default = { };
      };
      system.stateVersion = mkOption { type = types.str; };
      systemd.services = mkOption {
        type = types.attrsOf serviceType;
        default = { };
      };
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      boot.loader.grub.enable = mkOption {
        type = types.bool;
        default = true;
      };
      fileSystems = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      nixpkgs.hostPlatform = mkOption {
        type = types.str;
        default = "x86_64-linux";
      };

      # nixos/modules/virtualisation/nixos-containers.nix, the options used. Like the real
      # one, `config` evaluates a whole system of its own from all its definitions.
      containers = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule (
            { name, ... }:
            {
              options = {
                autoStart = mkOption {
                  type = types.bool;
                  default = false;
                };
                privateNetwork = mkOption {
                  type = types.bool;
                  default = false;
                };
                hostAddress = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
                localAddress = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
                bindMounts = mkOption {
                  default = { };
                  type = types.attrsOf (
                    types.submodule (
                      { name, ... }:
                      {
                        options.mountPoint = mkOption {
                          type = types.str;
                          default = name;
                        };
                        options.hostPath = mkOption {
                          type = types.nullOr types.str;
                          default = null;
                        };
                        options.isReadOnly = mkOption {
                          type = types.bool;
                          default = true;
                        };
                      }
                    )
                  );
                };
                config = mkOption {
                  type = lib.mkOptionType {
                    name = "Toplevel NixOS config";
                    merge =
                      _loc: defs:
                      (eval ([ { networking.hostName = lib.mkDefault name; } ] ++ map (d: d.value) defs)).config;
                  };
                };
              };
            }
          )
        );
      };
    };
  };

  # nixos/modules/services/networking/nats.nix: its options and the settings it derives.
  natsModule =
    { config, ... }:
    let
      cfg = config.services.nats;
    in
    {
      options.services.nats = {
        enable = lib.mkEnableOption "NATS";
        user = mkOption {
          type = types.str;
          default = "nats";
        };
        group = mkOption {
          type = types.str;
          default = "nats";
        };
        serverName = mkOption {
          type = types.str;
          default = "nats";
        };
        jetstream = lib.mkEnableOption "JetStream";
        port = mkOption {
          type = types.port;
          default = 4222;
        };
        dataDir = mkOption {
          type = types.path;
          default = "/var/lib/nats";
        };
        settings = mkOption {
          type = jsonValue;
          default = { };
        };
      }
      // lib.optionalAttrs natsHasHostOption {
        host = mkOption {
          type = types.str;
          default = "127.0.0.1";
        };
      };

      config = lib.mkIf cfg.enable {
        services.nats.settings = {
          server_name = cfg.serverName;
          port = cfg.port;
          jetstream = lib.optionalAttrs cfg.jetstream { store_dir = cfg.dataDir; };
        }
        // lib.optionalAttrs natsHasHostOption { host = cfg.host; };
        systemd.services.nats = {
          description = "NATS messaging system";
          serviceConfig = {
            ExecStart = "${pkgs.nats-server}/bin/nats-server -c nats.conf";
            User = cfg.user;
            Group = cfg.group;
          };
        };
      };
    };
in
{
  inherit eval;
}
