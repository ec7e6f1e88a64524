# Evaluates the CIM modules, the example hosts and the flake's outputs against stand-ins
# (./stub: our own minimal lib and module evaluator, stand-in NixOS options, a stand-in
# nixpkgs with a stub builder), and renders what NixOS would write: unit files and nats-server
# configs. integration-tests/tests/it/nix.rs compares the result with ./golden, runs
# `systemd-analyze verify` on the units and `nats-server -t` on the configs.
#
#   nix-instantiate --eval --strict --json nixos-modules/tests/eval.nix --argstr pkgDir /x
#
# On a machine with nixpkgs, `--arg lib 'import <nixpkgs/lib>'` evaluates the same against
# the real lib (the NixOS options stay stand-ins).
{
  lib ? import ./stub/lib.nix,
  # Stands in for every package's store path in ExecStart= (the test points it at the real
  # binaries for systemd-analyze).
  pkgDir ? "/nix/store/00000000000000000000000000000000-cim-under-test",
  natsHasHostOption ? false,
}:

let
  repo = ../..;
  nixpkgs = import ./stub/nixpkgs.nix { inherit lib natsHasHostOption; };
  inherit (nixpkgs.nixos) eval;
  render = import ./render.nix { inherit lib; };
  names = import ../service-names.nix;
  fixture = import ./auth-fixture.nix;

  # Two archive targets, each with its credentials file: the leaf's storage manager and the
  # one in a container both get them.
  archiveTargets = [
    {
      name = "nas";
      endpoint = "http://nas.local:9000";
      bucket = "cim";
      prefix = "leaf1";
      credentialsFile = "/run/keys/cim-archive-nas";
    }
    {
      name = "wasabi";
      endpoint = "https://s3.eu-central-1.wasabisys.com";
      region = "eu-central-1";
      bucket = "cim-archive";
      pathStyle = false;
      credentialsFile = "/run/keys/cim-archive-wasabi";
    }
  ];

  pkg = {
    type = "derivation";
    name = "cim-under-test";
    outPath = pkgDir;
  };
  packages.services.cim = lib.genAttrs names (_: { package = pkg; });
  hubAddresses = [
    "10.0.0.11"
    "10.0.0.12"
    "10.0.0.13"
  ];

  leafModules = [
    ../.
    ../hosts/common.nix
    (import ../hosts/leaf.nix { inherit hubAddresses; })
    packages
    {
      services.cim.registry.natsCredentialsFile = "/run/keys/cim-registry.creds";
      services.cim.nats-leaf.hubCredentialsFile = "/run/keys/cim-leaf-hub.creds";
    }
    # Two archive targets, each with its credentials file (LoadCredential=, %d/archive-<name>
    # in CIM_ARCHIVE_TARGETS), next to the storage manager's own NATS credentials.
    {
      services.cim.storage-manager = {
        natsCredentialsFile = "/run/keys/cim-storage-manager.creds";
        inherit archiveTargets;
        archiveRequired = [ "nas" ];
        archivePartBytes = 16777216;
      };
      # The hub's configuration file and one secret it names, both from the host.
      services.cim.integration-hub = {
        configFile = "/etc/cim/hub.json";
        secretFiles.shop = "/run/keys/cim-hub-shop";
        webhookListen = "0.0.0.0:8470";
      };
    }
  ];
  leaf = eval leafModules;

  # The leaf with one NATS user per service (hashes from the test fixture) and each
  # service's password in an environment file.
  leafWithAuth = eval (
    leafModules
    ++ [
      {
        services.cim = lib.genAttrs names (name: {
          environmentFile = "/run/keys/cim-${name}.env";
        });
      }
      {
        services.cim.nats-auth = {
          enable = true;
          services = lib.genAttrs names (name: {
            passwordHash = fixture.${name}.hash;
          });
          extraUsers = [
            {
              user = "admin";
              passwordHash = fixture.admin.hash;
            }
          ];
          # A native plugin's own identity (the test-only admin hash; its password is public).
          nativePlugins.sha256.passwordHash = fixture.admin.hash;
          # cimctl restore's identity (the same public test hash).
          restorePasswordHash = fixture.admin.hash;
        };
      }
    ]
  );

  clusterNode =
    index:
    eval [
      ../.
      ../hosts/common.nix
      (import ../hosts/cluster-node.nix {
        inherit index;
        addresses = hubAddresses;
        leafDomains = [ "leaf" ];
      })
      packages
    ];

  # A cluster node with one NATS user per service: the storage manager's includes the
  # mirrors of leaf `leaf` (from its sourceLeaves).
  clusterNodeWithAuth = eval [
    ../.
    ../hosts/common.nix
    (import ../hosts/cluster-node.nix {
      index = 1;
      addresses = hubAddresses;
      leafDomains = [ "leaf" ];
    })
    packages
    {
      services.cim.nats-auth = {
        enable = true;
        services = lib.genAttrs names (name: {
          passwordHash = fixture.${name}.hash;
        });
      };
    }
  ];

  # A leaf host whose services all run in containers (none on the host itself).
  containerHost = eval [
    (repo + "/containers")
    ../hosts/common.nix
    (import ../hosts/leaf.nix { hubAddresses = [ ]; })
    packages
    { cim.containers = lib.genAttrs names (_: { enable = true; }); }
    {
      cim.containers.storage-manager.natsCredentialsFile = "/run/keys/cim-storage-manager.creds";
      cim.containers.registry.environmentFile = "/run/keys/cim-registry.env";
    }
    # The services' own options inside the containers: the storage manager's two archive
    # targets with credentials files and the hub's configuration and secret files (each
    # bind-mounted at its path, LoadCredential= inside), a plugin directory, and a registry
    # with its own memory cap and CPU weight (which the container's unit follows) next to
    # its own options.
    {
      cim.containers.storage-manager.service = {
        inherit archiveTargets;
        archiveRequired = [ "nas" ];
      };
      cim.containers.integration-hub.service = {
        configFile = "/etc/cim/hub.json";
        secretFiles.shop = "/run/keys/cim-hub-shop";
        webhookListen = "0.0.0.0:8470";
      };
      cim.containers.plugin-host.service.allowedDirectories.models = "/var/lib/models";
      cim.containers.registry.service = {
        memoryMax = "1G";
        cpuWeight = 200;
        missedBeats = 5;
      };
      # A second definition, from another module: merged inside like any other.
      cim.containers.registry.service.minTtl = "2s";
    }
    { services.cim = lib.genAttrs names (_: { enable = lib.mkForce false; }); }
  ];

  # The flake's outputs with the stand-in nixpkgs input. Checks names and wiring; builds
  # nothing.
  flake =
    let
      self = (import (repo + "/flake.nix")).outputs {
        inherit self;
        nixpkgs = { inherit (nixpkgs) lib legacyPackages; };
      };
      # nixosModules.containers next to nixosModules.default, as a host would import them:
      # the module keys must make the second import a no-op.
      containersFromFlake = eval [
        self.nixosModules.containers
        self.nixosModules.default
        ../hosts/common.nix
        {
          services.cim.nats-leaf.enable = true;
          cim.containers.registry.enable = true;
        }
      ];
    in
    {
      packages = lib.mapAttrs (
        _:
        lib.mapAttrs (
          _: p: {
            inherit (p) name;
            inherit (p.args) pname cargoBuildFlags doCheck;
            src = p.args.src.files or (toString p.args.src);
            cargoLock = toString p.args.cargoLock.lockFile == toString (repo + "/Cargo.lock");
            mainProgram = p.args.meta.mainProgram or null;
          }
        )
      ) self.packages;
      nixosModules = lib.attrNames self.nixosModules;
      nixosConfigurations = lib.mapAttrs (_: host: {
        units = lib.attrNames host.config.systemd.services;
        registryExecStart = host.config.systemd.services.cim-registry.serviceConfig.ExecStart;
        systemPackages = map (p: p.name) host.config.environment.systemPackages;
      }) self.nixosConfigurations;
      checks = lib.mapAttrs (_: lib.attrNames) self.checks;
      devShell = map (p: p.name) self.devShells.x86_64-linux.default.packages;
      containerRegistryExecStart =
        containersFromFlake.config.containers.cim-registry.config.systemd.services.cim-registry.serviceConfig.ExecStart;
    };
in
{
  systems = {
    leaf = render.system leaf.config;
    leaf-auth = render.system leafWithAuth.config;
    cluster-node-1 = render.system (clusterNode 1).config;
    cluster-node-2 = render.system (clusterNode 2).config;
    cluster-node-3 = render.system (clusterNode 3).config;
    cluster-node-auth = render.system clusterNodeWithAuth.config;
    containers-host = render.system containerHost.config;
  }
  // lib.mapAttrs' (
    name: c: lib.nameValuePair "container-${name}" (render.system c.config)
  ) containerHost.config.containers;

  hosts = {
    containers = lib.mapAttrs (_: c: {
      inherit (c)
        autoStart
        privateNetwork
        hostAddress
        localAddress
        bindMounts
        ;
    }) containerHost.config.containers;
    containerHostFirewall = containerHost.config.networking.firewall.interfaces;
    containerHostTmpfiles = containerHost.config.systemd.tmpfiles.rules;
    clusterFirewall = (clusterNode 1).config.networking.firewall.allowedTCPPorts;
  };

  inherit flake;
}
